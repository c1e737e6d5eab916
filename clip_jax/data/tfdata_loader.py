"""The tf.data loader: any TFDS builder (or the digits as one) -> per-process batches.

    builder.as_dataset(this process's even split, encoded images, + tfds_id)
      [.shuffle(shuffle_buffer, seed).repeat()]   training; files shuffled too
      .enumerate()                                 stream position `pos`
      .map(select)   caption (random / first non-blank), per-example draws
      .filter(has a caption)
      .map(decode).ignore_errors()                 undecodable images drop out
      .map(transform)                              crop/resize, boxes, mask
      .batch(b).prefetch(prefetch)

Randomness is stateless: an example's draws are
stateless_uniform(seed=fold_in(fold_in(root(seed), epoch), hash(tfds_id))),
with epoch = pos // records in this process's split, so they do not depend on
read order or thread timing; shuffling uses fixed seeds and the pipeline runs
with `deterministic=True`.

Corrupt records (no non-blank caption; image bytes TF cannot decode) drop out
of the stream inside TF. Each batch carries the stream positions of its rows,
so the records that fell out are the gaps between consecutive positions: that
count is `skipped`, exact. With on_error='raise' the first gap is looked up
again (the same deterministic stream, replayed up to that position) to name
the record and the reason.

State: the tf.data iterator's own checkpoint (`tf.train.Checkpoint(
iterator=it)`, written to a temporary directory and packed into bytes) plus
the Python-side counters. TF checkpoints buffered elements, so the state
holds the shuffle buffer (shuffle_buffer x a stored record: ~2 KB per digits
record) and the in-flight and prefetched batches: ~6 MB for the digits at
batch 128, 64 px, written in ~0.3 s. For web-scale records (~100 KB JPEGs)
keep shuffle_buffer modest, or use grain, whose state is a few hundred bytes.
"""

import json
import os
import re
import struct
import tempfile

import numpy as np

from clip_jax.data import augment
from clip_jax.data import digits
from clip_jax.data import pipeline
from clip_jax.data import prompts
from clip_jax.data import shards
from clip_jax.data import tfds_dense
from clip_jax.data import tokenizer

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-order
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-order

# The input pipeline runs on the host: keep TF off any accelerator JAX owns.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices; nothing to hide then
  pass

_MAGIC = b'CJTF'
_FORMAT = 'clip_jax.tfdata/1'
_AUTOTUNE = tf.data.AUTOTUNE
# Object fields the digits builder has (colors drive the caption colour drop).
_OBJECT_KEYS = pipeline.OBJECT_FIELDS + ('colors',)


def _builder(c):
  data_dir = c.tfds_data_dir or None
  if c.source == 'digits':
    d = c.digits
    return digits.build_tfds(data_dir, d.num_train, d.num_test, d.seed, d.canvas_size,
                             tuple(d.num_digits))
  try:
    return tfds.builder(c.tfds_name, data_dir=data_dir)
  except Exception as e:  # tfds raises several kinds for unknown names
    raise ValueError(f'config.data.tfds_name={c.tfds_name!r}: TFDS cannot load it ({e}); '
                     'check the name (tfds.list_builders()) and config.data.tfds_data_dir') from e


def _check_features(c, features):
  """image_key / caption_key must name features: else list what exists."""
  available = ', '.join(shards.tfds_feature_paths(features))
  image = shards.tfds_feature(features, c.image_key)
  if image is None:
    raise ValueError(f'config.data.image_key={c.image_key!r} is not a feature of this dataset; '
                     f'set it to one of: {available}')
  if not c.caption_key:  # detection / segmentation data (clip_jax.data.tfds_dense): no captions
    return isinstance(image, tfds.features.Image)
  caption = shards.tfds_feature(features, c.caption_key)
  if caption is None:
    raise ValueError(f'config.data.caption_key={c.caption_key!r} is not a feature of this '
                     f'dataset; set it to one of: {available} (nested: \'captions/text\')')
  if caption.tf_dtype != tf.string:
    kind = caption.tf_dtype.name
    raise ValueError(f'config.data.caption_key={c.caption_key!r} is a {kind} feature, not '
                     'text; set it to a text feature')
  return isinstance(image, tfds.features.Image)


def _split_size(builder, split):
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError):  # mocked or unprepared builders know no splits
    return None


def _pack(header: dict, blobs) -> bytes:
  head = json.dumps(header).encode()
  return b''.join([_MAGIC, struct.pack('<I', len(head)), head] + list(blobs))


