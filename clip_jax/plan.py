"""Plan a run's per-device memory and communication without its hardware.

  python -m clip_jax.plan --config configs/clip_digits.py --model ViT-L/14 --batch_size 32768 \\
      --mesh data=1,fsdp=256,tensor=1 --mesh data=16,fsdp=16,tensor=1 [--json plan.json]

For each --mesh the REAL train step (`trainer.jit_step`) is compiled ahead of
time against the abstract state and batch, on fake host CPU devices that this
command creates itself (or, with --topology, for a named TPU/GPU topology
where JAX can build one). It prints one column per mesh: per-device bytes of
parameters, optimizer state, other state, the batch and XLA's temporaries;
the collectives per step read from the optimized HLO (clip_jax.hlo_stats);
the largest buffers, and whether any of them is the B x B logits.

State and batch bytes follow from the shardings and are exact. Temporaries
and collectives are what XLA:CPU compiled for that mesh; XLA:TPU/GPU fuse,
schedule and rematerialise differently, so read those as a close estimate.

`plan(config, meshes)` is the library entry point (tests call it in-process).
"""

# Ordering matters here. The CLI creates its fake devices from its own --mesh
# flags, and JAX reads JAX_PLATFORMS when it is imported and XLA_FLAGS when its
# CPU backend starts. Loading --config already imports JAX (configs import
# clip_jax.train.optim), so `prepare_devices(sys.argv)` runs before absl parses
# any flag, and this module imports nothing that imports JAX at module level:
# the functions that need JAX import it when called.
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Optional, Sequence

from clip_jax import hlo_stats

AXES = ('data', 'fsdp', 'tensor')
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def parse_mesh(text: str) -> tuple[int, int, int]:
  """'data=16,fsdp=16,tensor=1' -> (16, 16, 1); axes left out have size 1."""
  sizes = {}
  for part in text.replace(' ', '').split(','):
    name, eq, value = part.partition('=')
    if not eq or name not in AXES or not re.fullmatch(r'\d+', value) or int(value) < 1:
      raise ValueError(f'--mesh {text!r}: write it as data=D,fsdp=F,tensor=T with positive integer sizes '
                       f'(axes {AXES}; one left out has size 1), e.g. --mesh data=16,fsdp=16,tensor=1')
    if name in sizes:
      raise ValueError(f'--mesh {text!r} names {name!r} twice')
    sizes[name] = int(value)
  return tuple(sizes.get(a, 1) for a in AXES)


def mesh_label(shape: Sequence[int]) -> str:
  return ','.join(f'{a}={n}' for a, n in zip(AXES, shape))


def _flag_values(argv: Sequence[str], name: str) -> list[str]:
  """Values of --name=V and --name V in argv, read before absl parses it."""
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      out.append(arg.split('=', 1)[1])
    elif arg == f'--{name}' and i + 1 < len(argv):
      out.append(argv[i + 1])
  return out


def prepare_devices(argv: Sequence[str], environ=os.environ) -> Optional[int]:
  """Makes JAX start with as many fake CPU devices as the largest --mesh (before JAX is imported).

  Returns that count, or None when no --mesh parses (main then reports the error).
  """
  sizes = []
  for text in _flag_values(argv, 'mesh'):
    try:
      sizes.append(math.prod(parse_mesh(text)))
    except ValueError:
      pass
  if not sizes:
    return None
  n = max(sizes)
  kept = [f for f in environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  environ['XLA_FLAGS'] = ' '.join(kept + [f'{_DEVICE_COUNT_FLAG}={n}'])
  environ['JAX_PLATFORMS'] = 'cpu'  # host devices only: never touch (or wait for) a real accelerator
  return n


@dataclasses.dataclass
class MeshPlan:
  """What one mesh costs per device (bytes) and per step."""
  mesh: dict
  parameters: int                 # global parameter count
  memory: dict                    # per-device bytes by category, plus XLA's own `xla` figures
  collectives: dict               # clip_jax.hlo_stats.collectives()
  largest_buffers: list           # the largest distinct buffer shapes in the HLO
  batch_square: Optional[dict]    # the largest buffer with two dimensions equal to the global batch, if any
  batch_wide: Optional[dict]      # the largest buffer with a dimension equal to the global batch
  compile_seconds: float
  compiled: Any = dataclasses.field(default=None, repr=False)  # the jax Compiled (not in to_dict)

  def to_dict(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'compiled'}


def _leaves(tree) -> list:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)


