"""Pre-LayerNorm residual blocks and the stack of them both CLIP towers use."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers.attention import MultiHeadAttention
from clip_jax.layers.mlp import Mlp
from clip_jax.layers.norms import LayerNorm


class ResidualBlock(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x))."""
  num_heads: int
  mlp_dim: int
  act: str = 'quick_gelu'
  ln_eps: float = 1e-5
  attn_out_std: Optional[float] = None
  mlp_proj_std: Optional[float] = None
  attn_implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, causal: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: LayerNorm(epsilon=self.ln_eps, name=name, **kw)
    x = x + MultiHeadAttention(self.num_heads, out_std=self.attn_out_std,
                               implementation=self.attn_implementation, name='attn', **kw)(ln('ln_1')(x), causal=causal)
    x = x + Mlp(self.mlp_dim, act=self.act, proj_std=self.mlp_proj_std, name='mlp', **kw)(ln('ln_2')(x))
    return x


class Transformer(nn.Module):
  """`layers` residual blocks, named resblocks_0 ... resblocks_{layers-1}."""
  layers: int
  num_heads: int
  mlp_dim: int
  act: str = 'quick_gelu'
  ln_eps: float = 1e-5
  attn_implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, causal: bool = False):
    width = x.shape[-1]
    # open_clip's scheme: residual-branch outputs shrink with depth.
    proj_std = width ** -0.5 * (2 * self.layers) ** -0.5
    for i in range(self.layers):
      x = ResidualBlock(self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
                        attn_out_std=proj_std, mlp_proj_std=proj_std,
                        attn_implementation=self.attn_implementation,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f'resblocks_{i}')(x, causal=causal)
    return x