def _unpack(data: bytes):
  data = bytes(data)
  if data[:4] != _MAGIC:
    raise ValueError('not a tf.data iterator state (config.data.loader must be the one the '
                     'checkpoint was written with)')
  (n,) = struct.unpack('<I', data[4:8])
  header = json.loads(data[8:8 + n].decode())
  pos, blobs = 8 + n, {}
  for name, size in header['files']:
    blobs[name] = data[pos:pos + size]
    pos += size
  return header, blobs


class TFDataIterator(pipeline.DataIterator):
  """`pipeline.DataIterator` over tf.data; see the module docstring."""

  def __init__(self, c, *, local_batch, image_size, context_length, seed, train,
               process_index, process_count):
    self._c, self._train, self._local_batch = c, train, local_batch
    self._size, self._context_length, self._on_error = image_size, context_length, c.on_error
    self._seed = int(seed)
    builder = _builder(c)
    features = builder.info.features
    encoded = _check_features(c, features) and c.decode_in_pipeline
    self._encoded = encoded
    self._objects = all(k in features for k in _OBJECT_KEYS)
    self._dense = None if self._objects else tfds_dense.keys_of(c, features)
    self.dropped_objects = 0  # boxes beyond config.data.max_objects (tfds_dense)
    field = 'train_split' if train else 'eval_split'
    split = c[field]
    known = list(builder.info.splits)  # empty for mocked builders: anything goes
    if known and re.match(r'[^\[+]*', split).group(0).strip() not in known:
      raise ValueError(f'config.data.{field}={split!r} is not a split of {builder.name}; '
                       f'it has {known} (slices like \'train[:90%]\' work too)')
    self._process_split = tfds.even_splits(split, n=process_count,
                                           drop_remainder=False)[process_index]

    self._image_keys = shards.feature_keys(features, c.image_key)
    self._caption_keys = shards.feature_keys(features, c.caption_key) if c.caption_key else None
    keys = [self._image_keys] + ([self._caption_keys] if self._caption_keys else [])
    keys += [[k] for k in _OBJECT_KEYS] if self._objects else []
    keys += self._dense.paths if self._dense else []
    skip = shards.nested_keys([self._image_keys], tfds.decode.SkipDecoding())
    decoders = tfds.decode.PartialDecoding(shards.nested_keys(keys, True),
                                           decoders=skip if encoded else None)
    seeds = np.random.SeedSequence(int(seed) % 2**64).generate_state(4)
    self._base_seed = [int(s) for s in seeds[2:]]  # the draws' root, as int64
    read_config = tfds.ReadConfig(add_tfds_id=True, try_autocache=False,
                                  shuffle_seed=int(seeds[0]),
                                  shuffle_reshuffle_each_iteration=True)
    # An ordered builder (the digits) refuses file shuffling; its one file is
    # shuffled by the buffer alone.
    records = builder.as_dataset(split=self._process_split,
                                 shuffle_files=train and not builder.info.disable_shuffling,
                                 decoders=decoders, read_config=read_config)
    self._shard_len = int(records.cardinality())
    if self._shard_len < 0:
      self._shard_len = _split_size(builder, self._process_split) or -1
    if self._shard_len <= 0:
      raise ValueError(f'{builder.name} {split} has no records for process {process_index} of '
                       f'{process_count} (or an unknown count); use a bigger split')
    total = _split_size(builder, split) or self._shard_len * process_count
    self._num_batches = None if train else pipeline.num_eval_batches(total, process_count,
                                                                      local_batch)

    def stream():  # everything up to the stream position: replayed to name corrupt records
      ds = records
      if train:
        ds = ds.shuffle(c.shuffle_buffer, seed=int(seeds[1]), reshuffle_each_iteration=True)
        ds = ds.repeat()
      return ds.enumerate()
    self._stream = stream

    ds = stream().map(self._select, num_parallel_calls=_AUTOTUNE)
    ds = ds.filter(lambda el: el['_ok'])
    ds = ds.map(self._decode, num_parallel_calls=_AUTOTUNE)
    if encoded:
      ds = ds.ignore_errors()
    ds = ds.map(self._transform, num_parallel_calls=_AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=train)
    if c.prefetch:
      ds = ds.prefetch(c.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    self._ds = ds.with_options(options)
    self._it = iter(self._ds)

    config_name = builder.builder_config.name if builder.builder_config else ''
    self._spec = {'train': train, 'seed': self._seed, 'local_batch': local_batch,
                  'image_size': image_size, 'context_length': context_length,
                  'process_index': process_index, 'process_count': process_count,
                  'source': f'{builder.name}/{config_name} {split}', 'shard_len': self._shard_len}
    self._prompts = prompts.settings(c)
    max_objects = (features['boxes'].shape[0] if self._objects else
                   self._dense.max_objects if self._dense else None)
    self._fields = pipeline.batch_spec(image_size, context_length, max_objects,
                                       self._prompts[0] if self._prompts else 0)
    self.skipped = 0
    self._last_pos = -1
    self._batches = 0
    self._exhausted = False

  # ------------------------------------------------------------ tf.data maps

  def _select(self, pos, ex):
    if self._caption_keys is None:  # no captions (tfds_dense): every record is kept, its caption ''
      captions = tf.constant(['-'])
    else:
      captions = tf.reshape(shards.get_path(ex, self._caption_keys), [-1])
    captions = tf.boolean_mask(captions, tf.strings.length(tf.strings.strip(captions)) > 0)
    n = tf.size(captions, out_type=tf.int32)
    if self._train:
      epoch = pos // self._shard_len
      record = tf.strings.to_hash_bucket_fast(ex['tfds_id'], 2**62)
      seed = tf.constant(self._base_seed, tf.int64)
      seed = tf.random.experimental.stateless_fold_in(seed, epoch)
      seed = tf.random.experimental.stateless_fold_in(seed, record)
      u = tf.random.stateless_uniform([augment.NUM_UNIFORMS + 2], seed=seed, dtype=tf.float64)
      pick = tf.minimum(tf.cast(u[-2] * tf.cast(n, tf.float64), tf.int32), n - 1)
    else:
      u = tf.zeros([augment.NUM_UNIFORMS + 2], tf.float64)
      pick = 0
    caption = tf.concat([captions, ['']], 0)[tf.maximum(pick, 0)]  # '' when none: filtered
    if self._caption_keys is None:
      caption = tf.constant('')
    el = {'_pos': pos, '_u': u, '_ok': n > 0, 'image': shards.get_path(ex, self._image_keys),
          'caption': caption}
    if self._objects:
      for k in _OBJECT_KEYS:
        el[k] = ex[k] if k == 'boxes' else tf.cast(ex[k], tf.uint8 if k == 'mask' else tf.int32)
    if self._dense:
      el.update(tfds_dense.select(ex, self._dense))
    return el

  def _decode(self, el):
    image = el['image']
    if self._encoded:
      image = tf.io.decode_image(image, channels=3, expand_animations=False)
    else:
      image = tf.cast(image, tf.uint8)
      channels = image.shape[-1]
      image = tf.tile(image, [1, 1, 3]) if channels == 1 else image[..., :3]
    image = tf.ensure_shape(image, [None, None, 3])
    shape = tf.shape(image)
    with tf.control_dependencies([tf.debugging.assert_positive(
        tf.minimum(shape[0], shape[1]), message='empty image')]):
      el = dict(el, image=tf.identity(image))
    if self._dense:
      el, same_size = tfds_dense.to_objects(el, self._dense)
      with tf.control_dependencies([tf.debugging.Assert(same_size, [
          'config.data.mask_key: the mask size differs from the image size', tf.shape(el['image'])])]):
        el = dict(el, image=tf.identity(el['image']))
    return el

  def _transform(self, el):
    c, size, u = self._c, self._size, el['_u']
    image, mask = el['image'], el.get('mask')
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    window = None
    if self._train and c.augment.enabled:
      scale, ratio = augment.check_params(c.augment.scale, c.augment.ratio)
      window = augment.crop_window_tf(u[:augment.NUM_UNIFORMS], height, width, scale, ratio)
      image, mask = augment.resized_crop_tf(image, window, size, mask)
    else:
      image, mask = augment.center_crop_tf(image, size, mask)
    out = {'_pos': el['_pos'], 'image': tf.ensure_shape(image, [size, size, 3]),
           'caption': el['caption']}
    if self._dense:
      out['dropped_objects'] = el['dropped_objects']
    if self._objects or self._dense:
      scale_xy, offset_xy = augment.geometry_boxes_tf(window, height, width, size)
      out['boxes'], out['labels'], out['num_objects'] = augment.transform_boxes_tf(
          el['boxes'], el['labels'], el['num_objects'], scale_xy, offset_xy, size)
      out['mask'] = tf.ensure_shape(mask, [size, size])
      p = float(c.digits.drop_color_prob)
      if self._train and p > 0 and self._objects:
        plain = _plain_caption(el['labels'], el['num_objects'])
        out['caption'] = tf.where((u[-1] < p) & (el['num_objects'] > 0), plain, out['caption'])
    return out

  # ------------------------------------------------------------ Python side

  def __next__(self):
    if self._num_batches is not None and self._batches >= self._num_batches:
      raise StopIteration
    batch = None
    if not self._exhausted:
      try:
        batch = {k: v.numpy() for k, v in self._it.get_next().items()}
      except (StopIteration, tf.errors.OutOfRangeError):
        self._exhausted = True
        if self._train:
          raise RuntimeError('the training stream ended; it repeats forever') from None
        self._count_missing(np.array([self._shard_len], np.int64))  # corrupt records at the end
    if batch is None:
      batch = pipeline.empty_rows(self._fields)
    else:
      self._count_missing(batch.pop('_pos'))
      self.dropped_objects += int(batch.pop('dropped_objects', np.zeros(1)).sum())
      captions = [c.decode('utf-8', 'replace') for c in batch.pop('caption')]
      batch['tokens'] = tokenizer.tokenize(captions, self._context_length)
      if self._prompts is not None:  # on the host, as the tokens: the same code as the grain loader
        batch.update(prompts.prompt_fields(captions, *self._prompts, self._context_length))
      batch = {k: batch[k].astype(dtype, copy=False) for k, (_, dtype) in self._fields.items()}
      if not self._train and len(batch['image']) < self._local_batch:  # the pass's last batch
        self._exhausted = True
        self._count_missing(np.array([self._shard_len], np.int64))
    self._batches += 1
    if self._train:
      return batch
    return pipeline.pad_batch(batch, self._local_batch)

  def _count_missing(self, positions):
    """Stream positions absent between batches are records dropped as corrupt."""
    seen = np.concatenate([[self._last_pos], positions])
    gaps = np.diff(seen) - 1
    missing = int(gaps.sum())
    if missing and self._on_error == 'raise':
      first = int(seen[np.argmax(gaps > 0)] + 1)
      raise ValueError(pipeline.corrupt_message(*self._describe(first)))
    self.skipped += missing
    self._last_pos = int(positions[-1])

  def _describe(self, position):
    """(tfds_id, reason) of the record at a stream position (replays the stream)."""
    _, ex = next(iter(self._stream().skip(position).take(1)))
    key = f'{ex["tfds_id"].numpy().decode()} (stream position {position})'
    captions = (tf.reshape(shards.get_path(ex, self._caption_keys), [-1]).numpy() if self._caption_keys
                else [b'-'])
    if not any(c.decode('utf-8', 'replace').strip() for c in captions):
      return key, 'no non-blank caption'
    try:
      image = shards.get_path(ex, self._image_keys)
      if self._encoded:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
      if min(image.shape[:2]) < 1:
        return key, f'empty image {tuple(image.shape)}'
    except tf.errors.OpError as e:
      return key, f'image does not decode ({e.message})'
    return key, 'dropped by the pipeline (no decode error when replayed)'

  def get_state(self) -> bytes:
    with tempfile.TemporaryDirectory() as d:
      tf.train.Checkpoint(iterator=self._it).write(os.path.join(d, 'it'))
      names = sorted(os.listdir(d))
      blobs = []
      for name in names:
        with open(os.path.join(d, name), 'rb') as f:
          blobs.append(f.read())
    header = {'format': _FORMAT, 'spec': self._spec, 'skipped': self.skipped,
              'last_pos': self._last_pos, 'batches': self._batches,
              'exhausted': self._exhausted, 'files': [[n, len(b)] for n, b in zip(names, blobs)]}
    return _pack(header, blobs)

  def set_state(self, state: bytes):
    header, blobs = _unpack(state)
    if header.get('format') != _FORMAT:
      raise ValueError(f'unknown tf.data iterator state format {header.get("format")!r}')
    pipeline.check_state_spec(header['spec'], self._spec, 'tf.data')
    with tempfile.TemporaryDirectory() as d:
      for name, blob in blobs.items():
        with open(os.path.join(d, name), 'wb') as f:
          f.write(blob)
      tf.train.Checkpoint(iterator=self._it).read(os.path.join(d, 'it')).assert_consumed()
    self.skipped, self._last_pos = int(header['skipped']), int(header['last_pos'])
    self._batches, self._exhausted = int(header['batches']), bool(header['exhausted'])

  def close(self):
    self._it = None


def _plain_caption(labels, num_objects):
  """digits.caption_for(objects, include_colors=False) in TF ops."""
  table = tf.constant([digits.object_phrase(None, d, include_colors=False)
                       for d in range(digits.NUM_CLASSES)])
  k = tf.cast(num_objects, tf.int32)
  # One '' past the end keeps the indexing valid for k = 0 (the caller keeps
  # the original caption then).
  words = tf.concat([tf.gather(table, tf.maximum(labels[:k], 0)), ['']], 0)
  last = words[tf.maximum(k - 1, 0)]
  head = tf.strings.reduce_join(words[:tf.maximum(k - 1, 0)], separator=', ')
  body = tf.where(k > 1, head + ' and ' + last, last)
  return 'a photo of ' + body + '.'
