"""The transformer MLP: c_fc -> activation -> c_proj."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers import activations
from clip_jax.layers.initializers import normal


class Mlp(nn.Module):
  hidden: int
  act: str = 'quick_gelu'
  fc_std: Optional[float] = None    # default: (2 * width) ** -0.5, as open_clip
  proj_std: Optional[float] = None  # default: width ** -0.5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(normal(self.fc_std or (2 * width) ** -0.5), ('embed', 'mlp')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)), name='c_fc')(x)
    h = nn.with_logical_constraint(activations.get(self.act)(h), ('act_batch', 'act_length', 'act_mlp'))
    out = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.with_logical_partitioning(normal(self.proj_std or width ** -0.5), ('mlp', 'embed')),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)), name='c_proj')(h)
    return nn.with_logical_constraint(out, ('act_batch', 'act_length', 'act_embed'))