def _device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in _leaves(tree))


def _on_devices(s, devices):
  """The same Setup with its mesh and shardings moved onto `devices` (e.g. a TPU topology's)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from clip_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(*s.mesh.devices.shape, devices=devices)
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, x.spec), s.state_shardings)
  abstract = jax.tree.map(lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=x), s.abstract_state, shardings)
  return dataclasses.replace(s, mesh=mesh, state_shardings=shardings, abstract_state=abstract, init_state=None)


def _memory(s, batch, compiled) -> dict:
  state = s.abstract_state
  params, opt = _device_bytes(state.params), _device_bytes(state.opt_state)
  whole = [x for x in _leaves((state.params, state.opt_state)) if x.sharding.shard_shape(x.shape) == x.shape]
  out = dict(parameters=params, optimizer_state=opt, replicated=_device_bytes(whole),
             other_state=_device_bytes(state) - params - opt,
             batch=_device_bytes(batch), temporaries=None, total=None, xla=None)
  ma = compiled.memory_analysis()
  if ma is not None:
    xla = dict(argument=ma.argument_size_in_bytes, output=ma.output_size_in_bytes, alias=ma.alias_size_in_bytes,
               temp=ma.temp_size_in_bytes, generated_code=ma.generated_code_size_in_bytes)
    # Peak-resident estimate: inputs, outputs that do not reuse a donated input, scratch and code.
    out.update(temporaries=xla['temp'], xla=xla,
               total=xla['argument'] + xla['output'] - xla['alias'] + xla['temp'] + xla['generated_code'])
  return out


def _batch_buffers(bufs: list, batch_size: int) -> tuple[Optional[dict], Optional[dict]]:
  """The largest B x B buffer (the logits of the whole batch) and the largest with a dimension of B.

  Dimensions are matched by size, so pick a batch size no model width shares (a B=64 batch
  and 64-wide weights cannot be told apart). A B x B buffer is one whose dimensions other
  than 1s are exactly (B, B).
  """
  def largest(square):
    found = [b for b in bufs
             if ([d for d in b['dims'] if d != 1] == [batch_size] * 2 if square else batch_size in b['dims'])]
    if not found:
      return None
    b = max(found, key=lambda b: b['bytes'])
    return dict(shape=hlo_stats.format_shape(b['dtype'], b['dims']), bytes=b['bytes'], op_name=b['op_name'])
  return largest(True), largest(False)


def check_config(config) -> None:
  missing = [k for k in ('batch_size', 'tasks', 'optim', 'mesh', 'total_steps') if k not in config]
  if missing:
    raise ValueError(f'the config has no {missing}: plan compiles a whole train step, so give it a training '
                     'config and swap the model in, e.g. --config configs/clip_digits.py --model ViT-L/14 '
                     '(configs/clip.py:NAME holds only a model)')


def plan_mesh(config, mesh_shape: Sequence[int], devices=None, top_buffers: int = 5) -> MeshPlan:
  """Compiles the train step of `config` on one mesh and measures it."""
  from clip_jax import sharding  # pylint: disable=g-import-not-at-top
  from clip_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  config.unlock()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(n) for n in mesh_shape)
  try:
    s = trainer.setup(config)
  except ValueError as e:
    raise ValueError(f'--mesh {mesh_label(mesh_shape)}: {e}') from None
  if devices is not None:
    s = _on_devices(s, devices)
  # The plan never runs the program, so LLVM need not optimise the host code: at level 0 XLA:CPU
  # compiles in about half the time, with the same optimized HLO and buffer assignment (the HLO
  # passes, which give every figure here, do not depend on it).
  options = {'xla_backend_optimization_level': 0} if s.mesh.devices.flat[0].platform == 'cpu' else None
  start = time.perf_counter()
  with sharding.use(s.mesh, s.rules):
    batch = trainer.abstract_batch(s)
    compiled = trainer.jit_step(s).lower(s.abstract_state, batch).compile(compiler_options=options)
  seconds = time.perf_counter() - start
  module = hlo_stats.parse(compiled.as_text())
  bufs = hlo_stats.buffers(module)
  square, wide = _batch_buffers(bufs, config.batch_size)
  return MeshPlan(mesh=dict(zip(AXES, (int(n) for n in mesh_shape))),
                  parameters=sum(math.prod(x.shape) for x in _leaves(s.abstract_state.params)),
                  memory=_memory(s, batch, compiled), collectives=hlo_stats.collectives(module),
                  largest_buffers=hlo_stats.largest(bufs, top_buffers), batch_square=square, batch_wide=wide,
                  compile_seconds=round(seconds, 2), compiled=compiled)


def plan(config, meshes: Sequence[Sequence[int]], devices=None, top_buffers: int = 5) -> list[MeshPlan]:
  """One MeshPlan per (data, fsdp, tensor) mesh; every mesh must span all devices.

  `devices` (default: this process's) may be compile-only devices of a topology
  (jax.experimental.topologies); the Setup is then built on as many host
  devices and its shardings moved onto them.
  """
  import jax  # pylint: disable=g-import-not-at-top
  check_config(config)
  n = len(devices) if devices is not None else jax.device_count()
  for shape in meshes:
    if math.prod(shape) != n:
      raise ValueError(f'--mesh {mesh_label(shape)} spans {math.prod(shape)} devices but there are {n}; every '
                       'mesh compared must use them all (the CLI creates as many fake devices as the largest '
                       'mesh, so give meshes of one size)')
  if devices is not None and jax.device_count() != n:
    raise ValueError(f'planning for {n} topology devices needs {n} host devices to build the state on, '
                     f'this process has {jax.device_count()} (run it through python -m clip_jax.plan)')
  return [plan_mesh(config, shape, devices, top_buffers) for shape in meshes]


def human(n: Optional[float]) -> str:
  """Bytes in binary units, three significant figures: 6.53 MiB, 104 MiB, 116 GiB."""
  if n is None:
    return 'n/a'
  if abs(n) < 1024:
    return f'{int(n)} B'
  for unit in ('KiB', 'MiB', 'GiB', 'TiB', 'PiB'):
    n /= 1024
    if abs(n) < 1024 or unit == 'PiB':
      return f'{n:.0f} {unit}' if abs(n) >= 100 else f'{n:.1f} {unit}' if abs(n) >= 10 else f'{n:.2f} {unit}'
  raise AssertionError('unreachable')


_MEMORY_ROWS = (('parameters', 'parameters'), ('optimizer state', 'optimizer_state'),
                ('other state (step, rng, ...)', 'other_state'), ('batch', 'batch'),
                ('temporaries (XLA temp)', 'temporaries'), ('total', 'total'))


def _rows(plans: Sequence[MeshPlan], batch_size: int) -> list:
  """(label, [cell per mesh]) rows of the table; cells None make the label a section heading."""
  rows = [('per-device memory', None)]
  for label, key in _MEMORY_ROWS:
    rows.append((f'  {label}', [human(p.memory[key]) for p in plans]))
    if key == 'optimizer_state':
      rows.append(('  parameters + optimizer', [human(p.memory['parameters'] + p.memory['optimizer_state'])
                                                for p in plans]))
      rows.append(('    of which not split by the mesh', [human(p.memory['replicated']) for p in plans]))
  rows.append(('parameters (count)', [f'{p.parameters:,}' for p in plans]))
  rows.append(('collectives per step: count / bytes moved per device', None))
  for kind in hlo_stats.KINDS:
    rows.append((f'  {kind}', [f'{p.collectives[kind]["count"]} / {human(p.collectives[kind]["moved_bytes"])}'
                               for p in plans]))
  rows.append((f'B x B buffer (two dims = {batch_size})',
               [f'{p.batch_square["shape"]} {human(p.batch_square["bytes"])}' if p.batch_square else 'none'
                for p in plans]))
  rows.append((f'largest buffer with a dim = {batch_size}',
               [f'{p.batch_wide["shape"]} {human(p.batch_wide["bytes"])}' if p.batch_wide else 'none'
                for p in plans]))
  rows.append(('compile time', [f'{p.compile_seconds:.1f} s' for p in plans]))
  return rows


def format_table(plans: Sequence[MeshPlan], batch_size: int) -> str:
  heads = [mesh_label(tuple(p.mesh.values())) for p in plans]
  rows = _rows(plans, batch_size)
  first = max(len(label) for label, _ in rows)
  widths = [max([len(h)] + [len(cells[i]) for _, cells in rows if cells]) for i, h in enumerate(heads)]
  line = lambda label, cells: '  '.join([label.ljust(first)] + [c.rjust(w) for c, w in zip(cells, widths)])
  out = [line('', heads)]
  for label, cells in rows:
    out.append(label if cells is None else line(label, cells))
  for head, p in zip(heads, plans):
    out.append(f'\nlargest buffers, {head}:')
    for b in p.largest_buffers:
      where = b['op_name'].split('/')[-3:] if b['op_name'] else [b['opcode']]
      out.append(f'  {b["shape"]:<28} {human(b["bytes"]):>10}  x{b["count"]:<4} {"/".join(where)[-70:]}')
  return '\n'.join(out)


def notes(plans: Sequence[MeshPlan], platform: str) -> str:
  """What the figures mean, and where they come from."""
  out = ['notes:',
         '  state and batch bytes follow from the shardings (exact); temporaries, total and collectives are what '
         f'XLA compiled for {platform}',
         '  total = arguments + outputs not written into donated inputs + temporaries + code '
         '(XLA memory_analysis)',
         '  bytes moved: what one device sends per step under ring algorithms; loops count once per iteration']
  if platform.startswith('fake CPU'):
    out.append('  XLA:TPU/GPU fuse, schedule and rematerialise differently: read temporaries as an estimate')
  found = [p.collectives['reduce-scatter'].get('as_all_reduce', 0) for p in plans]
  if any(found):
    out.append(f'  reduce-scatter: {"/".join(map(str, found))} of them compiled as an all-reduce whose users each '
               'keep one 1/g slice (the form XLA:CPU emits; XLA:TPU/GPU turn it into a reduce-scatter)')
  loops = sorted({name for p in plans for name in p.collectives.get('unknown_trip_loops', [])})
  if loops:
    out.append(f'  while loops of unknown trip count counted once: {loops}')
  return '\n'.join(out)


def topology_devices(name: str) -> list:
  """The compile-only devices of a named topology: 'v5e:16x16' (TPU) or 'cuda:NAME'."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  platform, rest = ('cuda', name.split(':', 1)[1]) if name.startswith(('cuda:', 'gpu:')) else ('tpu', name)
  try:
    return list(topologies.get_topology_desc(rest, platform).devices)
  except Exception as e:  # RuntimeError / NotImplementedError / XlaRuntimeError, depending on what is missing
    raise ValueError(
        f'--topology={name}: JAX cannot build that {platform.upper()} topology here ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}). Compiling for a named topology needs '
        f'{"libtpu (pip install jax[tpu])" if platform == "tpu" else "a CUDA jaxlib"}; leave --topology out to '
        'plan on fake CPU devices (the default).') from None


def describe(config) -> str:
  """One line naming what is planned: towers, dtypes, loss and the step-shaping switches that are set."""
  m = config.model
  v, t = m.vision, m.text
  vision = (f'ViT {v.width}x{v.layers} patch {v.patch_size}' if v.kind == 'vit' else f'ResNet width {v.width}')
  parts = [f'{vision} @{v.image_size}px', f'text {t.width}x{t.layers}', f'{m.param_dtype} params',
           f'{m.dtype} compute']
  parts += [f'model.{k}={m[k]}' for k in ('scan_layers', 'remat') if k in m]
  for name, options in config.tasks.items():
    parts.append(f'{name}: ' + ', '.join(f'{k}={v}' for k, v in options.items() if k != 'weight'))
  return '; '.join(parts)


def _run_config(flag_values):
  """--config with --model swapped in (its --config.model.* overrides re-applied) and --batch_size."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(flag_values.config)
  config.unlock()
  check_config(config)
  if flag_values.model:
    from clip_jax.models import zoo  # pylint: disable=g-import-not-at-top
    try:
      config.model = zoo.get(flag_values.model)
    except ValueError as e:
      raise ValueError(f'--model={flag_values.model}: {e}') from None
    for path, value in config_flags.get_override_values(flag_values['config']).items():
      if path.startswith('model.'):
        node = config
        for part in path.split('.')[:-1]:
          node = node[part]
        node[path.rsplit('.', 1)[1]] = value
  if flag_values.batch_size is not None:
    if flag_values.batch_size < 1:
      raise ValueError(f'--batch_size={flag_values.batch_size} must be positive')
    config.batch_size = flag_values.batch_size
  return config


def _define_flags():
  """The CLI's flags (defined only when run as a program, so importing the library registers none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Training config (configs/*.py[:arg]).', lock_config=True)
  flags.DEFINE_multi_string('mesh', None, 'data=D,fsdp=F,tensor=T; repeat to compare meshes (one column each).')
  flags.DEFINE_string('model', None, "Swap in this zoo model (clip_jax.models.zoo), e.g. 'ViT-L/14'.")
  flags.DEFINE_integer('batch_size', None, 'Global batch size (default: the config\'s).')
  flags.DEFINE_string('topology', None, "Compile for a named topology (jax.experimental.topologies), e.g. "
                      "'v5e:16x16'; needs libtpu (or a CUDA jaxlib for 'cuda:NAME'). Default: fake CPU devices.")
  flags.DEFINE_string('json', None, 'Also write everything to this JSON file.')
  flags.DEFINE_integer('top_buffers', 5, 'How many of the largest buffers to list per mesh.')
  flags.mark_flags_as_required(['config', 'mesh'])


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  fv = flags.FLAGS
  wall = time.perf_counter()
  try:
    meshes = [parse_mesh(m) for m in fv.mesh]
    import jax  # pylint: disable=g-import-not-at-top  (after prepare_devices: see the top of this file)
    config = _run_config(fv)
    devices = topology_devices(fv.topology) if fv.topology else None
    if devices is not None:
      platform = f'{len(devices)} x {devices[0].device_kind} (topology {fv.topology})'
    else:
      platform = f'fake CPU devices ({jax.device_count()} x XLA:CPU host devices)'
    print(f'clip_jax.plan: {fv["config"].config_filename}'
          f'{f", model {fv.model}" if fv.model else ""}, global batch {config.batch_size:,}, {platform}', flush=True)
    print(describe(config), flush=True)
    plans = plan(config, meshes, devices, fv.top_buffers)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  wall = time.perf_counter() - wall
  print()
  print(format_table(plans, config.batch_size))
  print()
  print(notes(plans, platform))
  print(f'\nplanned {len(plans)} mesh(es) in {wall:.0f} s wall time')
  if fv.json:
    out = dict(config=fv['config'].config_filename, model=fv.model, batch_size=config.batch_size,
               platform=platform, description=describe(config), wall_seconds=round(wall, 1),
               meshes=[p.to_dict() for p in plans])
    with open(fv.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=1)
    print(f'wrote {fv.json}')


def _parse_flags(argv):
  """absl's parsing, with an override of a field the config lacks reported as such (not a traceback)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
  except (KeyError, AttributeError) as e:  # raised by config_flags for --config.a.b when a has no b
    text = str(e.args[0]) if e.args else str(e)  # "'chunked'", maybe with a did-you-mean line
    m = re.search(r"'([^']+)'", text)
    field = m.group(1) if m else text
    names = [a.split('=', 1)[0][2:] for a in argv if a.startswith('--config.')]
    bad = next((n for n in names if field in n.split('.')[1:]), 'config.' + field)
    hint = ' '.join(text.splitlines()[1:])
    parts = bad.split('.')
    parent = '.'.join(parts[:parts.index(field, 1)]) if field in parts[1:] else 'config'
    print(f'error: --{bad}: the config has no field {field!r} under {parent!r}'
          f'{f" ({hint})" if hint else ""}; --config.* overrides only change fields the config file '
          'defines, so add it there first', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  prepare_devices(sys.argv)  # first: before absl loads --config, which imports JAX
  _define_flags()
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=_parse_flags)
