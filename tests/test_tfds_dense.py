"""The tf.data loader on TFDS detection and segmentation builders (coco/2017 boxes, a mask feature).

Both read mocked builders (`tfds.testing.mock_data`); the batch fields are compared with the mocked
examples put through the numpy reference geometry (clip_jax.data.augment): masks and labels
exactly, boxes to 1e-4 pixels (float32 in TF vs float64 here), noise images to 4 grey levels (TF's and
PIL's bicubic resizes round differently).
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from clip_jax.data import augment, pipeline


def _make(c, batch_size, image_size, train=False):
  return pipeline.make_iterator(c, batch_size=batch_size, image_size=image_size, context_length=16, seed=0,
                                train=train, process_index=0, process_count=1)


def _coco_config(max_objects=4):
  c = pipeline.default_data_config()
  c.loader, c.source, c.tfds_name = 'tfdata', 'tfds', 'coco/2017'
  c.eval_split = 'validation'
  c.caption_key = ''  # detection data: no captions
  c.boxes_key, c.labels_key, c.max_objects = 'objects/bbox', 'objects/label', max_objects
  c.decode_in_pipeline = False  # the mock cannot encode coco's nested sequences
  return c


def test_coco_boxes_follow_the_image_geometry():
  size = 24
  with tfds.testing.mock_data(num_examples=6, num_sub_examples=3):
    # Read with the loader's decoders: the mock draws its random values per decoded feature.
    decoders = tfds.decode.PartialDecoding({'image': True, 'objects': {'bbox': True, 'label': True}})
    ref = list(tfds.as_numpy(tfds.builder('coco/2017').as_dataset(split='validation', decoders=decoders)))
    it = _make(_coco_config(max_objects=2), batch_size=6, image_size=size)
    batch = next(it)
  assert batch['boxes'].shape == (6, 2, 4) and batch['labels'].shape == (6, 2) and batch['mask'].shape == (6, size, size)
  assert not batch['mask'].any()  # coco/2017 has no masks: all background
  assert (batch['tokens'][:, 2:] == 0).all()  # an empty caption: start and end tokens only
  dropped = 0
  for i, ex in enumerate(ref):
    h, w = ex['image'].shape[:2]
    count = min(len(ex['objects']['bbox']), len(ex['objects']['label']))  # the mock's counts may differ
    yxyx = ex['objects']['bbox'].reshape(-1, 4)[:count]
    pixels = np.stack([yxyx[:, 1] * w, yxyx[:, 0] * h, yxyx[:, 3] * w, yxyx[:, 2] * h], -1)[:2]
    labels = ex['objects']['label'][:count][:2]
    dropped += max(0, count - 2)
    scale, offset = augment.geometry_boxes_np(None, h, w, size)
    boxes, labels, n = augment.transform_boxes(np.pad(pixels, [[0, 2 - len(pixels)], [0, 0]]),
                                               np.pad(labels, [0, 2 - len(labels)], constant_values=-1),
                                               len(pixels), scale, offset, size)
    assert batch['num_objects'][i] == n
    np.testing.assert_allclose(batch['boxes'][i], boxes, atol=1e-4)
    np.testing.assert_array_equal(batch['labels'][i], labels)
    # Boxes reaching outside the crop are clipped into it; ones left empty (or with x2 < x1) are gone.
    real = batch['boxes'][i, :n]
    assert ((real >= 0) & (real <= size)).all() and (real[:, 2] > real[:, 0]).all() and (real[:, 3] > real[:, 1]).all()
  assert it.dropped_objects == dropped


def _pets(examples):
  """A mock of a segmentation builder (oxford_iiit_pet's features) yielding `examples`."""
  def as_dataset(self, *args, **kwargs):
    del args, kwargs
    rows = [dict(image=im, segmentation_mask=m[..., None], file_name=f'{i}.png', label=0, species=0,
                 head_bbox=np.zeros(4, np.float32), tfds_id=f'pets-{i}') for i, (im, m) in enumerate(examples)]
    spec = dict(self.info.features.get_tensor_spec(), tfds_id=tf.TensorSpec([], tf.string))
    ds = tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=spec)
    return ds.apply(tf.data.experimental.assert_cardinality(len(rows)))
  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def _pets_config():
  c = pipeline.default_data_config()
  c.loader, c.source, c.tfds_name, c.eval_split = 'tfdata', 'tfds', 'oxford_iiit_pet', 'test'
  c.caption_key, c.mask_key = '', 'segmentation_mask'
  c.decode_in_pipeline = False
  return c


def test_segmentation_masks_follow_the_image_geometry():
  rng = np.random.default_rng(0)
  examples = [(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), rng.integers(0, 4, (h, w), dtype=np.uint8))
              for h, w in ((24, 36), (48, 24), (12, 12))]  # integer scale factors: see below
  with _pets(examples):
    batch = next(_make(_pets_config(), batch_size=3, image_size=12))
  for i, (image, mask) in enumerate(examples):
    # Integer down-scaling factors: at other factors TF's nearest resize and PIL's NEAREST pick a
    # neighbouring source pixel for some outputs (augment's TF and numpy paths differ there).
    want_image, want_mask = augment.center_crop(image, 12, mask)
    np.testing.assert_array_equal(batch['mask'][i], want_mask)
    # TF's float and PIL's fixed-point bicubic differ by a few levels on noise; the mask (nearest) is exact.
    np.testing.assert_allclose(batch['image'][i], want_image, atol=4)
  assert batch['num_objects'].tolist() == [0, 0, 0] and (batch['labels'] == -1).all()


def test_mask_of_another_size_is_refused():
  rng = np.random.default_rng(1)
  examples = [(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), np.zeros((20, 21), np.uint8))]
  with _pets(examples), pytest.raises(tf.errors.InvalidArgumentError, match='mask size differs from the image size'):
    next(_make(_pets_config(), batch_size=1, image_size=12))


def test_dense_key_errors_name_the_field():
  with tfds.testing.mock_data(num_examples=2):
    c = _coco_config()
    c.labels_key = ''
    with pytest.raises(ValueError, match=r"boxes_key='objects/bbox' and labels_key='': set both"):
      _make(c, batch_size=2, image_size=16)
    c = _coco_config()
    c.boxes_key = 'objects/box'
    with pytest.raises(ValueError, match=r"boxes_key='objects/box' is not a feature .*objects/bbox"):
      _make(c, batch_size=2, image_size=16)
