"""Random-resized-crop and the eval geometry, in numpy (grain) and TF (tf.data).

Both loaders apply the same parameterisation, so `config.data.augment` means
the same thing whichever loader reads the data:

  * `crop_window` turns NUM_UNIFORMS uniform draws in [0, 1) into an integer
    crop (top, left, height, width), as torchvision's RandomResizedCrop does:
    up to NUM_TRIES candidates with area fraction in `scale` and log-uniform
    aspect ratio (width / height) in `ratio`; the first that fits the image
    wins, else a centred crop with the ratio clamped into range. numpy and TF
    compute it in float64 with the same operations, so the same draws give the
    same window in both (tests/test_pipeline.py checks).
  * The crop is resized to image_size x image_size: bicubic with antialiasing
    for the image (PIL / tf.image.resize, agreeing to about one uint8 level),
    nearest neighbour for the mask, and an exact affine map for the boxes.
  * Eval geometry is `transforms`' CLIP eval transform without the
    normalisation: short side to image_size, centred square crop, uint8.

The draws come from the caller, keyed by (seed, epoch, record), so an
example's augmentation does not depend on the order it is read in: the
property exact resume needs. Boxes are (x1, y1, x2, y2) pixels with x2/y2
exclusive; after the affine map they are clipped to the output, and objects
left with no area are removed (the remaining rows move up, `num_objects`
counts them, padding rows are boxes 0 and labels -1, as in `digits`).
"""

import math
from typing import Tuple

import numpy as np
from PIL import Image

from clip_jax.data import transforms

NUM_TRIES = 10
# Layout of the draws: NUM_TRIES area fractions, NUM_TRIES log aspect ratios,
# then the crop's vertical and horizontal position.
NUM_UNIFORMS = 2 * NUM_TRIES + 2


def check_params(scale, ratio):
  """Validates augment.scale / augment.ratio; returns them as float pairs."""
  scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f'config.data.augment.scale must be (lo, hi) with 0 < lo <= hi <= 1 '
                     f'(area fractions of the image), got {scale}')
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f'config.data.augment.ratio must be (lo, hi) with 0 < lo <= hi '
                     f'(width / height), got {ratio}')
  return scale, ratio


