"""Training throughput against the field, in one run (`python -m clip_jax.bench train`).

Sections (`--sections`, comma-separated, default all):
  step       our train step: images/s (median of timed steps, compiled once, inputs on device),
             FLOPs per step from XLA's cost analysis, MFU against a dense matmul measured in this
             run on the same device (and the datasheet bf16 peak on a known GPU/TPU)
  torch      the same step in open_clip / PyTorch (same architecture, batch, float32, AdamW,
             ClipLoss), alternated with ours for --rounds rounds; the ratio ours / theirs
  pipeline   grain and tf.data on the digits, grain on ArrayRecord shards, against the main
             job's (the --config as given, no overrides) train step; the ratio pipeline / step
  tokenizer  clip_jax.tokenize against open_clip.tokenize (clip_jax.bench.tokenizer)

  python -m clip_jax.bench train --config configs/clip_digits.py --model ViT-B/32 \\
      --batch_size 32 --image_size 224 --json bench.json
"""

import importlib.util
import json
import os
import platform
import statistics
import sys
import time

SECTIONS = ('step', 'torch', 'pipeline', 'tokenizer')


def parse_sections(text: str) -> tuple:
  """'step,torch' -> ('step', 'torch') in canonical order; a ValueError names an unknown section."""
  names = [s.strip() for s in text.split(',') if s.strip()]
  unknown = [s for s in names if s not in SECTIONS]
  if unknown or not names:
    raise ValueError(f'--sections: unknown section(s) {unknown or [text]}; choose from {",".join(SECTIONS)}')
  return tuple(s for s in SECTIONS if s in names)


def load_config(spec: str):
  """configs/X.py[:arg] -> its get_config(arg), as the trainer CLI loads it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('clip_jax_bench_config', path)
  if module_spec is None:
    raise ValueError(f'--config {spec!r}: no such config file')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def step_config(config, model=None, batch_size=None, image_size=None, dtype=None, scan_layers=None, remat=None):
  """The config with the benchmark's overrides: a zoo model, batch, image size, compute dtype, layer scan, remat."""
  from clip_jax.models import zoo  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  if model:
    c.model = zoo.get(model)
  if batch_size:
    c.batch_size = batch_size
  if image_size:
    c.model.vision.image_size = image_size
  if dtype:
    c.model.dtype = dtype
  if scan_layers is not None:
    c.model.scan_layers = scan_layers
  if remat is not None:
    c.model.remat = remat
  c.grad_accum_steps = 1
  return c


def add_step_flags(parser) -> None:
  """The step's overrides of the config: --model, --batch_size, --image_size, --dtype, and --scan_layers and
  --remat (how the step runs the transformer blocks: the same model and FLOPs)."""
  from clip_jax.layers import remat as remat_lib  # pylint: disable=g-import-not-at-top
  parser.add_argument('--model', default=None, help='a zoo model for the step sections (e.g. ViT-B/32)')
  parser.add_argument('--batch_size', type=int, default=None, help='step sections: global batch')
  parser.add_argument('--image_size', type=int, default=None, help='step sections: image side')
  parser.add_argument('--dtype', default=None, help="step sections: compute dtype ('bfloat16' on GPU/TPU)")
  parser.add_argument('--scan_layers', default='on', choices=('on', 'off', 'config'),
                      help="step sections: transformer blocks under nn.scan ('on'), in a Python loop ('off') or as "
                      "the config says. On XLA:CPU the loop's backward fuses into per-layer transposing copies "
                      "that recompute the residual-gradient chain; the scan's loop boundary stores it (README)")
  parser.add_argument('--remat', default='dots', choices=sorted(remat_lib.POLICIES) + ['config'],
                      help="step sections: remat policy per block ('dots': keep the matmul outputs, recompute the "
                      "elementwise ops, which on CPU is faster than storing them) or the config's")


def layer_overrides(args) -> tuple:
  """(scan_layers, remat) overrides for step_config from the flags (None: the config's)."""
  scan = {'on': True, 'off': False, 'config': None}[args.scan_layers]
  return scan, None if args.remat == 'config' else args.remat


def layers_label(r: dict) -> str:
  return f'{"scan" if r.get("scan_layers") else "loop"} layers, remat {r.get("remat", "none")}'


