"""clip_jax.plan: per-device memory and collectives of the compiled train step, per mesh.

Three compiles of the tiny model in-process (module fixture) and one CLI run
with 16 fake devices; the HLO reading is checked on a hand-written module.
"""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT, load_config
from trainer_helpers import tiny_config
from clip_jax import hlo_stats, plan as plan_lib
from clip_jax.train import trainer
from clip_jax.train import logging as run_logging

# Divisible by 8 and by 16 and equal to no width of the tiny model, so a dimension of this size is the batch.
BATCH = 40
FSDP8, DATA4_FSDP2, TENSOR8 = (1, 8, 1), (4, 2, 1), (1, 1, 8)


@pytest.fixture(scope='module')
def plans():
  return dict(zip((FSDP8, DATA4_FSDP2, TENSOR8), plan_lib.plan(tiny_config(batch_size=BATCH),
                                                               [FSDP8, DATA4_FSDP2, TENSOR8])))


def _split_and_replicated(mesh_shape):
  """Full bytes of the parameter + optimizer leaves the mesh splits, and of those it replicates."""
  config = tiny_config(batch_size=BATCH)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  s = trainer.setup(config)
  split = replicated = 0
  for x in jax.tree.leaves((s.abstract_state.params, s.abstract_state.opt_state)):
    full = math.prod(x.shape) * x.dtype.itemsize
    if x.sharding.shard_shape(x.shape) == x.shape:
      replicated += full
    else:
      split += full
  return s, split, replicated


def test_parameter_and_optimizer_bytes_fall_as_one_over_fsdp(plans):
  s, split, replicated = _split_and_replicated(FSDP8)
  _, split2, replicated2 = _split_and_replicated(DATA4_FSDP2)
  # The tiny model's every leaf with a width axis divides by 8: both meshes split the same leaves.
  assert (split, replicated) == (split2, replicated2)
  # What stays whole: norm scales and biases, the size-3 q/k/v axis: 38 KB of 40.7 MB.
  assert 0 < replicated < 0.001 * split
  per_device = {m: plans[m].memory['parameters'] + plans[m].memory['optimizer_state'] for m in (FSDP8, DATA4_FSDP2)}
  # Exact: replicated leaves whole, split leaves 1/fsdp (the data axis holds copies).
  assert per_device[FSDP8] == replicated + split // 8
  assert per_device[DATA4_FSDP2] == replicated + split // 2
  # So the ratio is the fsdp ratio 4 up to the replicated part: 3.978, within 1%.
  assert per_device[DATA4_FSDP2] / per_device[FSDP8] == pytest.approx(4.0, rel=0.01)
  assert plans[FSDP8].memory['replicated'] == plans[DATA4_FSDP2].memory['replicated'] == replicated
  # The same bytes as the trainer's own start-up summary computes them.
  assert plans[FSDP8].memory['parameters'] == run_logging._per_device_bytes(s.abstract_state.params,
                                                                          s.state_shardings.params)
  assert plans[FSDP8].parameters == plans[DATA4_FSDP2].parameters == 3_388_673


def test_memory_numbers_are_xla_memory_analysis(plans):
  for p in plans.values():
    ma = p.compiled.memory_analysis()
    m = p.memory
    assert m['temporaries'] == ma.temp_size_in_bytes > 0
    # The step's arguments are exactly the state and the batch, as the shardings lay them out.
    assert m['parameters'] + m['optimizer_state'] + m['other_state'] + m['batch'] == ma.argument_size_in_bytes
    assert m['total'] == (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                          + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)
    assert m['other_state'] == 16  # step, bad_steps (int32) and the raw uint32[2] rng key
  assert plans[FSDP8].memory['batch'] == BATCH // 8 * (64 * 64 * 3 + 24 * 4)  # uint8 64px images, 24 int32 tokens


def test_collectives(plans):
  _, split, _ = _split_and_replicated(FSDP8)
  split_params = split // 3  # adam's mu and nu have the parameters' shapes
  for mesh in (FSDP8, DATA4_FSDP2):
    c = plans[mesh].collectives
    # FSDP: every split weight is gathered whole for the forward (at least once)...
    assert c['all-gather']['count'] > 0 and c['all-gather']['buffer_bytes'] >= split_params
    # ...and its gradient reduced to this device's slice (XLA:CPU's all-reduce + slice form).
    assert c['reduce-scatter']['count'] == c['reduce-scatter']['as_all_reduce'] > 0
  fsdp8 = plans[FSDP8].collectives
  # A ring all-gather over 8 devices sends 7/8 of the gathered buffer.
  assert fsdp8['all-gather']['moved_bytes'] == pytest.approx(7 / 8 * fsdp8['all-gather']['buffer_bytes'], rel=0.01)
  # Pure tensor parallelism over a tiny model: nothing is gathered; activations and gradients all-reduced.
  t = plans[TENSOR8].collectives
  assert t['all-gather']['count'] == t['reduce-scatter']['count'] == 0 and t['all-reduce']['count'] > 0
  json.dumps([p.to_dict() for p in plans.values()])  # everything the CLI writes with --json serialises


