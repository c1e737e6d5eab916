"""CLIP's Vision Transformer image tower."""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers.initializers import normal, param_with_axes
from clip_jax.layers.norms import LayerNorm
from clip_jax.layers.transformer import Transformer


class VisionTransformer(nn.Module):
  """conv patch embed -> [CLS] + pos -> ln_pre -> blocks -> ln_post(CLS) @ proj.

  Input: float NHWC images, already normalised. `__call__` returns the pooled,
  projected embedding; with `return_tokens=True` it also returns every token
  after ln_post (the grid features dense heads use), shaped [B, 1 + HW, width].
  With `hooks` (block indices) it returns only those blocks' outputs instead, a
  tuple of [B, 1 + HW, width] taken before ln_post, as DPT-style decoders (LSeg)
  read them; ln_post and proj are then neither applied nor created.
  """
  image_size: int
  patch_size: int
  width: int
  layers: int
  num_heads: int
  mlp_dim: int
  output_dim: int
  act: str = 'quick_gelu'
  ln_eps: float = 1e-5
  attn_implementation: Optional[str] = None
  remat: str = 'none'         # clip_jax.layers.remat policy of each residual block
  scan_layers: bool = False   # nn.scan over the blocks (see clip_jax.layers.transformer)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_tokens: bool = False, hooks: Sequence[int] = ()):
    del train  # no dropout / batch statistics in this tower
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    scale = self.width ** -0.5
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=(self.patch_size, self.patch_size),
                padding='VALID', use_bias=False, name='conv1',
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, 'conv_in', 'embed')), **kw)(images.astype(self.dtype))
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    cls = param_with_axes(self, 'class_embedding', normal(scale), (self.width,), self.param_dtype, ('embed',))
    pos = param_with_axes(self, 'positional_embedding', normal(scale), (self.grid_size ** 2 + 1, self.width),
                          self.param_dtype, ('pos', 'embed'))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c)), x], axis=1)
    x = x + pos.astype(self.dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
    x = LayerNorm(epsilon=self.ln_eps, name='ln_pre', **kw)(x)
    x = Transformer(self.layers, self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
                    attn_implementation=self.attn_implementation, remat=self.remat,
                    scan_layers=self.scan_layers, name='transformer', **kw)(x, hooks=tuple(hooks))
    if hooks:
      return x[1]
    tokens = LayerNorm(epsilon=self.ln_eps, name='ln_post', **kw)(x)
    proj = param_with_axes(self, 'proj', normal(scale), (self.width, self.output_dim), self.param_dtype,
                           ('embed', 'joint'))
    pooled = tokens[:, 0] @ proj.astype(self.dtype)
    return (pooled, tokens) if return_tokens else pooled
