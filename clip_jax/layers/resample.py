"""Resampling of NHWC feature maps, and the conv blocks dense decoders are built from.

`resize_bilinear_align_corners` is torch's
`F.interpolate(x, size, mode='bilinear', align_corners=True)`: LSeg's (DPT's)
fusion blocks and its final upsampling use that mode, and
`jax.image.resize` only implements the half-pixel (align_corners=False)
convention, so a port that used it would shift every upsampled map by up to
half a source pixel.

The conv helpers create their kernels with logical axis names (see
clip_jax.sharding) and pad as PyTorch does: explicit symmetric padding, since
'SAME' pads asymmetrically when strided.
"""

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from clip_jax.layers.initializers import param_with_axes

# torch BatchNorm2d(momentum=0.1) keeps 0.9 of the old running statistics.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5


def _align_corners_taps(in_size: int, out_size: int):
  """Static source rows of a 1-D align_corners=True linear resize, as torch computes them.

  torch: scale = (in - 1) / (out - 1) in float32 (0 when out == 1), source
  position s = scale * i, i0 = min(floor(s), in - 1), i1 = i0 + 1 clamped to the
  last row, and weights (1 - (s - i0), s - i0).
  """
  scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
  src = scale * np.arange(out_size, dtype=np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, np.float32(1) - lam1, lam1


def resize_bilinear_align_corners(x, size: Sequence[int]):
  """Bilinear resize of `x` [B, H, W, C] to [B, size[0], size[1], C] with align_corners=True.

  The corner pixels of input and output coincide, so the output samples the
  input at i * (in - 1) / (out - 1). Separable: a gather and a lerp per axis,
  with indices and weights fixed at trace time (the shapes are static), so it
  is exact in float32, differentiable (the gathers transpose to scatter-adds)
  and jit-friendly. Matches torch's `F.interpolate(..., mode='bilinear',
  align_corners=True)` to float rounding.
  """
  if x.ndim != 4:
    raise ValueError(f'resize_bilinear_align_corners takes NHWC [batch, height, width, channels]; '
                     f'got shape {tuple(x.shape)}')
  out_h, out_w = (int(s) for s in size)
  if out_h < 1 or out_w < 1:
    raise ValueError(f'resize_bilinear_align_corners: size={tuple(size)} must be positive')
  _, h, w, _ = x.shape
  if (out_h, out_w) == (h, w):
    return x  # the taps are then the identity
  for axis, n_in, n_out in ((2, w, out_w), (1, h, out_h)):
    i0, i1, l0, l1 = _align_corners_taps(n_in, n_out)
    bshape = [1, 1, 1, 1]
    bshape[axis] = n_out
    l0 = jnp.asarray(l0, x.dtype).reshape(bshape)
    l1 = jnp.asarray(l1, x.dtype).reshape(bshape)
    x = l0 * jnp.take(x, i0, axis=axis) + l1 * jnp.take(x, i1, axis=axis)
  return x


def conv(features: int, kernel: int, *, stride: int = 1, use_bias: bool = True, name: Optional[str] = None,
         dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=None) -> nn.Conv:
  """A square conv padded by kernel // 2 on every side (torch's `padding=k // 2`).

  `name` is None when the conv is assigned to an attribute in `setup`.
  """
  pad = kernel // 2
  init = kernel_init or nn.initializers.lecun_normal()
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=use_bias, name=name, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=nn.with_logical_partitioning(init, (None, None, 'conv_in', 'conv_out')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)))


def batch_norm(train: bool, *, name: str, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.BatchNorm:
  """torch BatchNorm2d's defaults (momentum 0.1, eps 1e-5) in Flax's convention."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, name=name,
                      dtype=dtype, param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))


class PatchUpsample(nn.Module):
  """torch's `ConvTranspose2d(c_in, features, kernel_size=f, stride=f)`: each pixel -> an f x f patch.

  With kernel == stride the transposed conv has no overlap, so it is one
  matmul per pixel followed by a depth-to-space reshape; written that way the
  kernel keeps torch's orientation (`kernel[a, b, i, o] = weight[i, o, a, b]`)
  rather than the spatially flipped one of a dilated-input convolution.
  """
  features: int
  factor: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    f = self.factor
    kernel = param_with_axes(self, 'kernel', nn.initializers.lecun_normal(in_axis=2, out_axis=3),
                             (f, f, c, self.features), self.param_dtype, (None, None, 'conv_in', 'conv_out'))
    bias = param_with_axes(self, 'bias', nn.initializers.zeros, (self.features,), self.param_dtype, ('conv_out',))
    y = jnp.einsum('bhwi,xyio->bhxwyo', x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(b, h * f, w * f, self.features) + bias.astype(self.dtype)


def spatial_shape(x) -> Tuple[int, int]:
  return int(x.shape[1]), int(x.shape[2])


def constrain_map(x):
  """Pins an NHWC activation: batch split like the data, the rest whole."""
  return nn.with_logical_constraint(x, ('act_batch', None, None, None))

