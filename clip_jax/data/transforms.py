"""CLIP's evaluation image transform, on the host (PIL/numpy) and in tf.data.

The recipe (OpenAI CLIP and open_clip's `image_transform(is_train=False)`):
bicubic resize so the short side is `image_size`, centre crop to a square,
convert to RGB, scale to [0, 1], subtract MEAN and divide by STD.

`preprocess` reproduces torchvision's arithmetic exactly (sizes, crop
offsets, float32 rounding), so it matches open_clip to the last bit on RGB
and greyscale images. `preprocess_tf` runs the same steps with TF ops for
tf.data; TF's bicubic is a float kernel while PIL's is fixed-point, so the
two agree only to about one uint8 level (tests/test_transforms.py measures
it). `normalize` is the last step alone, for pipelines that ship uint8
pixels and normalise on the accelerator.
"""

import sys
from typing import Tuple, Union

import numpy as np
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN32 = np.asarray(MEAN, np.float32)
_STD32 = np.asarray(STD, np.float32)
# uint8 value -> normalised float32, per channel, computed with torchvision's
# operation order (x / 255, then - mean, then / std, all in float32) so the
# host path is bit-identical to ToTensor + Normalize.
_LUT = (np.arange(256, dtype=np.float32)[:, None] / np.float32(255) - _MEAN32) / _STD32
_RGB = np.arange(3)
_CHANNELS = (1, 3, 4)


def resized_size(height: int, width: int, image_size: int) -> Tuple[int, int]:
  """(height, width) after resizing the short side to image_size.

  As torchvision's Resize(int): the long side is int(size * long / short),
  truncated, not rounded (a 500x375 image at 224 becomes 298x224, not 299).
  """
  if width <= height:
    return int(image_size * height / width), image_size
  return image_size, int(image_size * width / height)


def crop_offsets(height: int, width: int, crop: int) -> Tuple[int, int]:
  """(top, left) of a centred crop, as torchvision's CenterCrop.

  round() is Python's, half to even: an odd excess of 1 starts at 0, of 3 at 2.
  """
  return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _check_size(image_size) -> int:
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise ValueError(f'image_size must be a positive int, got {image_size!r}')
  return int(image_size)


def _as_pil(image) -> Image.Image:
  if isinstance(image, Image.Image):
    if image.width < 1 or image.height < 1:
      raise ValueError(f'image is empty: size {image.size}')
    return image
  if not isinstance(image, np.ndarray):
    raise TypeError(f'image must be a PIL.Image or a uint8 numpy array [H, W, C], got {type(image).__name__}')
  if image.dtype != np.uint8:
    raise TypeError(f'image must have dtype uint8 (0..255), got {image.dtype}; '
                    'for float images in [0, 1] convert with (x * 255).round().astype(np.uint8)')
  if image.ndim != 3 or image.shape[-1] not in _CHANNELS:
    raise ValueError(f'image must be [H, W, C] with C in {_CHANNELS}, got shape {image.shape}')
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f'image is empty: shape {image.shape}')
  if image.shape[-1] == 1:
    return Image.fromarray(image[..., 0], 'L')
  return Image.fromarray(image, 'RGB' if image.shape[-1] == 3 else 'RGBA')


def preprocess(image: Union[Image.Image, np.ndarray], image_size: int) -> np.ndarray:
  """CLIP eval transform on the host: float32 [image_size, image_size, 3].

  Args:
    image: a PIL image (any mode) or a uint8 numpy array [H, W, C], C in 1, 3, 4.
    image_size: side of the square output.
  """
  size = _check_size(image_size)
  image = _as_pil(image)
  width, height = image.size
  new_height, new_width = resized_size(height, width, size)
  if (new_height, new_width) != (height, width):
    image = image.resize((new_width, new_height), Image.BICUBIC)
  top, left = crop_offsets(new_height, new_width, size)
  image = image.crop((left, top, left + size, top + size))
  # RGB conversion comes after resizing, as in CLIP: it changes results for
  # palette images (PIL resizes those with NEAREST) and RGBA (PIL resizes
  # with premultiplied alpha), and parity with the reference wins here.
  pixels = np.asarray(image.convert('RGB'))
  return _LUT[pixels, _RGB]


def normalize(images):
  """CLIP mean/std normalisation of [..., H, W, 3] images; numpy or JAX arrays.

  uint8 images are scaled by 1/255 first; float images are taken to be in
  [0, 1] already. Returns float32 of the same kind (numpy in, numpy out; JAX
  in, JAX out, so it can run inside a jitted step).
  """
  jax = sys.modules.get('jax')  # a JAX array implies JAX is imported; never import it here
  if jax is not None and isinstance(images, jax.Array):
    xp = jax.numpy
  else:
    xp = np
    images = np.asarray(images)
  if images.ndim < 3 or images.shape[-1] != 3:
    raise ValueError(f'images must be [..., H, W, 3], got shape {images.shape}')
  if images.dtype == np.uint8:
    x = images.astype(np.float32) / np.float32(255)
  elif xp.issubdtype(images.dtype, np.floating):
    x = images.astype(np.float32)
  else:
    raise TypeError(f'images must be uint8 (0..255) or float (0..1), got {images.dtype}')
  return (x - xp.asarray(_MEAN32)) / xp.asarray(_STD32)


def resized_size_tf(height, width, image_size: int):
  """`resized_size` with TF ops: int(size * long / short) in float64, as torchvision computes it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  short = tf.cast(tf.minimum(height, width), tf.float64)
  long = tf.cast(tf.maximum(height, width), tf.float64)
  new_long = tf.cast(tf.floor(image_size * long / short), tf.int32)
  portrait = width <= height
  return tf.where(portrait, new_long, image_size), tf.where(portrait, image_size, new_long)


def preprocess_tf(image, image_size: int):
  """CLIP eval transform with TF ops: tf.float32 [image_size, image_size, 3].

  For tf.data maps. `image` is a uint8 [H, W, C] tensor with a static C in
  1, 3, 4 (decode with e.g. tf.io.decode_image(..., channels=3,
  expand_animations=False)). Sizes and crop offsets are computed exactly as in
  `preprocess`; the resize is TF's antialiased Keys bicubic (PIL's kernel),
  rounded and clipped to uint8 levels as PIL's output is. Alpha is dropped
  before resizing (PIL would resize premultiplied RGBA), so transparent RGBA
  images differ from `preprocess` by more than the bicubic tolerance.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # optional dependency

  size = _check_size(image_size)
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f'image must be a uint8 tensor (0..255), got {image.dtype.name}')
  if image.shape.rank != 3 or image.shape[-1] not in _CHANNELS:
    raise ValueError(f'image must be [H, W, C] with a static C in {_CHANNELS}, got shape {image.shape}; '
                     'set channels= when decoding')
  if image.shape[-1] == 4:
    image = image[..., :3]

  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  tf.debugging.assert_positive(tf.minimum(height, width), message='image is empty')
  new_height, new_width = resized_size_tf(height, width, size)

  resized = tf.image.resize(image, tf.stack([new_height, new_width]), method='bicubic', antialias=True)
  resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
  # tf.round rounds half to even, like Python's round() in CenterCrop.
  top = tf.cast(tf.round(tf.cast(new_height - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - size, tf.float64) / 2.0), tf.int32)
  cropped = resized[top:top + size, left:left + size, :]
  cropped = tf.ensure_shape(cropped, [size, size, None])
  if image.shape[-1] == 1:
    cropped = tf.tile(cropped, [1, 1, 3])
  return (cropped / 255.0 - tf.constant(_MEAN32)) / tf.constant(_STD32)
