"""LayerNorm computed in float32 whatever the compute dtype."""

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers.initializers import param_with_axes


class LayerNorm(nn.Module):
  """LayerNorm with CLIP's eps (1e-5), statistics always in float32.

  Flax's default eps is 1e-6 and its dtype argument controls the statistics'
  precision too; both silently break parity with the PyTorch models, so the
  towers use this one.
  """
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (features,), self.param_dtype, ('norm',))
    bias = param_with_axes(self, 'bias', nn.initializers.zeros, (features,), self.param_dtype, ('norm',))
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)
