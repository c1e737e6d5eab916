"""Batched, jitted feature extraction for evaluation (any mesh, any dataset size, any
number of processes).

Evaluation inputs are host numpy arrays that every process holds in full.
When the variables live on a mesh (during training) the inputs are split over
its batch axes and the features come back replicated, so every process can
read them: the same code serves one CPU and a multi-host pod.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clip_jax import sharding
from clip_jax.data import transforms


def _batched(fn: Callable, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """Runs `fn` over fixed-size batches (the last one padded) so it compiles once."""
  outputs = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    outputs.append(np.asarray(fn(chunk))[:n])
  return np.concatenate(outputs)


def mesh_of(variables) -> Optional[Mesh]:
  """The mesh the variables are laid out on (None for host or single-device arrays)."""
  for leaf in jax.tree.leaves(variables):
    named = getattr(leaf, 'sharding', None)
    if isinstance(named, NamedSharding) and named.mesh.devices.size > 1:
      return named.mesh
  return None


def place(x: np.ndarray, mesh: Optional[Mesh]):
  """A host array every process holds in full -> a device array on `mesh`, split over its batch
  axes where the rows divide evenly (replicated otherwise)."""
  if mesh is None:
    return jnp.asarray(x)
  spec = sharding.batch_sharding(mesh, x.ndim)
  if x.shape[0] % sharding.batch_divisor(mesh):
    spec = NamedSharding(mesh, PartitionSpec())
  return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])


@functools.lru_cache(maxsize=16)
def jitted(model, method: str, mesh: Optional[Mesh], uint8_images: bool = False, **kwargs) -> Callable:
  """`model.apply(v, x, method=method, **kwargs)` jitted once per (model, method, mesh) (modules hash
  by their fields, so periodic evals compile once); outputs replicated on the mesh. With
  `uint8_images` the CLIP normalisation runs on device (a quarter of the bytes to transfer)."""
  out = None if mesh is None else NamedSharding(mesh, PartitionSpec())
  prepare = transforms.normalize if uint8_images else (lambda x: x)
  return jax.jit(lambda v, x: model.apply(v, prepare(x), method=method, **kwargs), out_shardings=out)


def encoder(model, variables, method: str, **kwargs) -> Callable[[np.ndarray], np.ndarray]:
  """x (host numpy, the same on every process) -> host numpy features."""
  mesh = mesh_of(variables)
  fn = jitted(model, method, mesh, **kwargs)
  return lambda x: np.asarray(fn(variables, place(np.asarray(x), mesh)))


def image_features(model, variables, images: np.ndarray, batch_size: int = 256,
                   normalized: bool = False) -> np.ndarray:
  """L2-normalised features of NHWC images: uint8 (normalised with CLIP's mean/std here), or
  float already normalised (`normalized=True`, e.g. from transforms.preprocess)."""
  encode = encoder(model, variables, 'encode_image', uint8_images=not normalized, normalize=True)
  return _batched(encode, images, batch_size)


def text_features(model, variables, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """L2-normalised features of int32 token rows."""
  encode = encoder(model, variables, 'encode_text', normalize=True)
  return _batched(lambda t: encode(np.asarray(t, np.int32)), tokens, batch_size)
