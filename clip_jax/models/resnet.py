"""CLIP's ModifiedResNet image tower.

Differences from a torchvision ResNet, all of which matter for parity: a
three-conv stem with an average pool, anti-aliased strided blocks (an AvgPool
after conv2 instead of a strided conv, and an AvgPool before the downsampling
1x1 conv), and attention pooling instead of global average pooling.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers import remat as remat_lib
from clip_jax.layers.attention import MultiHeadAttention
from clip_jax.layers.initializers import normal, param_with_axes

# torch BatchNorm2d(momentum=0.1) keeps 0.9 of the old running statistics.
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5


def _conv(features, kernel, name, dtype, param_dtype):
  # 3x3 convs pad (1, 1) explicitly: 'SAME' pads asymmetrically when strided.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=False, name=name,
                 dtype=dtype, param_dtype=param_dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(),
                                                          (None, None, 'conv_in', 'conv_out')))


def _bn(name, train, dtype, param_dtype, zero_init=False):
  return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, name=name,
                      dtype=dtype, param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(
                          nn.initializers.zeros if zero_init else nn.initializers.ones, ('norm',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))


def _avg_pool(x, stride):
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = nn.relu(_bn('bn1', train, **kw)(_conv(self.planes, 1, 'conv1', **kw)(x)))
    out = nn.relu(_bn('bn2', train, **kw)(_conv(self.planes, 3, 'conv2', **kw)(out)))
    out = _avg_pool(out, self.stride)
    # Zero-init the last BN scale so each block starts as the identity (as open_clip does).
    out = _bn('bn3', train, zero_init=True, **kw)(_conv(self.planes * self.expansion, 1, 'conv3', **kw)(out))
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * self.expansion:
      identity = _avg_pool(x, self.stride)
      identity = _conv(self.planes * self.expansion, 1, 'downsample_conv', **kw)(identity)
      identity = _bn('downsample_bn', train, **kw)(identity)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """Prepend the mean token, add positions, and let it attend to the grid."""
  num_heads: int
  output_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    pos = param_with_axes(self, 'positional_embedding', normal(c ** -0.5), (h * w + 1, c), self.param_dtype,
                          ('pos', 'embed'))
    x = x + pos.astype(self.dtype)
    out = MultiHeadAttention(self.num_heads, out_features=self.output_dim, dtype=self.dtype,
                             param_dtype=self.param_dtype, name='attn')(x, num_queries=1)
    return out[:, 0]


class ModifiedResNet(nn.Module):
  """Float NHWC images (normalised) -> [B, output_dim].

  `return_tokens=True` also returns the layer-4 grid before attention pooling,
  [B, H/32, W/32, width*32], the "grid features" of DepthCLIP and CLIP-ViL.
  """
  image_size: int
  layers: Sequence[int]
  width: int
  output_dim: int
  num_heads: Optional[int] = None  # default: width * 32 // 64, as CLIP
  remat: str = 'none'  # clip_jax.layers.remat policy of each bottleneck block
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_tokens: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    stem = [(self.width // 2, 2), (self.width // 2, 1), (self.width, 1)]
    for i, (features, stride) in enumerate(stem, start=1):
      conv = nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=False,
                     name=f'conv{i}', kernel_init=nn.with_logical_partitioning(
                         nn.initializers.he_normal(), (None, None, 'conv_in', 'conv_out')), **kw)
      x = nn.relu(_bn(f'bn{i}', train, **kw)(conv(x)))
    x = _avg_pool(x, 2)
    # `train` is closed over: remat traces its arguments and BatchNorm needs a Python bool.
    run = remat_lib.checkpointed(lambda block, h: block(h, train), self.remat)
    for stage, blocks in enumerate(self.layers):
      planes = self.width * 2 ** stage
      for j in range(blocks):
        stride = 1 if stage == 0 or j > 0 else 2
        x = run(Bottleneck(planes, stride, name=f'layer{stage + 1}_{j}', **kw), x)
    grid = x
    heads = self.num_heads or self.width * 32 // 64
    pooled = AttentionPool2d(heads, self.output_dim, name='attnpool', **kw)(x)
    return (pooled, grid) if return_tokens else pooled
