"""Multi-head attention with a packed q/k/v projection.

The q/k/v kernel is one [embed, 3, heads, head_dim] tensor, the same layout as
PyTorch's packed `in_proj_weight` (q, k, v order), so one matmul computes all
three and conversion is a reshape. The attention itself goes through
`jax.nn.dot_product_attention`, which picks a fused kernel where the platform
has one and computes the softmax in float32.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.layers.dense import DenseGeneral


class MultiHeadAttention(nn.Module):
  num_heads: int
  out_features: Optional[int] = None  # default: the input width
  qkv_std: Optional[float] = None     # default: width ** -0.5
  out_std: Optional[float] = None
  implementation: Optional[str] = None  # jax.nn.dot_product_attention's: None, 'xla', 'cudnn'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, causal: bool = False, num_queries: Optional[int] = None):
    """x: [batch, length, width]. `num_queries` keeps only the first queries
    (attention pooling asks for one); keys and values always span `length`."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'attention width {width} is not divisible by heads={self.num_heads}')
    head_dim = width // self.num_heads
    std = width ** -0.5
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = DenseGeneral((3, self.num_heads, head_dim), 1, ('embed', 'qkv', 'heads', 'kv'), ('qkv', 'heads', 'kv'),
                       self.qkv_std or std, name='qkv', **kw)(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if num_queries is not None:
      q = q[:, :num_queries]
    constrain = lambda t: nn.with_logical_constraint(t, ('act_batch', 'act_length', 'act_heads', 'act_kv'))
    out = jax.nn.dot_product_attention(constrain(q), constrain(k), constrain(v), is_causal=causal,
                                       implementation=self.implementation)
    out = DenseGeneral((self.out_features or width,), 2, ('heads', 'kv', 'embed'), ('embed',),
                       self.out_std or std, name='out', **kw)(out)
    return nn.with_logical_constraint(out, ('act_batch', 'act_length', 'act_embed'))
