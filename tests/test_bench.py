"""`python -m clip_jax.bench train` and `profile`: MFU arithmetic, XLA FLOP counts, section flags, trace sums, tiny runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.bench import __main__ as bench_cli
from clip_jax.bench import profile as bench_profile
from clip_jax.bench import step as step_lib
from clip_jax.bench import train as train_bench
from conftest import ROOT

# XLA counts a [m,k]x[k,n] dot as 2mkn FLOPs and adds the elementwise ops (bias, activation) on top:
# for the shapes below those are < 1% of the matmuls.
FLOP_TOL = 0.02


def test_mfu_arithmetic():
  assert step_lib.mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)  # 4 TFLOP/s of 8
  assert step_lib.mfu(1e9, 1.0, None) is None
  with pytest.raises(ValueError, match='positive'):
    step_lib.mfu(0.0, 1.0, 1e12)


def test_datasheet_peak_by_device_kind():
  assert step_lib.datasheet_peak('NVIDIA H100 80GB HBM3') == 989e12
  assert step_lib.datasheet_peak('NVIDIA H200') == 989e12
  assert step_lib.datasheet_peak('TPU v5 lite') == 197e12
  assert step_lib.datasheet_peak('TPU v5p') == 459e12
  assert step_lib.datasheet_peak('some new chip') is None
  assert step_lib.datasheet_peak(jax.devices()[0]) is None  # CPU: no datasheet figure


def test_cost_analysis_flops_of_a_matmul():
  m, k, n = 64, 128, 32
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  flops = step_lib.cost_flops(jax.jit(jnp.matmul).lower(a, b).compile())
  assert flops == pytest.approx(2 * m * k * n, rel=FLOP_TOL)


def test_cost_analysis_flops_of_an_mlp_train_step():
  """Forward 2*B*(D*H + H*O), backward twice that (input and weight gradients; the first layer's input
  gradient is not needed, so the exact count is 3x the forward minus 2*B*D*H)."""
  batch, d, h, o = 32, 64, 256, 16
  x = jnp.ones((batch, d))
  params = dict(w1=jnp.ones((d, h)), b1=jnp.zeros(h), w2=jnp.ones((h, o)), b2=jnp.zeros(o))

  y = jnp.ones((batch, o))

  def loss(p, x, y):  # squared error: the gradient needs every matmul (a plain sum would let XLA drop some)
    return jnp.sum((jnp.tanh(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2'] - y) ** 2)

  flops = step_lib.cost_flops(jax.jit(jax.grad(loss)).lower(params, x, y).compile())
  forward = 2 * batch * (d * h + h * o)
  want = 3 * forward - 2 * batch * d * h
  assert flops == pytest.approx(want, rel=FLOP_TOL)


def test_matmul_peak_is_positive():
  assert step_lib.matmul_peak(128, repeats=2) > 0


def test_section_parsing():
  assert train_bench.parse_sections('tokenizer,step') == ('step', 'tokenizer')
  assert train_bench.parse_sections(' torch , pipeline ') == ('torch', 'pipeline')
  with pytest.raises(ValueError, match=r"unknown section\(s\) \['steps'\]; choose from step,torch,pipeline,tokenizer"):
    train_bench.parse_sections('steps,torch')
  with pytest.raises(ValueError, match='unknown'):
    train_bench.parse_sections(',')


def test_bad_section_flag_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    bench_cli.main(['train', '--sections', 'step,flops'])
  assert e.value.code == 2
  assert "unknown section(s) ['flops']" in capsys.readouterr().err


def _positive_numbers(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _positive_numbers(v)
  elif isinstance(tree, list):
    for v in tree:
      yield from _positive_numbers(v)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


def test_tiny_run_json(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  bench_cli.main(['train', '--config', f'{ROOT}/configs/clip_digits.py:tiny', '--sections', 'step,torch,pipeline',
                  '--steps', '1', '--rounds', '1', '--warmup', '0', '--matmul_size', '128',
                  '--pipeline_batches', '2', '--pipeline_records', '32', '--json', str(out)])
  r = json.loads(out.read_text())
  assert r['sections'] == ['step', 'torch', 'pipeline']
  assert set(r) >= {'device', 'peak', 'step', 'torch', 'pipeline'} and 'tokenizer' not in r
  s = r['step']
  assert len(s['step_seconds']) == 1 and s['batch_size'] == 16
  for key in ('images_per_second', 'flops_per_step_per_device', 'mfu_measured_peak', 'achieved_flops_per_s'):
    assert s[key] > 0
  assert s['mfu_datasheet_peak'] is None and r['peak']['datasheet_bf16_flops_per_s'] is None
  assert r['torch']['images_per_second'] > 0 and r['torch']['ratio_ours_over_theirs'] > 0
  assert len(r['torch']['ratio_per_round']) == 1
  readers = r['pipeline']['readers']
  assert set(readers) == {'grain_digits', 'tfdata_digits', 'grain_arrayrecord'}
  for x in readers.values():
    assert x['batches_per_second'] > 0 and x['images_per_second'] > 0 and x['ratio_over_step'] > 0
  assert r['pipeline']['main_job_step']['images_per_second'] > 0
  assert all(x >= 0 for x in _positive_numbers(r))
  printed = capsys.readouterr().out
  assert 'ours/theirs' in printed and 'x the step' in printed and f'wrote {out}' in printed


def test_random_batch_tokens_end_in_eot():
  spec = dict(tokens=jax.ShapeDtypeStruct((4, 10), np.int32), image=jax.ShapeDtypeStruct((4, 8, 8, 3), np.uint8))
  batch = step_lib.random_batch(spec, vocab_size=100)
  assert batch['image'].dtype == np.uint8 and batch['tokens'].dtype == np.int32
  assert (batch['tokens'].max(1) == 99).all()  # argmax pooling finds the EOT


def test_model_flops_ignore_scan_and_remat():
  """The step's FLOPs are the model's: a scanned stack (whose loop body XLA's count of the compiled
  program sees once) and a remat policy (whose recomputed matmuls it counts twice) give the
  unrolled, remat-free count."""
  base = train_bench.step_config(train_bench.load_config(f'{ROOT}/configs/clip_digits.py:tiny'), model='tiny')
  plain = step_lib.model_flops(base)
  scanned = train_bench.step_config(base, scan_layers=True, remat='dots')
  assert step_lib.model_flops(scanned) == pytest.approx(plain, rel=1e-9)
  assert scanned.model.scan_layers and scanned.model.remat == 'dots'  # the caller's config is untouched


def _event(tid, name, dur, ph='X'):
  return dict(ph=ph, tid=tid, name=name, dur=dur, ts=0, pid=1)


def test_profile_sums_xla_operations_only():
  events = [
      dict(ph='M', tid=1, name='thread_name', args=dict(name='tf_XLAEigen/123')),
      dict(ph='M', tid=2, name='thread_name', args=dict(name='python')),
      _event(1, 'ynn_fusion.3', 30.0), _event(1, 'ynn_fusion.4', 10.0), _event(1, 'copy_bitcast_fusion.7', 20.0),
      _event(1, 'ynn_fusion.3', 5.0),                         # a second call of the same kernel
      _event(1, 'ThunkExecutor::Execute', 100.0), _event(1, 'end: ynn_fusion.3', 1.0),  # runtime spans
      _event(1, 'while.2', 60.0),                             # a loop: contains its body's operations
      _event(2, 'ynn_fusion.9', 500.0),                       # not an XLA thread
      _event(1, 'copy.1', 7.0, ph='i'),                       # not a complete event
  ]
  times = bench_profile.op_times(events)
  assert times == {'ynn_fusion.3': 35.0, 'ynn_fusion.4': 10.0, 'copy_bitcast_fusion.7': 20.0}
  assert bench_profile.by_kind(times) == {'ynn_fusion': 45.0, 'copy_bitcast_fusion': 20.0}


def test_profile_describes_fusions_by_their_root():
  hlo = ('\n%fused_computation.5 (p: f32[4,8]) -> f32[8,4] {\n'
         '  %p = f32[4,8]{1,0} parameter(0)\n'
         '  ROOT %t = f32[8,4]{1,0} transpose(%p), dimensions={1,0}, '
         'metadata={op_name="jit(step)/transpose(jvp(CLIP))/resblocks_3/mlp/c_fc/dot_general"}\n}\n'
         '\nENTRY %main {\n'
         '  %copy_bitcast_fusion.7 = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation.5\n'
         '  %dot.2 = f32[4,4]{1,0} dot(%a, %b), metadata={op_name="jit(step)/jvp(CLIP)/attn/dot_general"}\n}\n')
  assert bench_profile.describe(hlo, 'copy_bitcast_fusion.7') == dict(
      shape='f32[8,4]{1,0}', source='jit(step)/transpose(jvp(CLIP))/resblocks_3/mlp/c_fc/dot_general')
  assert bench_profile.describe(hlo, 'dot.2')['source'] == 'jit(step)/jvp(CLIP)/attn/dot_general'
  assert bench_profile.describe(hlo, 'missing.1') == dict(shape='', source='')


def test_profile_command_on_a_tiny_step(tmp_path, capsys):
  out = tmp_path / 'profile.json'
  bench_cli.main(['profile', '--config', f'{ROOT}/configs/clip_digits.py:tiny', '--steps', '1', '--warmup', '0',
                  '--top', '3', '--trace_dir', str(tmp_path / 'trace'), '--json', str(out)])
  r = json.loads(out.read_text())
  assert r['scan_layers'] and r['remat'] == 'dots' and len(r['step_seconds']) == 1
  assert len(r['top']) == 3 and r['op_seconds_per_step'] > 0
  assert sum(k['share'] for k in r['kinds'].values()) == pytest.approx(1.0)
  assert any(k.startswith(('ynn_fusion', 'dot', 'fusion')) for k in r['kinds'])  # the matmuls are there
  assert 'while' not in r['kinds']
  assert 'longest operations:' in capsys.readouterr().out
