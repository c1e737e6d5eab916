"""Initialising a model's towers from a CLIP checkpoint's variables.

LSeg's and ViLD's image encoders (and LSeg's text tower) are CLIP's towers
under the same names ('vision', 'text'), so their parameters can be copied
leaf by leaf from a CLIP variables tree of the matching config.
"""

from typing import Sequence

import flax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def _is_box(x) -> bool:
  return isinstance(x, flax.core.meta.AxisMetadata)


def copy_towers(variables, clip_variables, towers: Sequence[str], model: str, config_hint: str):
  """`variables` with each of `towers` copied from `clip_variables`; see LSeg's `init_from_clip`.

  Every parameter of the model's towers must exist in CLIP's with the same
  shape; CLIP parameters the model does not use (e.g. the ViT's ln_post and
  proj when only hooked blocks are read) are left out. Values are copied as
  they are (bitwise; cast only if the dtypes differ) and boxed (logically
  partitioned) leaves stay boxed. Returns a new tree; raises ValueError
  listing every missing or mis-shaped parameter.
  """
  clip_params = nn.unbox(clip_variables)['params']
  params = dict(variables['params'])
  problems = []
  for tower in towers:
    if tower not in params or tower not in clip_params:
      where = model if tower not in params else 'CLIP'
      raise ValueError(f'init_from_clip: params/{tower} is missing from the {where} variables; pass the '
                       f'variables of the {model} model and of the CLIP model built from {config_hint}')
    source = flax.traverse_util.flatten_dict(flax.core.unfreeze(clip_params[tower]))
    target = flax.traverse_util.flatten_dict(flax.core.unfreeze(params[tower]), is_leaf=lambda _, x: _is_box(x))
    copied = {}
    for path, leaf in target.items():
      name = '/'.join(('params', tower) + path)
      value = leaf.unbox() if _is_box(leaf) else leaf
      if path not in source:
        problems.append(f'{name}: not in the CLIP variables')
        continue
      src = source[path]
      if tuple(np.shape(src)) != tuple(np.shape(value)):
        problems.append(f'{name}: shape {tuple(np.shape(value))} in {model} but {tuple(np.shape(src))} in CLIP')
        continue
      src = src if src.dtype == value.dtype else jnp.asarray(src, value.dtype)
      copied[path] = leaf.replace_boxed(src) if _is_box(leaf) else src
    params[tower] = flax.traverse_util.unflatten_dict(copied)
  if problems:
    shown = '\n  '.join(problems[:20]) + (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else '')
    raise ValueError(f'init_from_clip: the CLIP variables do not match the {model} towers (build CLIP from '
                     f'{config_hint}; scan_layers layouts convert with clip_jax.models.layout):\n  {shown}')
  out = dict(variables)
  out['params'] = params
  return out