def _progress(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def _threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def _step_section(ours, peak, peak_datasheet, times):
  from clip_jax.bench import step as step_lib  # pylint: disable=g-import-not-at-top
  out = step_lib.summarise(times, ours.batch_size)
  t = out['median_step_seconds']
  out.update(batch_size=ours.batch_size, compile_seconds=ours.compile_seconds, flops_per_step_per_device=ours.flops,
             devices=ours.devices, achieved_flops_per_s=ours.flops / t,
             mfu_measured_peak=step_lib.mfu(ours.flops, t, peak), mfu_datasheet_peak=step_lib.mfu(ours.flops, t, peak_datasheet))
  return out


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clip_jax.bench import step as step_lib  # pylint: disable=g-import-not-at-top
  sections = parse_sections(args.sections)
  base = load_config(args.config)
  config = step_config(base, args.model, args.batch_size, args.image_size, args.dtype, *layer_overrides(args))
  device = jax.devices()[0]
  result = dict(sections=list(sections), config=args.config, model=args.model or 'from config',
                scan_layers=bool(config.model.get('scan_layers', False)), remat=config.model.get('remat', 'none'),
                device=dict(platform=device.platform, kind=device.device_kind, count=jax.device_count(),
                            host=platform.node(), threads=_threads()),
                steps=args.steps, warmup=args.warmup, rounds=args.rounds)
  if 'step' in sections or 'torch' in sections or 'pipeline' in sections:
    dtype = jnp.dtype(config.model.get('dtype', 'float32'))
    _progress('measuring the matmul peak')
    peak = step_lib.matmul_peak(args.matmul_size, dtype=dtype, device=device)
    result['peak'] = dict(matmul_size=args.matmul_size, dtype=dtype.name, measured_flops_per_s=peak,
                          datasheet_bf16_flops_per_s=step_lib.datasheet_peak(device))
  if 'step' in sections or 'torch' in sections:
    _progress('compiling our step')
    ours = step_lib.JaxStep(config)
    theirs = None
    if 'torch' in sections:
      try:
        from clip_jax.bench import torch_step  # pylint: disable=g-import-not-at-top
        theirs = torch_step.TorchStep(config, threads=_threads())
      except ImportError as e:
        result['torch'] = dict(skipped=f'torch / open_clip not importable: {e}')
    _progress('warm-up')
    step_lib.time_steps(ours, args.warmup)
    if theirs is not None:
      step_lib.time_steps(theirs, args.warmup)
    ours_times, theirs_times, per_round = [], [], []
    for i in range(args.rounds if theirs is not None else 1):  # A B A B: both see the same machine state
      _progress(f'round {i + 1}')
      a = step_lib.time_steps(ours, args.steps)
      ours_times += a
      if theirs is not None:
        b = step_lib.time_steps(theirs, args.steps)
        theirs_times += b
        per_round.append(statistics.median(b) / statistics.median(a))  # images/s ratio ours / theirs
      # The peak again each round, so it sees the machine state the steps saw; the best one counts.
      p = result['peak']
      p['measured_flops_per_s'] = max(p['measured_flops_per_s'],
                                      step_lib.matmul_peak(args.matmul_size, dtype=dtype, device=device))
    result['step'] = _step_section(ours, result['peak']['measured_flops_per_s'],
                                   result['peak']['datasheet_bf16_flops_per_s'], ours_times)
    if theirs is not None:
      t = step_lib.summarise(theirs_times, theirs.batch_size)
      t.update(device=str(theirs.device), torch_threads=_threads(),
               ratio_ours_over_theirs=result['step']['images_per_second'] / t['images_per_second'],
               ratio_per_round=per_round)
      result['torch'] = t
  if 'pipeline' in sections:
    from clip_jax.bench import input_pipeline  # pylint: disable=g-import-not-at-top
    main_config = step_config(base)
    if 'step' in result and main_config == config:  # no overrides: the step measured above is the main job's
      consumed = {k: result['step'][k] for k in ('step_seconds', 'median_step_seconds', 'images_per_second')}
    else:
      _progress('the main job\'s step')
      main_job = step_lib.JaxStep(main_config)
      step_lib.time_steps(main_job, args.warmup)
      consumed = step_lib.summarise(step_lib.time_steps(main_job, args.steps), main_job.batch_size)
      del main_job
    _progress('input pipelines')
    readers = input_pipeline.run(base, batches=args.pipeline_batches, warmup=2, records=args.pipeline_records)
    for r in readers.values():
      r['ratio_over_step'] = r['images_per_second'] / consumed['images_per_second']
    result['pipeline'] = dict(batch_size=base.batch_size, image_size=base.model.vision.image_size,
                              records=args.pipeline_records, main_job_step=consumed, readers=readers)
  if 'tokenizer' in sections:
    from clip_jax.bench import tokenizer  # pylint: disable=g-import-not-at-top
    _progress('tokenizers')
    try:
      tok = tokenizer.run(n=args.tokenizer_n, rounds=args.rounds)
      ours, theirs = tok['median']
      tok['ratio_ours_over_theirs'] = ours / theirs
      result['tokenizer'] = tok
    except ImportError as e:
      result['tokenizer'] = dict(skipped=f'open_clip not importable: {e}')
  return result


def _fmt(x, spec='.3g'):
  return 'n/a' if x is None else format(x, spec)


def report(r: dict) -> None:
  d = r['device']
  print(f'device: {d["kind"]} ({d["platform"]}, {d["count"]} device(s), {d["threads"]} threads); '
        f'sections {",".join(r["sections"])}; {r["steps"]} timed steps x {r["rounds"]} round(s) after {r["warmup"]} warm-up')
  if 'peak' in r:
    p = r['peak']
    print(f'peak: {p["matmul_size"]}^2 {p["dtype"]} matmul {p["measured_flops_per_s"] / 1e9:,.1f} GFLOP/s measured; '
          f'datasheet bf16 {_fmt(p["datasheet_bf16_flops_per_s"] and p["datasheet_bf16_flops_per_s"] / 1e12)} TFLOP/s')
  if 'step' in r:
    s = r['step']
    print(f'step [{r["model"]}, batch {s["batch_size"]}, {layers_label(r)}]: {s["images_per_second"]:,.1f} images/s '
          f'(median {s["median_step_seconds"] * 1e3:,.1f} ms; compile {s["compile_seconds"]:.1f} s); '
          f'{s["flops_per_step_per_device"] / 1e9:,.1f} GFLOP/step/device (XLA), '
          f'{s["achieved_flops_per_s"] / 1e9:,.1f} GFLOP/s; MFU {_fmt(s["mfu_measured_peak"], ".1%")} of measured peak, '
          f'{_fmt(s["mfu_datasheet_peak"], ".1%")} of datasheet')
  if 'torch' in r:
    t = r['torch']
    if 'skipped' in t:
      print(f'open_clip: skipped ({t["skipped"]})')
    else:
      rounds = ' '.join(f'{x:.2f}' for x in t['ratio_per_round'])
      print(f'open_clip [{t["device"]}, {t["torch_threads"]} threads]: {t["images_per_second"]:,.1f} images/s '
            f'(median {t["median_step_seconds"] * 1e3:,.1f} ms); ours/theirs {t["ratio_ours_over_theirs"]:.2f}x '
            f'(per round: {rounds})')
  if 'pipeline' in r:
    p = r['pipeline']
    m = p['main_job_step']
    print(f'pipeline [main job: batch {p["batch_size"]}, {p["image_size"]} px, {p["records"]} records]: '
          f'the train step consumes {m["images_per_second"]:,.0f} images/s')
    for name, x in p['readers'].items():
      print(f'  {name:18s} {x["batches_per_second"]:8.2f} batches/s {x["images_per_second"]:9,.0f} images/s  '
            f'{x["ratio_over_step"]:5.2f}x the step  (setup {x["setup_seconds"]:.1f} s)')
  if 'tokenizer' in r:
    t = r['tokenizer']
    if 'skipped' in t:
      print(f'tokenizer: skipped ({t["skipped"]})')
    else:
      ours, theirs = t['median']
      print(f'tokenizer [{t["n"]} strings]: clip_jax {ours:,.0f} str/s, open_clip {theirs:,.0f} str/s, '
            f'ratio {t["ratio_ours_over_theirs"]:.2f}x')


def cli_main(run_fn, report_fn):
  """A benchmark's `main(args)`: run it, print the report, and write the results to --json if given."""
  def main(args) -> None:
    result = run_fn(args)
    report_fn(result)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump(result, f, indent=2)
      print(f'wrote {args.json}')
  return main


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser('train', help='train-step throughput, MFU, open_clip, input pipelines, tokenizer')
  parser.add_argument('--config', default='configs/clip_digits.py', help='configs/X.py[:arg]; the pipeline section '
                      'measures this config as given (the main job)')
  add_step_flags(parser)
  parser.add_argument('--sections', default=','.join(SECTIONS), type=_sections_arg,
                      help=f'comma-separated subset of {",".join(SECTIONS)}')
  parser.add_argument('--steps', type=int, default=1, help='timed steps per round')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps before timing (after compilation; torch needs 2)')
  parser.add_argument('--rounds', type=int, default=3, help='alternating ours/open_clip rounds; tokenizer rounds')
  parser.add_argument('--matmul_size', type=int, default=2048, help='side of the peak-measuring matmul')
  parser.add_argument('--pipeline_batches', type=int, default=20, help='timed batches per reader')
  parser.add_argument('--pipeline_records', type=int, default=2048, help='digits records per reader')
  parser.add_argument('--tokenizer_n', type=int, default=5000, help='tokenizer corpus size')
  parser.add_argument('--json', default=None, help='also write the results here')
  parser.set_defaults(func=cli_main(run, report))


def _sections_arg(text: str) -> str:
  import argparse  # pylint: disable=g-import-not-at-top
  try:
    parse_sections(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text
