"""The DPT decoder (Ranftl et al. 2021) as LSeg uses it.

Four ViT depths are *reassembled* into a feature pyramid at strides 4, 8, 16
and 32 of the input image, then *fused* coarse to fine:

  reassemble_i: tokens [B, 1 + HW, width]
      -> readout (the class token: 'ignore' it, 'add' it to every patch token,
         or 'project' [patch, cls] back to width with Linear + exact GELU)
      -> [B, gh, gw, width] -> 1x1 conv to dims[i]
      -> resample by patch / stride_i: a kernel == stride transposed conv up,
         nothing, or 3x3 stride-2 convs down (padding 1)
      -> 3x3 conv (no bias) to `features`            (LSeg's scratch.layer{i}_rn)
  refinenet4(l4) -> refinenet3(., l3) -> refinenet2(., l2) -> refinenet1(., l1)
  fusion(x, skip): x + RCU(skip) -> RCU -> bilinear (align_corners) upsample -> 1x1 conv
  RCU(x) = x + conv(act(bn(conv(act(x)))))  with ReLU, BN optional (bias iff no BN)

For ViT-B/16 and B/32 this is the exact layer sequence of LSeg's
`_make_vit_b16_backbone` / `_make_vit_b32_backbone` (x4 and x2 transposed
convs / x8, x4, x2, or the stride-2 conv for stride 32). The one
generalisation: a fusion block upsamples to the next skip's size and
refinenet1 to twice layer 1's, where DPT always scales by 2; the sizes agree
whenever the image size is a multiple of 32, and other sizes then still fuse.
"""

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers import activations
from clip_jax.layers.resample import (PatchUpsample, batch_norm, constrain_map, conv,
                                      resize_bilinear_align_corners, spatial_shape)

READOUTS = ('ignore', 'add', 'project')
STRIDES = (4, 8, 16, 32)


def resample_steps(patch_size: int) -> Tuple[int, ...]:
  """log2(patch_size / stride) per pyramid level: > 0 upsample, < 0 halve that many times."""
  return tuple(int(round(math.log2(patch_size / s))) for s in STRIDES)


class Readout(nn.Module):
  """Folds the class token into the patch tokens: [B, 1 + N, D] -> [B, N, D]."""
  mode: str
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    cls, patches = tokens[:, :1], tokens[:, 1:]
    if self.mode == 'ignore':
      return patches
    if self.mode == 'add':
      return patches + cls
    width = tokens.shape[-1]
    both = jnp.concatenate([patches, jnp.broadcast_to(cls, patches.shape)], axis=-1)
    y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name='project',
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('mlp', 'embed')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(both)
    return activations.gelu(y)  # torch nn.GELU(): the exact erf form


class Reassemble(nn.Module):
  """One hooked depth's tokens -> a `features`-channel map at one pyramid stride."""
  readout: str
  dim: int
  features: int
  step: int  # log2 of the resampling factor (see resample_steps)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, grid: Tuple[int, int]):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Readout(self.readout, name='readout', **kw)(tokens)
    x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    x = conv(self.dim, 1, name='project', **kw)(x)
    if self.step > 0:
      x = PatchUpsample(self.dim, 2 ** self.step, name='upsample', **kw)(x)
    for j in range(-self.step):
      x = conv(self.dim, 3, stride=2, name=f'downsample_{j}', **kw)(x)
    x = conv(self.features, 3, use_bias=False, name='layer_rn', **kw)(x)
    return constrain_map(x)


class ResidualConvUnit(nn.Module):
  use_bn: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    features = x.shape[-1]
    out = x
    for i in (1, 2):
      out = conv(features, 3, use_bias=not self.use_bn, name=f'conv{i}', **kw)(nn.relu(out))
      if self.use_bn:
        out = batch_norm(train, name=f'bn{i}', **kw)(out)
    return x + out


class FusionBlock(nn.Module):
  """DPT's FeatureFusionBlock_custom (expand=False, align_corners=True)."""
  use_bn: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skip=None, *, size: Sequence[int], train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if skip is not None:
      x = x + ResidualConvUnit(self.use_bn, name='res_conv_unit1', **kw)(skip, train=train)
    x = ResidualConvUnit(self.use_bn, name='res_conv_unit2', **kw)(x, train=train)
    x = resize_bilinear_align_corners(x, size)
    return constrain_map(conv(x.shape[-1], 1, name='out_conv', **kw)(x))


class DPTDecoder(nn.Module):
  """Hooked ViT tokens (4 x [B, 1 + gh*gw, width]) -> [B, 2*h1, 2*w1, features], stride 2."""
  patch_size: int
  readout: str = 'project'
  dims: Tuple[int, ...] = (96, 192, 384, 768)
  features: int = 256
  use_bn: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: Sequence, grid: Tuple[int, int], *, train: bool = False):
    if len(hidden) != 4 or len(self.dims) != 4:
      raise ValueError(f'DPTDecoder takes 4 hooked depths and 4 dims; got {len(hidden)} and {len(self.dims)}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    steps = resample_steps(self.patch_size)
    layers = [Reassemble(self.readout, dim, self.features, step, name=f'reassemble_{i + 1}', **kw)(tokens, grid)
              for i, (tokens, dim, step) in enumerate(zip(hidden, self.dims, steps))]
    fuse = lambda i: FusionBlock(self.use_bn, name=f'refinenet{i}', **kw)
    path = fuse(4)(layers[3], size=spatial_shape(layers[2]), train=train)
    path = fuse(3)(path, layers[2], size=spatial_shape(layers[1]), train=train)
    path = fuse(2)(path, layers[1], size=spatial_shape(layers[0]), train=train)
    h1, w1 = spatial_shape(layers[0])
    return fuse(1)(path, layers[0], size=(2 * h1, 2 * w1), train=train)
