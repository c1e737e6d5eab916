"""Batched, jitted feature extraction for evaluation (any mesh, any dataset size)."""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.data import transforms
from clip_jax.evaluate import zeroshot


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


@functools.lru_cache(maxsize=8)
def _image_encoder(model, normalized: bool = False) -> Callable:
  """One jitted encoder per model (modules hash by their fields), so periodic evals compile once."""
  prepare = (lambda x: x) if normalized else transforms.normalize
  return jax.jit(lambda v, x: model.apply(v, prepare(x), normalize=True, method='encode_image'))


def image_features(model, variables, images: np.ndarray, batch_size: int = 256,
                   normalized: bool = False) -> np.ndarray:
  """L2-normalised features of NHWC images: uint8 (normalised with CLIP's mean/std here), or
  float already normalised (`normalized=True`, e.g. from transforms.preprocess)."""
  fn = _image_encoder(model, normalized)
  return _batched(lambda x: fn(variables, jnp.asarray(x)), images, batch_size)


def text_features(model, variables, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """L2-normalised features of int32 token rows."""
  encode = zeroshot.text_encoder(model, variables)
  feats = _batched(lambda t: encode(jnp.asarray(t, jnp.int32)), tokens, batch_size)
  return feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
