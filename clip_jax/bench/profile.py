"""`python -m clip_jax.bench profile`: where the train step's time goes, op by op, from an XLA trace.

Compiles the same step as `bench train` (same overrides), runs it under
`jax.profiler.trace`, reads the Perfetto trace it writes and sums the time of
every XLA operation (a fused kernel, a library matmul, a copy) over the
timed steps. It prints:

  * the share of each operation kind (the kernel name without its `.N`
    suffix: `ynn_fusion` is a matmul and what XLA fused into it,
    `copy_bitcast_fusion` a layout change, `add_select_fusion` elementwise...);
  * the longest single operations, with their output shape and the
    framework op that produced them (the HLO metadata: which layer, forward
    or `transpose(...)`, i.e. backward).

Times are per step, summed over the XLA threads that ran the operations, so
shares are what the step spends, not wall time; a loop's or conditional's
own span is left out (it contains its body's operations, counted already).
The trace directory stays (`--trace_dir`) for TensorBoard's or Perfetto's
viewer.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile


def load_trace(trace_dir: str) -> list:
  """The events of the newest Perfetto trace (`*.trace.json.gz`) under trace_dir."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}: the profiler wrote no Perfetto trace')
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


# Runtime bookkeeping spans that contain the operations rather than being one.
_SPANS = re.compile(r'^(ThunkExecutor::|end: |SlinkyThreadPool::|ThreadpoolListener::)')
# Control flow whose span contains its body's operations, which the trace lists on their own.
_CONTAINERS = ('while', 'conditional', 'call')


def op_times(events: list) -> dict:
  """{operation name: total microseconds} over the complete events on XLA's own threads."""
  threads = {e['tid']: e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name' and 'tid' in e}
  totals = collections.defaultdict(float)
  for e in events:
    if e.get('ph') != 'X' or not threads.get(e.get('tid'), '').startswith('tf_XLA'):
      continue
    if _SPANS.match(e['name']) or e['name'].startswith('$') or kind_of(e['name']) in _CONTAINERS:
      continue
    totals[e['name']] += float(e.get('dur') or 0.0)
  return dict(totals)


def kind_of(op: str) -> str:
  """'copy_bitcast_fusion.143' -> 'copy_bitcast_fusion'."""
  return re.sub(r'\.\d+$', '', op)


def by_kind(times: dict) -> dict:
  kinds = collections.defaultdict(float)
  for op, t in times.items():
    kinds[kind_of(op)] += t
  return dict(kinds)


def describe(hlo_text: str, op: str) -> dict:
  """{'shape', 'source'} of an instruction in the compiled HLO text ('' where it is not found)."""
  m = re.search(r'\n\s*(?:ROOT )?%?' + re.escape(op) + r' = (\S+)[^\n]*', hlo_text)
  if not m:
    return dict(shape='', source='')
  line = m.group(0)
  source = re.search(r'op_name="([^"]*)"', line)
  if source is None:  # a fusion: its metadata sits on the fused computation's root
    called = re.search(r'calls=(%[\w.\-]+)', line)
    body = called and re.search(re.escape(called.group(1)) + r' [^\n]*\{\n(.*?)\n\}', hlo_text, re.S)
    source = body and re.search(r'ROOT[^\n]*op_name="([^"]*)"', body.group(1))
  return dict(shape=m.group(1), source=source.group(1) if source else '')


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from clip_jax.bench import step as step_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.bench import train as train_bench  # pylint: disable=g-import-not-at-top
  if args.steps < 1:
    raise ValueError(f'--steps={args.steps} must be >= 1')
  config = train_bench.step_config(train_bench.load_config(args.config), args.model, args.batch_size,
                                   args.image_size, args.dtype, *train_bench.layer_overrides(args))
  step = step_lib.JaxStep(config)
  step_lib.time_steps(step, args.warmup)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix='clip_jax_profile_')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    seconds = step_lib.time_steps(step, args.steps)
  times = {op: t / args.steps / 1e6 for op, t in op_times(load_trace(trace_dir)).items()}  # s per step
  total = sum(times.values())
  hlo = step.compiled.as_text()
  top = sorted(times.items(), key=lambda kv: -kv[1])[:args.top]
  return dict(
      config=args.config, model=args.model or 'from config', batch_size=config.batch_size,
      scan_layers=bool(config.model.get('scan_layers', False)), remat=config.model.get('remat', 'none'),
      trace_dir=trace_dir,
      step_seconds=seconds, op_seconds_per_step=total,
      kinds={k: dict(seconds=v, share=v / total) for k, v in
             sorted(by_kind(times).items(), key=lambda kv: -kv[1])},
      top=[dict(op=op, seconds=t, share=t / total, **describe(hlo, op)) for op, t in top])


def report(r: dict) -> None:
  from clip_jax.bench import train as train_bench  # pylint: disable=g-import-not-at-top
  steps = ', '.join(f'{s:.2f}' for s in r['step_seconds'])
  print(f'profile [{r["model"]}, batch {r["batch_size"]}, {train_bench.layers_label(r)}]: step {steps} s; '
        f'XLA operations {r["op_seconds_per_step"]:.2f} s/step summed over threads (trace: {r["trace_dir"]})')
  print('by kind:')
  for kind, x in list(r['kinds'].items())[:12]:
    print(f'  {x["share"]:6.1%} {x["seconds"] * 1e3:9.1f} ms  {kind}')
  print('longest operations:')
  for x in r['top']:
    print(f'  {x["share"]:6.1%} {x["seconds"] * 1e3:9.1f} ms  {x["op"]:28s} {x["shape"]:28s} {x["source"][-80:]}')


def add_parser(subparsers) -> None:
  from clip_jax.bench import train as train_bench  # pylint: disable=g-import-not-at-top
  parser = subparsers.add_parser('profile', help="the train step's time by XLA operation (a profiler trace)")
  parser.add_argument('--config', default='configs/clip_digits.py', help='configs/X.py[:arg]')
  train_bench.add_step_flags(parser)
  parser.add_argument('--steps', type=int, default=2, help='traced steps')
  parser.add_argument('--warmup', type=int, default=1, help='untraced steps after compilation')
  parser.add_argument('--top', type=int, default=15, help='longest operations listed')
  parser.add_argument('--trace_dir', default=None, help='where the trace goes (default: a new temporary directory)')
  parser.add_argument('--json', default=None, help='also write the results here')
  parser.set_defaults(func=train_bench.cli_main(run, report))
