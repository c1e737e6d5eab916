"""Boxes, labels and masks of TFDS builders for the tf.data loader (detection and segmentation data).

  config.data.boxes_key    a BBoxFeature sequence, e.g. 'objects/bbox' (coco/2017): TFDS stores
                           (ymin, xmin, ymax, xmax) as fractions of the image
  config.data.labels_key   its class ids, e.g. 'objects/label' (coco/2017: 0..79)
  config.data.mask_key     a segmentation mask, an Image feature with one channel of class ids,
                           e.g. 'segmentation_mask' (oxford_iiit_pet)
  config.data.max_objects  boxes kept per example (the first ones; the rest are dropped and
                           counted in the batch field `dropped_objects`)
  config.data.caption_key  may be '' for such data: every example then has an empty caption

The loader turns them into the batch fields the digits have (pipeline.OBJECT_FIELDS):
boxes [M, 4] as (x1, y1, x2, y2) pixels of the decoded image, labels [M] (-1 padding),
num_objects, and mask [H, W] uint8, all following the image through the crop and resize
(boxes clipped, boxes cropped away removed, the mask nearest-neighbour). A builder
without masks gets an all-zero mask; one without boxes gets no objects.

A mask whose size differs from its image's is a corrupt record (on_error) rather than a
silent misalignment.
"""

import dataclasses
from typing import Optional

from clip_jax.data import shards


@dataclasses.dataclass(frozen=True)
class DenseKeys:
  boxes: Optional[list]
  labels: Optional[list]
  mask: Optional[list]
  max_objects: int

  @property
  def paths(self) -> list:
    return [k for k in (self.boxes, self.labels, self.mask) if k]


def keys_of(c, features) -> Optional[DenseKeys]:
  """The feature keys config.data names (None when it names none), with errors naming the field."""
  boxes_key, labels_key, mask_key = c.get('boxes_key', ''), c.get('labels_key', ''), c.get('mask_key', '')
  if not (boxes_key or labels_key or mask_key):
    return None
  if bool(boxes_key) != bool(labels_key):
    raise ValueError(f'config.data.boxes_key={boxes_key!r} and labels_key={labels_key!r}: set both (the boxes and '
                     "their class ids, e.g. 'objects/bbox' and 'objects/label') or neither")
  available = ', '.join(shards.tfds_feature_paths(features))
  found = {}
  for field, path in (('boxes_key', boxes_key), ('labels_key', labels_key), ('mask_key', mask_key)):
    if not path:
      found[field] = None
      continue
    keys = shards.feature_keys(features, path)
    if keys is None:
      raise ValueError(f'config.data.{field}={path!r} is not a feature of this dataset; set it to one of: {available}')
    found[field] = keys
  max_objects = int(c.get('max_objects', 100))
  if max_objects < 1:
    raise ValueError(f'config.data.max_objects={max_objects} must be >= 1')
  return DenseKeys(found['boxes_key'], found['labels_key'], found['mask_key'], max_objects)


def select(ex, keys: DenseKeys):
  """The raw dense fields of one example (TF): normalised boxes [N, 4] yxyx, labels [N], mask [H, W, 1] or None."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  if keys.boxes:
    out['_boxes'] = tf.reshape(tf.cast(shards.get_path(ex, keys.boxes), tf.float32), [-1, 4])
    out['_labels'] = tf.reshape(tf.cast(shards.get_path(ex, keys.labels), tf.int32), [-1])
  if keys.mask:
    out['_mask'] = shards.get_path(ex, keys.mask)
  return out


def to_objects(el, keys: DenseKeys):
  """el with the digits-style fields boxes [M, 4] pixels, labels [M], num_objects, mask [H, W] (TF),
  from the raw ones `select` added and the decoded image. Returns (el, mask_matches_image)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  el = dict(el)
  shape = tf.shape(el['image'])
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  m = keys.max_objects
  if keys.boxes:
    yxyx, labels = el.pop('_boxes'), el.pop('_labels')
    boxes = tf.stack([yxyx[:, 1] * width, yxyx[:, 0] * height, yxyx[:, 3] * width, yxyx[:, 2] * height], -1)
    n = tf.minimum(tf.shape(boxes)[0], tf.shape(labels)[0])  # a record with unequal counts keeps the shorter
    kept = tf.minimum(n, m)
    el['dropped_objects'] = n - kept
    el['boxes'] = tf.pad(boxes[:kept], [[0, m - kept], [0, 0]])
    el['labels'] = tf.pad(labels[:kept], [[0, m - kept]], constant_values=-1)
    el['num_objects'] = kept
  else:
    el['boxes'] = tf.zeros([m, 4], tf.float32)
    el['labels'] = -tf.ones([m], tf.int32)
    el['num_objects'] = tf.constant(0, tf.int32)
    el['dropped_objects'] = tf.constant(0, tf.int32)
  if keys.mask:
    mask = el.pop('_mask')
    mask = tf.cast(mask[..., 0] if mask.shape.rank == 3 else mask, tf.uint8)
    ok = tf.reduce_all(tf.shape(mask)[:2] == shape[:2])
    el['mask'] = tf.cond(ok, lambda: mask, lambda: tf.zeros(shape[:2], tf.uint8))
  else:
    ok = tf.constant(True)
    el['mask'] = tf.zeros(shape[:2], tf.uint8)
  return el, ok
