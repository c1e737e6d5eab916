"""The two-tower CLIP model: an image tower, a text tower, a learnable temperature."""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.layers.initializers import param_with_axes

# exp(logit_scale) is capped at 100, as in CLIP, so the softmax cannot sharpen without bound.
MAX_LOGIT_SCALE = 100.0


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


class CLIP(nn.Module):
  """`apply(variables, images, tokens)` -> (image features, text features, logit scale[, logit bias]).

  Features are L2-normalised float32; the scale is exp(logit_scale) capped at
  100. A logit bias exists only when `init_logit_bias` is set (SigLIP) and is
  then returned fourth, as open_clip does.
  """
  vision: nn.Module
  text: nn.Module
  image_size: int
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: Optional[float] = None

  def setup(self):
    self.logit_scale = param_with_axes(self, 'logit_scale', nn.initializers.constant(self.init_logit_scale), (),
                                       jnp.float32, ())
    if self.init_logit_bias is not None:
      self.logit_bias = param_with_axes(self, 'logit_bias', nn.initializers.constant(self.init_logit_bias), (),
                                        jnp.float32, ())

  def _check_images(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be float NHWC [batch, {self.image_size}, {self.image_size}, 3]; '
                       f'got shape {tuple(images.shape)} (channels-first input? transpose to NHWC)')
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'images are {images.shape[1]}x{images.shape[2]} but the model expects '
                       f'{self.image_size}x{self.image_size}; resize/crop them with clip_jax.data.transforms')

  def _check_tokens(self, tokens):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be integer [batch, length]; got {tokens.dtype} {tuple(tokens.shape)}')
    if tokens.shape[1] > self.text.context_length:
      raise ValueError(f'tokens have length {tokens.shape[1]} > context_length {self.text.context_length}; '
                       'tokenize with context_length=' + str(self.text.context_length))
    if _is_concrete(tokens):  # numpy, not jnp: inside a trace jnp ops on constants become tracers
      ids = np.asarray(tokens)
      bad = (ids < 0) | (ids >= self.text.vocab_size)
      if bad.any():
        rows = sorted(set(np.nonzero(bad)[0].tolist()))[:8]
        raise ValueError(f'token ids outside the vocabulary [0, {self.text.vocab_size}) in rows {rows}: '
                         f'e.g. {ids[bad][:4].tolist()}')

  def encode_image(self, images, *, train: bool = False, normalize: bool = False):
    self._check_images(images)
    features = self.vision(images, train=train)
    return l2_normalize(features) if normalize else features

  def encode_text(self, tokens, *, normalize: bool = False):
    self._check_tokens(tokens)
    features = self.text(tokens)
    return l2_normalize(features) if normalize else features

  def scale_and_bias(self):
    scale = jnp.minimum(jnp.exp(self.logit_scale), MAX_LOGIT_SCALE)
    return (scale,) if self.init_logit_bias is None else (scale, self.logit_bias)

  def __call__(self, images, tokens, *, train: bool = False):
    image_features = self.encode_image(images, train=train, normalize=True)
    text_features = self.encode_text(tokens, normalize=True)
    return (image_features, text_features, *self.scale_and_bias())