def test_batch_square_buffer(plans):
  # Batch split 8 ways: each device builds only its rows of the logits.
  assert plans[FSDP8].batch_square is None
  assert plans[FSDP8].batch_wide['shape'] in ('f32[5,40]', 'f32[40,5]', 'f32[64,40]', 'f32[40,64]')
  # Batch not split (tensor=8): every device holds the whole B x B logits.
  assert plans[TENSOR8].batch_square['shape'] == f'f32[{BATCH},{BATCH}]'
  assert plans[TENSOR8].batch_square['bytes'] == BATCH * BATCH * 4


def test_bad_meshes_and_configs():
  for text, words in (('data=4,fsdp', 'data=D,fsdp=F,tensor=T'), ('dta=8', 'axes'), ('data=0,fsdp=8', 'positive'),
                      ('fsdp=2,fsdp=4', 'twice'), ('data=2.5', 'integer')):
    with pytest.raises(ValueError, match=words):
      plan_lib.parse_mesh(text)
  assert plan_lib.parse_mesh('fsdp=8') == (1, 8, 1)
  with pytest.raises(ValueError, match=r'--mesh data=2,fsdp=2,tensor=1 spans 4 devices but there are 8'):
    plan_lib.plan(tiny_config(), [(2, 2, 1)])
  with pytest.raises(ValueError, match=r'--mesh data=1,fsdp=8,tensor=1: batch_size=12 is not divisible .* of 8'):
    plan_lib.plan(tiny_config(batch_size=12), [FSDP8])
  with pytest.raises(ValueError, match=r'--model ViT-L/14'):
    plan_lib.plan(load_config('clip', 'ViT-L/14'), [FSDP8])


def test_state_moves_onto_other_devices():
  """--topology's path: the Setup built on host devices, its shardings moved onto another device list."""
  config = tiny_config(batch_size=BATCH)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = DATA4_FSDP2
  s = trainer.setup(config)
  moved = plan_lib._on_devices(s, jax.devices()[::-1])
  assert dict(moved.mesh.shape) == dict(s.mesh.shape) and moved.mesh != s.mesh
  for before, after in zip(jax.tree.leaves(s.abstract_state), jax.tree.leaves(moved.abstract_state)):
    assert after.sharding.mesh == moved.mesh and after.sharding.spec == before.sharding.spec
  assert plan_lib._device_bytes(moved.abstract_state) == plan_lib._device_bytes(s.abstract_state)
  assert all(x.sharding.mesh == moved.mesh for x in trainer.abstract_batch(moved).values())


def test_prepare_devices_before_jax():
  env = {'XLA_FLAGS': '--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8'}
  argv = ['plan', '--mesh', 'fsdp=16', '--mesh=data=4,fsdp=8', '--mesh', 'bad']
  assert plan_lib.prepare_devices(argv, env) == 32
  assert env == {'XLA_FLAGS': '--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=32',
                 'JAX_PLATFORMS': 'cpu'}
  assert plan_lib.prepare_devices(['plan', '--mesh', 'bad'], {}) is None
  assert plan_lib.human(5 * 2**20 + 2**19) == '5.50 MiB' and plan_lib.human(123 * 2**30) == '123 GiB'


