"""Loop <-> scanned layouts of the transformer towers' variables.

With `model.scan_layers=False` a tower's blocks live at
`<tower>/transformer/resblocks_{i}/...`; with True, one `nn.scan` owns them at
`<tower>/transformer/resblocks/...`, every leaf with a leading [layers] axis.
The two compute the same function, so a checkpoint or a converted state dict
moves between them by stacking and slicing: bit for bit, no re-initialisation.
The converters map PyTorch names to the loop layout and use these to serve
scanned configs.

Both functions take unboxed variables (numpy or jax arrays; `nn.unbox` a
freshly initialised tree first) and leave every other entry untouched.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

_STACKED = 'resblocks'


def _towers(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """(tower, depth) of every transformer stack `scan_layers` affects (not a ModifiedResNet)."""
  towers = [('text', config.text.layers)]
  if config.vision.kind == 'vit':
    towers.insert(0, ('vision', config.vision.layers))
  return towers


def _check_unboxed(tree) -> None:
  boxed = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  if any(isinstance(x, nn.meta.AxisMetadata) for x in boxed):
    raise ValueError('layout: variables carry partitioning boxes; pass nn.unbox(variables)')


def _stack(leaves):
  # numpy stays numpy (host checkpoints, converters); anything else becomes a jax array.
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _with_transformer(variables: Mapping, tower: str, transformer: dict, collection: str) -> dict:
  """A copy of `variables` with `collection/tower/transformer` replaced (only that path is copied)."""
  out = dict(variables)
  out[collection] = dict(out[collection])
  out[collection][tower] = dict(out[collection][tower])
  out[collection][tower]['transformer'] = transformer
  return out


def _stacks(variables: Mapping, config: ml_collections.ConfigDict):
  """(collection, tower, depth, transformer subtree) for every stack present; params must have them all."""
  for collection, tree in variables.items():
    for tower, depth in _towers(config):
      transformer = tree.get(tower, {}).get('transformer') if isinstance(tree, Mapping) else None
      if transformer is None:
        if collection == 'params':
          raise ValueError(f'layout: params/{tower}/transformer is missing; are these variables of this config '
                           f'(model.vision.kind={config.vision.kind!r})?')
        continue
      yield collection, tower, depth, transformer


def stack_layers(variables: Mapping, config: ml_collections.ConfigDict) -> dict:
  """Loop layout (resblocks_{i}) -> scanned layout (resblocks, leading [layers] axis)."""
  _check_unboxed(variables)
  out = dict(variables)
  for collection, tower, depth, transformer in _stacks(variables, config):
    where = f'{collection}/{tower}/transformer'
    if _STACKED in transformer:
      raise ValueError(f'layout: {where} is already in the scanned layout ({_STACKED}); '
                       'stack_layers takes loop-layout variables')
    names = [f'resblocks_{i}' for i in range(depth)]
    missing = [n for n in names if n not in transformer]
    extra = sorted(set(transformer) - set(names))
    if missing or extra:
      raise ValueError(f'layout: {where} has blocks {sorted(transformer)} but the config has {depth} layers '
                       f'(missing {missing}, unexpected {extra})')
    stacked = jax.tree.map(lambda *xs: _stack(xs), *(transformer[n] for n in names))
    out = _with_transformer(out, tower, {_STACKED: stacked}, collection)
  return out


def unstack_layers(variables: Mapping, config: ml_collections.ConfigDict) -> dict:
  """Scanned layout (resblocks, leading [layers] axis) -> loop layout (resblocks_{i})."""
  _check_unboxed(variables)
  out = dict(variables)
  for collection, tower, depth, transformer in _stacks(variables, config):
    where = f'{collection}/{tower}/transformer'
    if set(transformer) != {_STACKED}:
      raise ValueError(f'layout: {where} has {sorted(transformer)}, not the scanned layout ({_STACKED}); '
                       'unstack_layers takes scanned-layout variables')
    stacked = transformer[_STACKED]
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stacked)}
    if sizes != {depth}:
      raise ValueError(f'layout: {where}/{_STACKED} has leading sizes {sorted(sizes, key=str)} but the config '
                       f'has {depth} layers')
    blocks = {f'resblocks_{i}': jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)}
    out = _with_transformer(out, tower, blocks, collection)
  return out


def to_loop(variables: Mapping, config: ml_collections.ConfigDict) -> Any:
  """`variables` of `config` in the loop layout, whichever layout the config uses (for exporters)."""
  return unstack_layers(variables, config) if config.get('scan_layers', False) else variables


def from_loop(variables: Mapping, config: ml_collections.ConfigDict) -> Any:
  """Loop-layout `variables` in the layout `config` uses (for importers)."""
  return stack_layers(variables, config) if config.get('scan_layers', False) else variables