def crop_window(u, height: int, width: int, scale, ratio) -> Tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width) for uniform draws u [NUM_UNIFORMS]."""
  u = np.asarray(u, np.float64)
  t = NUM_TRIES
  area = float(height) * float(width)
  target = area * (scale[0] + u[:t] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = np.exp(log_lo + u[t:2 * t] * (log_hi - log_lo))
  w = np.round(np.sqrt(target * aspect))
  h = np.round(np.sqrt(target / aspect))
  fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
  if fits.any():
    k = int(np.argmax(fits))
    h, w = int(h[k]), int(w[k])
    top = int(np.floor(u[2 * t] * (height - h + 1)))
    left = int(np.floor(u[2 * t + 1] * (width - w + 1)))
    return top, left, h, w
  h, w = _fallback_size(height, width, ratio)
  return (height - h) // 2, (width - w) // 2, h, w


def _fallback_size(height, width, ratio):
  """The whole image, cut to the nearest allowed aspect ratio (centred)."""
  in_ratio = width / height
  if in_ratio < ratio[0]:
    return min(height, max(1, int(round(width / ratio[0])))), width
  if in_ratio > ratio[1]:
    return height, min(width, max(1, int(round(height * ratio[1]))))
  return height, width


def transform_boxes(boxes, labels, num_objects, scale_xy, offset_xy, size):
  """Maps boxes by x * scale + offset, clips to [0, size], drops empty ones."""
  boxes = np.asarray(boxes, np.float32)
  sx, sy = scale_xy
  tx, ty = offset_xy
  mapped = boxes * np.float32([sx, sy, sx, sy]) + np.float32([tx, ty, tx, ty])
  mapped = np.clip(mapped, 0, size)
  keep = ((np.arange(len(boxes)) < int(num_objects))
          & (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1]))
  order = np.argsort(~keep, kind='stable')
  out_boxes = np.where(keep[:, None], mapped, 0).astype(np.float32)[order]
  out_labels = np.where(keep, labels, -1).astype(np.int32)[order]
  return out_boxes, out_labels, np.int32(keep.sum())


def _nearest_indices(start: int, length: int, size: int) -> np.ndarray:
  """Source rows of a nearest-neighbour resize of [start, start + length) to
  size: the pixel under each output pixel's centre (PIL's NEAREST rule, up
  to float rounding at exact ties)."""
  src = start + np.floor((np.arange(size) + 0.5) * (length / size)).astype(np.int64)
  return np.minimum(src, start + length - 1)


def resized_crop(image: np.ndarray, window, size: int, mask=None):
  """Crops window (top, left, h, w) and resizes to size x size (uint8)."""
  top, left, h, w = window
  box = (left, top, left + w, top + h)
  out = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box))
  if mask is None:
    return out, None
  # Nearest neighbour is a gather: cheaper than a PIL round trip.
  rows, cols = _nearest_indices(top, h, size), _nearest_indices(left, w, size)
  return out, mask[rows[:, None], cols[None, :]]


def center_geometry(height: int, width: int, size: int):
  """Eval geometry: ((new_h, new_w), (top, left)) of resize-short-side + centre crop."""
  new_h, new_w = transforms.resized_size(height, width, size)
  return (new_h, new_w), transforms.crop_offsets(new_h, new_w, size)


def center_crop(image: np.ndarray, size: int, mask=None):
  """Short side to size (bicubic; mask nearest), then the centred square."""
  height, width = image.shape[:2]
  (new_h, new_w), (top, left) = center_geometry(height, width, size)

  def fit(array, method):
    if (new_h, new_w) != (height, width):
      array = np.asarray(Image.fromarray(array).resize((new_w, new_h), method))
    return array[top:top + size, left:left + size]

  return fit(image, Image.BICUBIC), None if mask is None else fit(mask, Image.NEAREST)


def geometry_boxes_np(train_window, height, width, size):
  """(scale_xy, offset_xy) of the box map for a crop window or (None) eval."""
  if train_window is not None:
    top, left, h, w = train_window
    return (size / w, size / h), (-left * size / w, -top * size / h)
  (new_h, new_w), (top, left) = center_geometry(height, width, size)
  return (new_w / width, new_h / height), (-left, -top)


# ----------------------------------------------------------------- TensorFlow


def crop_window_tf(u, height, width, scale, ratio):
  """`crop_window` in TF ops: int32 (top, left, h, w) tensors."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  u = tf.cast(u, tf.float64)
  t = NUM_TRIES
  height_f, width_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area = height_f * width_f
  target = area * (scale[0] + u[:t] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + u[t:2 * t] * (log_hi - log_lo))
  w = tf.round(tf.sqrt(target * aspect))
  h = tf.round(tf.sqrt(target / aspect))
  fits = (w >= 1) & (w <= width_f) & (h >= 1) & (h <= height_f)
  k = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  any_fits = tf.reduce_any(fits)
  h_try, w_try = tf.cast(h[k], tf.int32), tf.cast(w[k], tf.int32)
  top_try = tf.cast(tf.floor(u[2 * t] * tf.cast(height - h_try + 1, tf.float64)), tf.int32)
  left_try = tf.cast(tf.floor(u[2 * t + 1] * tf.cast(width - w_try + 1, tf.float64)), tf.int32)

  # Fallback: the whole image cut to the nearest allowed ratio, centred.
  in_ratio = width_f / height_f
  h_narrow = tf.clip_by_value(tf.cast(tf.round(width_f / ratio[0]), tf.int32), 1, height)
  w_wide = tf.clip_by_value(tf.cast(tf.round(height_f * ratio[1]), tf.int32), 1, width)
  h_fb = tf.where(in_ratio < ratio[0], h_narrow, height)  # too tall: full width
  w_fb = tf.where(in_ratio > ratio[1], w_wide, width)  # too wide: full height
  pick = lambda a, b: tf.where(any_fits, a, b)  # noqa: E731
  return (pick(top_try, (height - h_fb) // 2), pick(left_try, (width - w_fb) // 2),
          pick(h_try, h_fb), pick(w_try, w_fb))


def _resize_uint8_tf(image, new_size):
  """Bicubic antialiased resize of uint8 [H, W, C], rounded back to uint8."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = tf.image.resize(image, new_size, method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _resize_mask_tf(mask, new_size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.image.resize(mask[..., None], new_size, method='nearest')[..., 0]


def resized_crop_tf(image, window, size: int, mask=None):
  """`resized_crop` in TF: uint8 [size, size, 3] (and the uint8 mask)."""
  top, left, h, w = window
  out = _resize_uint8_tf(image[top:top + h, left:left + w], [size, size])
  if mask is None:
    return out, None
  return out, _resize_mask_tf(mask[top:top + h, left:left + w], [size, size])


def center_geometry_tf(height, width, size: int):
  """`center_geometry` with TF ops (same float64 arithmetic as transforms)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  new_h, new_w = transforms.resized_size_tf(height, width, size)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
  return (new_h, new_w), (top, left)


def center_crop_tf(image, size: int, mask=None):
  """`center_crop` in TF."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.shape(image)
  (new_h, new_w), (top, left) = center_geometry_tf(shape[0], shape[1], size)
  out = _resize_uint8_tf(image, tf.stack([new_h, new_w]))[top:top + size, left:left + size]
  out = tf.ensure_shape(out, [size, size, image.shape[-1]])
  if mask is None:
    return out, None
  m = _resize_mask_tf(mask, tf.stack([new_h, new_w]))[top:top + size, left:left + size]
  return out, tf.ensure_shape(m, [size, size])


def geometry_boxes_tf(train_window, height, width, size):
  """`geometry_boxes_np` in TF (float32 scale and offset pairs)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  f = lambda x: tf.cast(x, tf.float32)  # noqa: E731
  if train_window is not None:
    top, left, h, w = train_window
    return (size / f(w), size / f(h)), (-f(left) * size / f(w), -f(top) * size / f(h))
  (new_h, new_w), (top, left) = center_geometry_tf(height, width, size)
  return (f(new_w) / f(width), f(new_h) / f(height)), (-f(left), -f(top))


def transform_boxes_tf(boxes, labels, num_objects, scale_xy, offset_xy, size):
  """`transform_boxes` in TF."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sx, sy = scale_xy
  tx, ty = offset_xy
  mapped = boxes * tf.stack([sx, sy, sx, sy]) + tf.stack([tx, ty, tx, ty])
  mapped = tf.clip_by_value(mapped, 0.0, float(size))
  rows = tf.range(tf.shape(boxes)[0])
  keep = ((rows < tf.cast(num_objects, tf.int32))
          & (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1]))
  order = tf.argsort(tf.cast(~keep, tf.int32), stable=True)
  out_boxes = tf.gather(tf.where(keep[:, None], mapped, 0.0), order)
  out_labels = tf.gather(tf.where(keep, tf.cast(labels, tf.int32), -1), order)
  return out_boxes, out_labels, tf.reduce_sum(tf.cast(keep, tf.int32))