def _cli(*flags, timeout=240):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the CLI must create its devices itself
  env.pop('JAX_PLATFORMS', None)
  env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  return subprocess.run([sys.executable, '-m', 'clip_jax.plan', '--config', str(ROOT / 'configs' / 'clip_digits.py')
                         + ':tiny', *flags], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_cli_creates_its_devices_and_prints_the_table(tmp_path, plans):
  out = tmp_path / 'plan.json'
  r = _cli('--mesh', 'fsdp=16', f'--batch_size={BATCH * 2}', '--json', str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  assert '16 x XLA:CPU host devices' in r.stdout
  lines = r.stdout.splitlines()
  assert lines[lines.index('per-device memory') - 1].split() == ['data=1,fsdp=16,tensor=1']
  for row in ('parameters + optimizer', 'temporaries (XLA temp)', 'all-gather', 'reduce-scatter',
              f'B x B buffer (two dims = {BATCH * 2})', 'largest buffers, data=1,fsdp=16,tensor=1:'):
    assert any(line.strip().startswith(row) for line in lines), row
  report = json.loads(out.read_text())
  (p,) = report['meshes']
  assert p['mesh'] == {'data': 1, 'fsdp': 16, 'tensor': 1} and p['parameters'] == 3_388_673
  # 16-way FSDP: the split leaves (all but 38,420 bytes of them, as at fsdp=8) at 1/16.
  _, split, replicated = _split_and_replicated(FSDP8)
  assert p['memory']['parameters'] + p['memory']['optimizer_state'] == replicated + split // 16
  assert p['batch_square'] is None


def test_cli_bad_mesh():
  r = _cli('--mesh', 'data=3,fsdp=x', timeout=120)
  assert r.returncode == 2 and "error: --mesh 'data=3,fsdp=x'" in r.stderr
  r = _cli('--mesh', 'fsdp=16', '--mesh', 'fsdp=8', timeout=120)
  assert r.returncode == 2 and 'fsdp=8,tensor=1 spans 8 devices but there are 16' in r.stderr


HLO = """HloModule test, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%mine_fn (p0: f32[32,16], p1: u32[]) -> f32[4,16] {
  %p0 = f32[32,16]{1,0} parameter(0)
  %p1 = u32[] parameter(1)
  %huge = f32[1000,1000]{1,0} broadcast(%p1), dimensions={}
  ROOT %d = f32[4,16]{1,0} dynamic-slice(%p0, %p1, %p1), dynamic_slice_sizes={4,16}
}

%body (p: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %p = (s32[], f32[4,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[4,16]{1,0} get-tuple-element(%p), index=1
  %ag = f32[32,16]{1,0} all-gather(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %s = f32[4,16]{1,0} slice(%ag), slice={[0:4], [0:16]}
  ROOT %t = (s32[], f32[4,16]{1,0}) tuple(%i, %s)
}

%cond (p: (s32[], f32[4,16])) -> pred[] {
  %p = (s32[], f32[4,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[4,16], g: f32[32,16], sc: f32[]) -> f32[4,16] {
  %a = f32[4,16]{1,0} parameter(0)
  %g = f32[32,16]{1,0} parameter(1)
  %sc = f32[] parameter(2)
  %pid = u32[] partition-id()
  %ar = (f32[], f32[32,16]{1,0}) all-reduce(%sc, %g), channel_id=2, replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, to_apply=%add
  %g0 = f32[] get-tuple-element(%ar), index=0
  %g1 = f32[32,16]{1,0} get-tuple-element(%ar), index=1
  %mine = f32[4,16]{1,0} fusion(%g1, %pid), kind=kLoop, calls=%mine_fn
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,16]{1,0}) tuple(%zero, %a)
  %loop = (s32[], f32[4,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %cp = f32[4,16]{1,0} collective-permute(%a), channel_id=3, source_target_pairs={{0,1},{1,2}}
  %ags = (f32[4,16]{1,0}, f32[8,16]{1,0}) all-gather-start(%a), channel_id=4, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  %agd = f32[8,16]{1,0} all-gather-done(%ags)
  %logits = f32[40,1,40]{2,1,0} broadcast(%g0), dimensions={}, metadata={op_name="jit(step)/logits"}
  ROOT %out = f32[4,16]{1,0} add(%mine, %cp)
}
"""


def test_hlo_stats_on_a_written_module():
  module = hlo_stats.parse(HLO)
  assert module.entry == 'main' and module.num_partitions == 8
  times, unknown = hlo_stats.multiplicities(module)
  assert (times['body'], times['cond'], times['mine_fn'], unknown) == (5, 6, 1, [])
  c = hlo_stats.collectives(module)
  # Loop: 5 x a 256-byte shard gathered 8 ways; async start: 256 bytes gathered 2 ways (its -done not recounted).
  assert c['all-gather'] == dict(count=6, buffer_bytes=5 * 2048 + 512, moved_bytes=5 * 256 * 7 + 256)
  # The tuple all-reduce: its [32,16] part feeds only this device's 1/8 slice (a reduce-scatter on TPU),
  # its scalar stays an all-reduce (2 * 7/8 * 4 bytes moved).
  assert c['reduce-scatter'] == dict(count=1, buffer_bytes=2048, moved_bytes=1792, as_all_reduce=1)
  assert c['all-reduce'] == dict(count=1, buffer_bytes=4, moved_bytes=7)
  assert c['collective-permute'] == dict(count=1, buffer_bytes=256, moved_bytes=256)
  bufs = hlo_stats.buffers(module)
  assert (1000, 1000) not in [b['dims'] for b in bufs]  # inside a fusion: never materialised
  top = hlo_stats.largest(bufs, top=2)
  assert [(b['shape'], b['count']) for b in top] == [('f32[40,1,40]', 1), ('f32[32,16]', 2)]
  square, wide = plan_lib._batch_buffers(bufs, 40)
  assert square == dict(shape='f32[40,1,40]', bytes=6400, op_name='jit(step)/logits') == wide
