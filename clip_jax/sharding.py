"""Device meshes and the one table of logical sharding rules.

Every parameter is created with a tuple of *logical* axis names
(`nn.with_logical_partitioning`) and activations are pinned with
`nn.with_logical_constraint`. This module maps those names onto the mesh axes
('data', 'fsdp', 'tensor'). Nothing else in the library writes a
PartitionSpec by hand.

Parameters and activations use different logical names on purpose: a
parameter's embedding dimension is split over 'fsdp' (ZeRO-3 style), while an
activation's batch dimension is split over ('data', 'fsdp') and its embedding
dimension is left whole.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical name -> mesh axis (or axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # --- parameters ---
    ('embed', 'fsdp'),        # model width of weight matrices
    ('mlp', 'tensor'),        # MLP hidden width
    ('heads', 'tensor'),      # attention heads
    ('kv', None),             # per-head width
    ('vocab', 'tensor'),      # token-embedding rows
    ('joint', None),          # shared image-text embedding dimension
    ('conv_in', None),        # conv input channels
    ('conv_out', 'fsdp'),     # conv output channels
    ('norm', None),           # norm scales / biases
    ('qkv', None),            # the size-3 q/k/v axis of packed projections
    ('pos', None),            # positional-embedding rows
    ('layers', None),         # the stacked-blocks axis of scanned transformers (scan_layers)
    # --- activations ---
    ('act_batch', BATCH_AXES),
    ('act_length', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_kv', None),
)


def axis_rules(overrides: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
  """The rules table with per-run overrides (`config.mesh.rules`) applied first."""
  if not overrides:
    return LOGICAL_AXIS_RULES
  known = {name for name, _ in LOGICAL_AXIS_RULES}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f'mesh.rules names unknown logical axes {unknown}; known axes: {sorted(known)}')
  for name, target in overrides.items():
    for axis in (target if isinstance(target, (tuple, list)) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'mesh.rules[{name!r}] = {target!r}: mesh axes are {MESH_AXES} or None')
  return tuple((name, overrides.get(name, target)) for name, target in LOGICAL_AXIS_RULES)


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1,
               num_devices: int | None = None) -> tuple[int, int, int]:
  """Resolves (data, fsdp, tensor), at most one of them -1 ("the rest")."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {'data': data, 'fsdp': fsdp, 'tensor': tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f'mesh: only one of data/fsdp/tensor may be -1, got {sizes}')
  for k, v in sizes.items():
    if v != -1 and v < 1:
      raise ValueError(f'mesh.{k} = {v}: use a positive size or -1 for "the rest"')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if n % fixed:
      raise ValueError(f'mesh: {n} devices are not divisible by the fixed axes '
                       f'{ {k: v for k, v in sizes.items() if v != -1} } (product {fixed})')
    sizes[free[0]] = n // fixed
  total = math.prod(sizes.values())
  if total != n:
    raise ValueError(f'mesh: data*fsdp*tensor = {total} but there are {n} devices; '
                     'set the sizes so their product is the device count, or one of them to -1')
  return sizes['data'], sizes['fsdp'], sizes['tensor']


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; tensor varies fastest (nearest devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, tensor, num_devices=len(devices))
  try:
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # unusual topologies (or fake CPU devices): fall back to plain order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _divisible_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (those stay replicated).

  Small tensors (RGB conv inputs, a 3-way qkv axis, tiny test widths) cannot be
  split evenly; replicating them costs little and keeps one rules table valid
  for every model size.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    size = 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return PartitionSpec(*out)


def logical_sharding(logical_tree: Any, shapes_tree: Any, mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a tree of logical PartitionSpecs and matching shapes."""
  mesh_specs = nn.logical_to_mesh(logical_tree, rules)

  def one(spec, leaf):
    shape = np.shape(leaf) if not hasattr(leaf, 'shape') else leaf.shape
    spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    return NamedSharding(mesh, _divisible_spec(spec, shape, mesh))

  return jax.tree.map(one, mesh_specs, shapes_tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def variables_sharding(module: nn.Module, mesh: Mesh, *init_args,
                       rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES, **init_kwargs) -> Any:
  """Shardings of `module.init(rng, *init_args)`'s variables, from their logical names."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args, **init_kwargs))
  logical = nn.get_partition_spec(abstract)
  return logical_sharding(logical, nn.unbox(abstract), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


@contextlib.contextmanager
def use(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
  """Makes `mesh` and `rules` current, so activation constraints apply while tracing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh
