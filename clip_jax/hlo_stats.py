"""What an optimized, SPMD-partitioned HLO module does per device: its collectives and its buffers.

`compiled.as_text()` of a jitted step is the program one device runs. Reading
it (rather than trusting a model of what GSPMD *should* do) tells a run's
planner which collectives the compiler really placed and which arrays it
really materialised. Pure text processing: no JAX import, so it also reads
HLO dumped elsewhere (e.g. `XLA_FLAGS=--xla_dump_to`).

Accounting conventions:
  - A collective inside a `while` body runs once per iteration: its counts and
    bytes are multiplied by the loop's `known_trip_count` (1, and flagged, when
    XLA does not know it).
  - "moved" bytes are what one device sends under a ring algorithm over a group
    of g devices: all-gather and reduce-scatter (g-1)/g of the full array,
    all-reduce 2(g-1)/g of it, all-to-all (g-1)/g of its buffer, a
    collective-permute its whole buffer. "buffer" bytes are the full array.
  - XLA:CPU never forms reduce-scatter: it emits an all-reduce whose consumers
    each keep this device's 1/g slice (they read `partition-id`). XLA:TPU/GPU
    rewrite exactly that pattern into a reduce-scatter, so it is counted as one
    (and reported in `as_all_reduce`).
"""

import collections
import dataclasses
import math
import re
from typing import Optional

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*')
_OPERAND = re.compile(r'%([\w.\-]+)')
_CALLEES = re.compile(r'\b(body|condition|calls|to_apply|branch_computations|true_computation|false_computation)='
                      r'(\{[^}]*\}|%?[\w.\-]+)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# No buffer of their own: views, loop plumbing, the inputs themselves, markers.
_NOT_BUFFERS = ('parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant', 'while', 'conditional', 'call',
                'after-all', 'partition-id', 'replica-id')


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str      # the result shape as printed, e.g. 'f32[8,64]{1,0}' or '(f32[], f32[64]{0})'
  opcode: str
  operands: list  # names of the operand instructions
  attrs: str      # everything after the operand list


@dataclasses.dataclass
class Module:
  computations: dict  # name -> [Instruction], in text order (callees before callers)
  entry: str
  num_partitions: int


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, '{': 1, '[': 1, ')': -1, '}': -1, ']': -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def _parse_instruction(line: str) -> Optional[Instruction]:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  pos = m.end()
  if line.startswith('(', pos):
    end = _balanced(line, pos)
  else:
    end = line.find(' ', pos)
  shape, rest = line[pos:end], line[end:].lstrip()
  paren = rest.find('(')
  if paren < 0:
    return None
  close = _balanced(rest, paren)
  return Instruction(m.group(1), shape, rest[:paren], _OPERAND.findall(rest[paren:close]), rest[close:])


def parse(text: str) -> Module:
  """Splits HLO text into computations of instructions."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith('HloModule'):
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
    elif line.startswith('}'):
      current = None
    else:
      inst = _parse_instruction(line)
      if inst is not None:
        computations[current].append(inst)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text (is it the output of compiled.as_text()?)')
  m = re.search(r'num_partitions=(\d+)', text.split('\n', 1)[0])
  return Module(computations, entry, int(m.group(1)) if m else 1)


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in a (possibly tuple) shape string; tokens and opaque types have none."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES or dtype.startswith('f8'):
      out.append((dtype, tuple(int(d) for d in dims.split(',') if d)))
  return out


def nbytes(dtype: str, dims: tuple[int, ...]) -> int:
  return int(math.ceil(_DTYPE_BYTES.get(dtype, 1) * math.prod(dims)))


def shape_bytes(shape: str) -> int:
  return sum(nbytes(d, s) for d, s in arrays(shape))


def multiplicities(module: Module) -> tuple[dict, list]:
  """How often each computation runs per execution of ENTRY, and the while loops of unknown trip count."""
  times = collections.defaultdict(int)
  times[module.entry] = 1
  unknown = []
  # Text order puts callees before callers, so walking it backwards visits every caller first.
  for comp in reversed(list(module.computations)):
    if not times[comp]:
      continue
    for inst in module.computations[comp]:
      trips = 1
      if inst.opcode == 'while':
        m = _TRIP_COUNT.search(inst.attrs)
        if m:
          trips = int(m.group(1))
        else:
          unknown.append(inst.name)
      for attr, value in _CALLEES.findall(inst.attrs):
        for callee in _OPERAND.findall(value) or [value.lstrip('%')]:
          times[callee] += times[comp] * (trips + 1 if attr == 'condition' else trips)
  return dict(times), unknown


def group_size(attrs: str, num_partitions: int) -> int:
  """Devices per replica group, from any of the printed forms of `replica_groups`."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
  if m:  # mesh['axis_0'=8,'axis_1'=2] {'axis_0'} (sub-axes as 'axis_0':(1)4)
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    size = 1
    for axis, sub in re.findall(r"'([^']+)'(?::\(\d+\)(\d+))?", m.group(2)):
      size *= int(sub) if sub else sizes.get(axis, 1)
    return size
  m = re.search(r'replica_groups=\[([\d,]+)\]<=', attrs)
  if m:  # iota form: [groups, size]<=[devices]
    return int(m.group(1).split(',')[-1])
  m = re.search(r'replica_groups=\{\{([\d,\s]*)\}', attrs)
  if m:
    return len([d for d in m.group(1).split(',') if d.strip()])
  return num_partitions  # replica_groups={}: every device


def _users(instructions: list) -> dict:
  users = collections.defaultdict(list)
  for inst in instructions:
    for name in inst.operands:
      users[name].append(inst)
  return users


def _keeps_one_slice(inst: Instruction, element: tuple, g: int, users: dict, opcodes: dict) -> bool:
  """True when every consumer of this all-reduce result keeps only this device's 1/g of it."""
  consumers = users.get(inst.name, [])
  if not consumers:
    return False
  want = math.prod(element[1]) // g
  for user in consumers:
    outs = arrays(user.shape)
    reads_device = any(opcodes.get(o) == 'partition-id' for o in user.operands)
    if user.opcode == 'get-tuple-element' or not reads_device or len(outs) != 1 or math.prod(outs[0][1]) != want:
      return False
  return True


def _elements(inst: Instruction, users: dict) -> list:
  """(array, the instruction whose users consume it) for each result of a (tuple) all-reduce."""
  shapes = arrays(inst.shape)
  if not inst.shape.startswith('('):
    return [(shapes[0], inst)] if shapes else []
  by_index = {}
  for user in users.get(inst.name, []):
    m = re.search(r'index=(\d+)', user.attrs)
    if user.opcode == 'get-tuple-element' and m:
      by_index[int(m.group(1))] = user
  return [(s, by_index.get(i)) for i, s in enumerate(shapes)]


def collectives(module: Module) -> dict:
  """kind -> {count, buffer_bytes, moved_bytes} per step, plus `as_all_reduce` and `unknown_trip_loops`."""
  times, unknown = multiplicities(module)
  out = {k: dict(count=0, buffer_bytes=0, moved_bytes=0) for k in KINDS}
  out['reduce-scatter']['as_all_reduce'] = 0
  for name, comp in module.computations.items():
    n = times.get(name, 0)
    if not n:
      continue
    shapes = {i.name: i.shape for i in comp}
    opcodes = {i.name: i.opcode for i in comp}
    users = None
    for inst in comp:
      kind = inst.opcode[:-len('-start')] if inst.opcode.endswith('-start') else inst.opcode
      if kind not in KINDS:
        continue
      g = group_size(inst.attrs, module.num_partitions)
      operand_bytes = sum(shape_bytes(shapes.get(o, '')) for o in inst.operands)
      if kind == 'all-reduce':
        users = users if users is not None else _users(comp)
        parts = collections.Counter()
        for element, holder in _elements(inst, users):
          scattered = g > 1 and holder is not None and _keeps_one_slice(holder, element, g, users, opcodes)
          parts['reduce-scatter' if scattered else 'all-reduce'] += nbytes(*element)
        for part, size in parts.items():
          _add(out[part], n, size, size * (g - 1) / g * (2 if part == 'all-reduce' else 1))
          if part == 'reduce-scatter':
            out[part]['as_all_reduce'] += n
      elif kind == 'all-gather':
        _add(out[kind], n, operand_bytes * g, operand_bytes * (g - 1))
      elif kind == 'reduce-scatter':
        _add(out[kind], n, operand_bytes, operand_bytes * (g - 1) / g)
      elif kind == 'all-to-all':
        _add(out[kind], n, operand_bytes, operand_bytes * (g - 1) / g)
      else:
        _add(out[kind], n, operand_bytes, operand_bytes)
  out['unknown_trip_loops'] = unknown
  return out


def _add(row: dict, times: int, buffer_bytes: float, moved: float) -> None:
  row['count'] += times
  row['buffer_bytes'] += int(times * buffer_bytes)
  row['moved_bytes'] += int(round(times * moved))


def materialized(module: Module) -> set:
  """Computations whose instructions own buffers: ENTRY and control flow, not fusion bodies or reducers."""
  keep = {module.entry}
  for comp in reversed(list(module.computations)):
    if comp not in keep:
      continue
    for inst in module.computations[comp]:
      if inst.opcode in ('while', 'conditional', 'call'):
        for _, value in _CALLEES.findall(inst.attrs):
          keep.update(_OPERAND.findall(value) or [value.lstrip('%')])
  return keep


def buffers(module: Module) -> list[dict]:
  """Every array an instruction of a materialised computation produces: dtype, dims, bytes, opcode, op_name."""
  out = []
  for comp in materialized(module):
    for inst in module.computations[comp]:
      if inst.opcode in _NOT_BUFFERS or inst.opcode.endswith('-done'):
        continue
      m = _OP_NAME.search(inst.attrs)
      for dtype, dims in arrays(inst.shape):
        out.append(dict(dtype=dtype, dims=dims, bytes=nbytes(dtype, dims), opcode=inst.opcode,
                        op_name=m.group(1) if m else ''))
  return out


def largest(bufs: list[dict], top: int = 5) -> list[dict]:
  """The `top` largest distinct shapes, each with how many buffers have it."""
  groups = {}
  for b in sorted(bufs, key=lambda b: -b['bytes']):
    key = (b['dtype'], b['dims'])
    if key in groups:
      groups[key]['count'] += 1
    elif len(groups) < top:
      groups[key] = dict(b, shape=format_shape(*key), count=1)
  return list(groups.values())


def format_shape(dtype: str, dims: tuple) -> str:
  return f'{dtype}[{",".join(map(str, dims))}]'
