"""A projection over several trailing axes into several output axes.

Used for attention's [embed] -> [3, heads, head_dim] and [heads, head_dim] ->
[embed] projections. Flax's DenseGeneral initialises its kernel flat and
reshapes it, which breaks logical sharding constraints under an active mesh;
this one creates the kernel at its real shape.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.layers.initializers import normal, param_with_axes


class DenseGeneral(nn.Module):
  features: Sequence[int]
  num_contract: int               # how many trailing input axes are contracted
  kernel_axes: Sequence[str]      # logical names: contracted axes, then feature axes
  bias_axes: Sequence[str]
  kernel_std: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.num_contract:]
    kernel = param_with_axes(self, 'kernel', normal(self.kernel_std), in_shape + features, self.param_dtype,
                             tuple(self.kernel_axes))
    bias = param_with_axes(self, 'bias', nn.initializers.zeros, features, self.param_dtype, tuple(self.bias_axes))
    contract = tuple(range(x.ndim - self.num_contract, x.ndim))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((contract, tuple(range(self.num_contract))), ((), ())))
    return y + bias.astype(self.dtype)
