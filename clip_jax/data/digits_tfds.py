"""The digits scenes as a TFDS dataset, generated locally (nothing to download).

Kept apart from ``digits`` so the library imports without TensorFlow: only
``digits.build_tfds`` imports this module. Every example is
``DigitsSource(split, ...)[i]`` written verbatim, so the tf.data and grain
pipelines read the same scenes: image as a (lossless) PNG, the mask as a
zlib-compressed uint8 tensor of the same [S, S] shape, object fields padded to
M = num_digits[1] rows exactly as ``DigitsSource`` pads them. Shuffling at
generation is disabled, so a split reads back in index order.

Each parameter set (seed, counts, canvas, digit range) is its own
BuilderConfig, hence its own directory under ``data_dir``: changing one never
reuses stale files.
"""

import dataclasses
from typing import Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from clip_jax.data import digits


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  seed: int = 0
  num_train: int = 20_000
  num_test: int = 2_000
  canvas_size: int = 64
  num_digits: Tuple[int, int] = (1, 3)


def config_for(seed=0, num_train=20_000, num_test=2_000, canvas_size=64, num_digits=(1, 3)):
  lo, hi = (num_digits, num_digits) if isinstance(num_digits, int) else num_digits
  name = f'seed{seed}_train{num_train}_test{num_test}_canvas{canvas_size}_digits{lo}-{hi}'
  return DigitsConfig(name=name, seed=seed, num_train=num_train, num_test=num_test,
                      canvas_size=canvas_size, num_digits=(lo, hi))


class ClipJaxDigits(tfds.core.GeneratorBasedBuilder):
  """Coloured scenes of sklearn's handwritten digits with captions, masks, boxes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [config_for()]

  # tfds finds this file through importlib_resources, which an install without
  # etils[epath] lacks (ModuleNotFoundError); it only locates download
  # checksums, and this dataset downloads nothing.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    s, m = self.builder_config.canvas_size, self.builder_config.num_digits[1]
    return tfds.core.DatasetInfo(
        builder=self,
        description=digits.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(s, s, 3), dtype=np.uint8),
            'caption': tfds.features.Text(),
            'mask': tfds.features.Tensor(shape=(s, s), dtype=np.uint8,
                                         encoding=tfds.features.Encoding.ZLIB),
            'boxes': tfds.features.Tensor(shape=(m, 4), dtype=np.float32),
            'labels': tfds.features.Tensor(shape=(m,), dtype=np.int32),
            'colors': tfds.features.Tensor(shape=(m,), dtype=np.int32),
            'scan_ids': tfds.features.Tensor(shape=(m,), dtype=np.int32),
            'num_objects': tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        disable_shuffling=True,  # read back in index order, like DigitsSource
        homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the scans ship with scikit-learn
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'test': self._generate_examples('test', c.num_test)}

  def _generate_examples(self, split, num_examples):
    c = self.builder_config
    src = digits.DigitsSource(split, num_examples, c.seed, c.canvas_size, c.num_digits)
    for i in range(len(src)):
      yield i, src[i]


def build(data_dir, num_train=20_000, num_test=2_000, seed=0, canvas_size=64, num_digits=(1, 3)):
  """Prepares the dataset under ``data_dir`` (a no-op when already there)."""
  config = config_for(seed, num_train, num_test, canvas_size, num_digits)
  # A config equal to a predefined one must be passed by name (tfds refuses a
  # custom config that shares a predefined config's name).
  if config.name in ClipJaxDigits.builder_configs:
    config = config.name
  builder = ClipJaxDigits(data_dir=data_dir, config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
