"""RoIAlign (Mask R-CNN) in JAX, numerically torchvision's `roi_align`.

    roi_align(features [B, H, W, C], boxes [B, R, 4], output_size, spatial_scale, sampling_ratio)
      -> [B, R, out_h, out_w, C]

Boxes are (x1, y1, x2, y2) in image coordinates, `spatial_scale` maps them to
feature-map cells (1 / stride). Each output bin averages a fixed
sampling_ratio x sampling_ratio grid of bilinear samples, exactly as
torchvision's kernel places them:

    start = box * spatial_scale - (0.5 if aligned else 0)
    bin   = (end - start) / out          (aligned=False: the box is at least 1 cell)
    y     = start_y + p * bin_y + (i + 0.5) * bin_y / sampling_ratio
    sample(y, x) = 0 if y < -1 or y > H or x < -1 or x > W, else bilinear with
                   coordinates clamped to [0, size - 1]

aligned=True (the default, torchvision's `aligned=True` and Detectron2's
ROIAlignV2) takes pixel centres at +0.5, so a box's features are not shifted
by half a cell.

Sampling is separable (the bilinear weight of a sample is a row weight times
a column weight, and so is its validity), so each box gathers the two rows
and two columns around every sample coordinate and contracts them with
per-axis weights. The gather transposes to a scatter-add, which gives the
gradient with respect to the features; boxes get none (`stop_gradient`), as in
torchvision, whose kernel does not differentiate through the box coordinates.

sampling_ratio must be a positive static int. torchvision's adaptive default
(-1 / 0: ceil(box size / output size) samples per bin) makes the number of
samples depend on each box's size, a data-dependent shape that cannot be
traced under jit; pass an explicit ratio (torchvision's and Detectron2's
detection heads use 2; 0 in an mmdet config means the adaptive mode).
"""

from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp


def _pair(output_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(output_size, int):
    return output_size, output_size
  out = tuple(int(s) for s in output_size)
  if len(out) != 2:
    raise ValueError(f'roi_align: output_size={output_size!r} must be an int or (height, width)')
  return out


def _axis_taps(start, end, n_out: int, grid: int, size: int, aligned: bool):
  """Indices [R, n_out, grid, 2] and weights [R, n_out, grid, 2] of one axis' samples.

  start/end are [R] box edges in feature-map cells (offset already applied).
  The two taps are the neighbouring rows (columns) below and above each sample,
  weighted (1 - frac, frac), zeroed when the sample falls outside [-1, size].
  """
  extent = end - start
  if not aligned:
    extent = jnp.maximum(extent, 1.0)
  bin_size = (extent / n_out)[:, None, None]
  p = jnp.arange(n_out, dtype=start.dtype)[None, :, None]
  i = jnp.arange(grid, dtype=start.dtype)[None, None, :]
  # torchvision's order of operations: start + p * bin + ((i + .5) * bin) / grid.
  coord = start[:, None, None] + p * bin_size + (i + 0.5) * bin_size / grid
  valid = (coord >= -1.0) & (coord <= size)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord).astype(jnp.int32)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  coord = jnp.where(at_edge, low.astype(coord.dtype), coord)
  frac = coord - low.astype(coord.dtype)
  weights = jnp.stack([1.0 - frac, frac], axis=-1) * valid[..., None].astype(coord.dtype)
  return jnp.stack([low, high], axis=-1), weights


def _roi_align_one(features, boxes, out_hw, spatial_scale, sampling_ratio, aligned):
  """One image: features [H, W, C], boxes [R, 4] -> [R, out_h, out_w, C]."""
  h, w, _ = features.shape
  out_h, out_w = out_hw
  offset = 0.5 if aligned else 0.0
  scaled = boxes * spatial_scale - offset
  x1, y1, x2, y2 = (scaled[:, k] for k in range(4))
  yi, wy = _axis_taps(y1, y2, out_h, sampling_ratio, h, aligned)  # [R, out_h, g, 2]
  xi, wx = _axis_taps(x1, x2, out_w, sampling_ratio, w, aligned)  # [R, out_w, g, 2]
  # [R, out_h, g, 2, out_w, g, 2, C]: the 2x2 neighbours of every sample point.
  taps = features[yi[:, :, :, :, None, None, None], xi[:, None, None, None, :, :, :]]
  weight_dtype = jnp.promote_types(features.dtype, jnp.float32)
  out = jnp.einsum('rpik,rqjl,rpikqjlc->rpqc', wy.astype(weight_dtype), wx.astype(weight_dtype),
                   taps.astype(weight_dtype), precision=jax.lax.Precision.HIGHEST)
  return (out / (sampling_ratio * sampling_ratio)).astype(features.dtype)


def roi_align(features, boxes, output_size: Union[int, Sequence[int]], spatial_scale: float = 1.0,
              sampling_ratio: int = 2, aligned: bool = True):
  """RoIAlign of `boxes` [B, R, 4] (x1, y1, x2, y2, image coords) on `features` [B, H, W, C].

  Returns [B, R, out_h, out_w, C], equal to torchvision's
  `roi_align(nchw, [boxes[b] for b in range(B)], output_size, spatial_scale,
  sampling_ratio, aligned)` with the channel axis moved last. Padding boxes
  (e.g. all-zero rows) are fine: they give finite values to be masked by the
  caller. Differentiable with respect to `features`; not to `boxes`.
  """
  out_hw = _pair(output_size)
  if min(out_hw) < 1:
    raise ValueError(f'roi_align: output_size={output_size!r} must be positive')
  if not isinstance(sampling_ratio, int) or sampling_ratio <= 0:
    raise ValueError(f'roi_align: sampling_ratio={sampling_ratio!r} must be a positive int (e.g. 2): the adaptive '
                     'mode (<= 0, ceil(box size / output size) samples per bin) has a data-dependent shape '
                     'that cannot be jitted')
  if features.ndim != 4:
    raise ValueError(f'roi_align: features must be NHWC [batch, height, width, channels]; '
                     f'got shape {tuple(features.shape)}')
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
    raise ValueError(f'roi_align: boxes must be [batch={features.shape[0]}, num_boxes, 4] (x1, y1, x2, y2); '
                     f'got shape {tuple(boxes.shape)}')
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  return jax.vmap(lambda f, b: _roi_align_one(f, b, out_hw, float(spatial_scale), sampling_ratio, aligned))(
      features, boxes)
