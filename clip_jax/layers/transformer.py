"""Pre-LayerNorm residual blocks and the stack of them both CLIP towers use."""

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers import remat as remat_lib
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
  """`layers` residual blocks.

  Two parameter layouts, chosen by `scan_layers`:
    False: a Python loop over blocks named resblocks_0 ... resblocks_{layers-1}
           (the layout the converters map to PyTorch names);
    True:  one `nn.scan` over a single block named `resblocks` whose parameters
           carry a leading [layers] axis (logical name 'layers'): the block is
           traced and compiled once, so compile time stops growing with depth.
  clip_jax.models.layout converts variables between the two. `remat` names a
  clip_jax.layers.remat policy applied to each block.
  """
  layers: int
  num_heads: int
  mlp_dim: int
  act: str = 'quick_gelu'
  ln_eps: float = 1e-5
  attn_implementation: Optional[str] = None
  remat: str = 'none'
  scan_layers: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, causal: bool = False, hooks: Sequence[int] = ()):
    """The stack's output; with `hooks` (block indices), `(output, (hidden of block i for i in hooks))`."""
    width = x.shape[-1]
    # open_clip's scheme: residual-branch outputs shrink with depth.
    proj_std = width ** -0.5 * (2 * self.layers) ** -0.5
    block = functools.partial(ResidualBlock, self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
                              attn_out_std=proj_std, mlp_proj_std=proj_std,
                              attn_implementation=self.attn_implementation,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    # `causal` is closed over: it must stay a Python bool, and remat traces its arguments.
    run = remat_lib.checkpointed(lambda blk, h: blk(h, causal=causal), self.remat, prevent_cse=not self.scan_layers)
    hooks = tuple(hooks)
    if not self.scan_layers:
      hidden = []
      for i in range(self.layers):
        x = run(block(name=f'resblocks_{i}'), x)
        hidden.append(x)
      return (x, tuple(hidden[i] for i in hooks)) if hooks else x

    def body(blk, h, _):
      h = run(blk, h)
      return h, (h if hooks else None)  # every block's output, stacked, only when hooked

    stack = nn.scan(body, variable_axes={True: 0}, split_rngs={'params': True},
                    length=self.layers, metadata_params={nn.PARTITION_NAME: 'layers'})
    x, hidden = stack(block(name='resblocks'), x, None)
    return (x, tuple(hidden[i] for i in hooks)) if hooks else x
