"""CLIP eval transform: host path vs open_clip (exact), TF path vs host (bicubic tolerance)."""

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import transforms

open_clip = pytest.importorskip('open_clip')
torch = pytest.importorskip('torch')

# Shapes (h, w): landscape, portrait, square, smaller than the target, an odd
# excess (crop offset rounds half to even), already the target size, extreme.
SHAPES = [(375, 500), (500, 375), (300, 300), (100, 150), (225, 227), (224, 224), (1000, 299), (61, 7)]
# One uint8 level after normalisation, in the channel with the smallest std.
ONE_LEVEL = 1 / 255 / min(transforms.STD)


def _noise(shape, seed):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _smooth(h, w, seed):
  """Photo-like: coarse noise upsampled, so no pixel-level overshoot."""
  coarse = _noise((max(h // 16, 2), max(w // 16, 2), 3), seed)
  return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def _reference(image, size=224):
  return open_clip.image_transform(size, is_train=False)(image).numpy().transpose(1, 2, 0)


def test_reference_is_clip_recipe():
  # Pin the reference itself: open_clip's eval transform is Resize(short side,
  # BICUBIC) + CenterCrop + RGB + ToTensor + Normalize(CLIP mean, std).
  from torchvision import transforms as tv  # pylint: disable=g-import-not-at-top
  recipe = tv.Compose([tv.Resize(224, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(224),
                       tv.ToTensor(), tv.Normalize(transforms.MEAN, transforms.STD)])
  image = Image.fromarray(_noise((300, 400, 3), 0))
  np.testing.assert_array_equal(_reference(image), recipe(image).numpy().transpose(1, 2, 0))


@pytest.mark.parametrize('shape', SHAPES)
def test_host_matches_open_clip(shape):
  image = Image.fromarray(_noise(shape + (3,), seed=shape[0]))
  ours = transforms.preprocess(image, 224)
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
  # Measured: 0.0 (same float32 operation order as ToTensor + Normalize).
  np.testing.assert_allclose(ours, _reference(image), rtol=0, atol=1e-5)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'LA', 'CMYK'])
def test_host_matches_open_clip_other_modes(mode):
  image = Image.fromarray(_noise((150, 210, 3), 1)).convert(mode)
  if mode in ('RGBA', 'LA'):
    image.putalpha(Image.fromarray(_noise((150, 210), 2)))  # real transparency
  np.testing.assert_allclose(transforms.preprocess(image, 96), _reference(image, 96), rtol=0, atol=1e-5)


@pytest.mark.parametrize('channels,mode', [(1, 'L'), (3, 'RGB'), (4, 'RGBA')])
def test_numpy_input_equals_pil(channels, mode):
  pixels = _noise((90, 120, channels), 3)
  pil = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
  np.testing.assert_array_equal(transforms.preprocess(pixels, 64), transforms.preprocess(pil, 64))


def test_sizes_and_offsets_follow_torchvision():
  from torchvision.transforms import functional as tvf  # pylint: disable=g-import-not-at-top
  assert transforms.resized_size(375, 500, 224) == (224, 298)  # 298.67 truncates
  assert transforms.resized_size(500, 375, 224) == (298, 224)
  assert transforms.crop_offsets(225, 224, 224) == (0, 0)  # 0.5 rounds to 0
  assert transforms.crop_offsets(227, 224, 224) == (2, 0)  # 1.5 rounds to 2
  rng = np.random.default_rng(4)
  for h, w, size in rng.integers(1, 2000, (500, 3)):
    h, w, size = int(h), int(w), int(size)
    assert transforms.resized_size(h, w, size) == tuple(tvf._compute_resized_output_size((h, w), [size]))  # pylint: disable=protected-access


def test_normalize_numpy_and_jax():
  jnp = pytest.importorskip('jax.numpy')
  pixels = _noise((2, 224, 224, 3), 5)
  expected = np.stack([transforms.preprocess(p, 224) for p in pixels])  # no resize at 224: pure normalisation
  np.testing.assert_allclose(transforms.normalize(pixels), expected, rtol=0, atol=1e-6)
  on_device = transforms.normalize(jnp.asarray(pixels))
  assert isinstance(on_device, type(jnp.zeros(1))) and on_device.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(on_device), expected, rtol=0, atol=1e-5)
  floats = pixels.astype(np.float32) / 255
  np.testing.assert_allclose(transforms.normalize(floats), expected, rtol=0, atol=1e-5)
  # Hand-computed: white in the red channel.
  assert transforms.normalize(np.full((1, 1, 3), 255, np.uint8))[0, 0, 0] == pytest.approx(
      (1 - 0.48145466) / 0.26862954, abs=1e-6)


def test_host_errors():
  with pytest.raises(TypeError, match='dtype uint8'):
    transforms.preprocess(np.zeros((8, 8, 3), np.float32), 4)
  with pytest.raises(ValueError, match=r'\[H, W, C\].*\(8, 8\)'):
    transforms.preprocess(np.zeros((8, 8), np.uint8), 4)
  with pytest.raises(ValueError, match=r'\(8, 8, 2\)'):
    transforms.preprocess(np.zeros((8, 8, 2), np.uint8), 4)
  with pytest.raises(ValueError, match='empty'):
    transforms.preprocess(np.zeros((0, 8, 3), np.uint8), 4)
  with pytest.raises(TypeError, match='PIL.Image or a uint8 numpy array'):
    transforms.preprocess([[0]], 4)
  with pytest.raises(ValueError, match='image_size'):
    transforms.preprocess(np.zeros((8, 8, 3), np.uint8), 0)
  with pytest.raises(ValueError, match=r'\[\.\.\., H, W, 3\]'):
    transforms.normalize(np.zeros((8, 8, 4), np.uint8))
  with pytest.raises(TypeError, match='uint8'):
    transforms.normalize(np.zeros((8, 8, 3), np.int32))


# TF: tf.image.resize('bicubic', antialias=True) uses PIL's kernel (Keys,
# a = -0.5) in float; PIL uses 22-bit fixed-point weights and rounds to uint8
# between its horizontal and vertical passes. Measured on photo-like images:
# mean |diff| 0.0025-0.003 and max exactly one uint8 level (0.0150); on pure
# noise, where the first pass overshoots and PIL clips it, mean <= 0.005 with
# rare pixels off by up to 0.35. Bounds below leave about 2x margin on means.


@pytest.fixture(scope='module')
def tf():
  return pytest.importorskip('tensorflow')


@pytest.mark.parametrize('shape', SHAPES)
def test_tf_close_to_host_on_photo_like_images(tf, shape):
  pixels = _smooth(*shape, seed=shape[1])
  ours = transforms.preprocess_tf(tf.constant(pixels), 224)
  assert ours.shape == (224, 224, 3) and ours.dtype == tf.float32
  diff = np.abs(ours.numpy() - transforms.preprocess(pixels, 224))
  assert diff.mean() < 0.006
  assert diff.max() <= ONE_LEVEL + 1e-4


def test_tf_close_to_host_on_noise(tf):
  for shape in SHAPES:
    pixels = _noise(shape + (3,), seed=7)
    diff = np.abs(transforms.preprocess_tf(tf.constant(pixels), 224).numpy() - transforms.preprocess(pixels, 224))
    assert diff.mean() < 0.01, shape


def test_tf_in_dataset_map_with_unknown_shape(tf):
  images = [_smooth(120, 90, 8), _smooth(64, 200, 9)]
  ds = tf.data.Dataset.from_generator(lambda: iter(images),
                                      output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
  ds = ds.map(lambda x: transforms.preprocess_tf(x, 56))
  for out, pixels in zip(ds, images):
    assert out.shape == (56, 56, 3)
    assert np.abs(out.numpy() - transforms.preprocess(pixels, 56)).mean() < 0.006


@pytest.mark.parametrize('channels', [1, 4])
def test_tf_grey_and_alpha(tf, channels):
  pixels = _smooth(80, 100, 10)
  if channels == 1:
    pixels = pixels[..., :1]
  else:
    pixels = np.concatenate([pixels, np.full((80, 100, 1), 255, np.uint8)], -1)  # opaque
  diff = np.abs(transforms.preprocess_tf(tf.constant(pixels), 64).numpy() - transforms.preprocess(pixels, 64))
  assert diff.mean() < 0.006


def test_tf_errors(tf):
  with pytest.raises(TypeError, match='uint8'):
    transforms.preprocess_tf(tf.zeros([8, 8, 3], tf.float32), 4)
  with pytest.raises(ValueError, match=r'\[H, W, C\]'):
    transforms.preprocess_tf(tf.zeros([8, 8], tf.uint8), 4)
  with pytest.raises(ValueError, match='static C'):
    transforms.preprocess_tf(tf.zeros([8, 8, 2], tf.uint8), 4)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
  def unknown_channels(x):
    return transforms.preprocess_tf(x, 4)

  with pytest.raises(ValueError, match='channels='):
    unknown_channels.get_concrete_function()
