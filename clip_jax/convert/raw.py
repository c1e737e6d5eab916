"""clip_jax's own safetensors file: the variables as they are, plus the model config.

Keys are the variable paths joined with '/' ('params/vision/conv1/kernel',
'batch_stats/vision/bn1/mean'), values are the arrays bitwise, in the run's
layout (scan_layers stacks stay stacked). The safetensors metadata holds
'clip_jax_model_config' (the model config as JSON), so the file stands alone.
"""

import json
from typing import Mapping, Optional

import jax
import ml_collections
import numpy as np

from clip_jax.convert import io

CONFIG_KEY = 'clip_jax_model_config'


def flatten(variables: Mapping) -> dict[str, np.ndarray]:
  """{'/'-joined path: host array}, read off one leaf at a time (sharded leaves are gathered one by one)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(variables)
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(jax.device_get(leaf)) for path, leaf in flat}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  out = {}
  for key, value in flat.items():
    node = out
    *parents, name = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = value
  return out


def save(path: str, model_config: ml_collections.ConfigDict, variables: Mapping,
         metadata: Optional[Mapping[str, str]] = None) -> None:
  meta = {CONFIG_KEY: model_config.to_json_best_effort(), **(metadata or {})}
  io.save_safetensors(flatten(variables), path, metadata=meta)


def load(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(model config, variables) from a file `save` wrote."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework='numpy') as f:
    meta = f.metadata() or {}
  if CONFIG_KEY not in meta:
    raise ValueError(f'{path!r} has no {CONFIG_KEY!r} metadata: not a clip_jax safetensors export (python -m '
                     'clip_jax.export --format safetensors); an open_clip state dict goes in config.init.open_clip')
  config = checkpoint.config_from_json(json.loads(meta[CONFIG_KEY]))
  return config, unflatten(io.load(path))
