"""The grain loader: digits or ArrayRecord shards -> per-process batches.

Training reads one global stream, the same whatever the process count:

    MapDataset.range(N).shuffle(seed).repeat()   the global order: a new permutation per epoch
      ProcessRows(B, b, p)                 this process's rows of every global batch:
                                           positions t*B + p*b ... t*B + p*b + b-1
      .map(ExampleTransform.pair)          read, decode, crop, caption, tokenize
      .to_iter_dataset(threads, prefetch)
      DropCorrupt                          drop corrupt records, count them per example
      .batch(b)  [.mp_prefetch(num_workers)]   workers build whole batches

so process p reads records no other process reads, and the global batch a
run trains on does not depend on how many processes assemble it: 1, 2 or 4
processes train the same run. Eval reads `MapDataset.range(start, stop)`,
this process's contiguous share, in order.

Every element is a pure function of (seed, stream position, record index):
the permutation is grain's index shuffle, and the augmentation RNG is seeded
by (seed, epoch, record), so the stream can restart anywhere. A corrupt
record raises inside ExampleTransform (on_error='raise') or becomes a marker
that DropCorrupt drops, telling the next example how many it dropped; the
batch's sum of those is added to `skipped` here.

State (`get_state`) is JSON: grain's iterator state (the number of stream
elements consumed, or its per-worker equivalent with mp_prefetch), which
grain keeps in step with the delivered batches, plus `skipped` and the eval
counters. A few hundred bytes. Worker processes make the batch order depend
on num_workers (each worker batches its own slice of the stream), so the
state records it and refuses another worker count.
"""

import io
import json
import os

from absl import flags
import grain
import numpy as np
from PIL import Image

from clip_jax.data import augment
from clip_jax.data import digits
from clip_jax.data import pipeline
from clip_jax.data import prompts
from clip_jax.data import shards
from clip_jax.data import tokenizer

_FORMAT = 'clip_jax.grain/1'
# Errors that mean "these image bytes are not a decodable image".
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DigitsRecords:
  """DigitsSource with the record interface: load(i) -> shards.Record-like."""

  def __init__(self, c, train: bool):
    split = c.train_split if train else c.eval_split
    if split not in digits.SPLITS:
      field = 'train_split' if train else 'eval_split'
      raise ValueError(f'config.data.{field}={split!r}: the digits have splits {digits.SPLITS}')
    d = c.digits
    self.source = digits.DigitsSource(split, d.num_train if train else d.num_test, d.seed,
                                      d.canvas_size, tuple(d.num_digits))
    self.max_objects = self.source.max_objects
    self.name = repr(self.source)

  def __len__(self):
    return len(self.source)

  def load(self, index: int):
    ex = self.source[index]
    arrays = {k: ex[k] for k in ('mask', 'boxes', 'labels', 'colors', 'num_objects')}
    return ex['image'], [ex['caption']], f'digits {self.source.split} {index}', arrays


class ShardRecords:
  """ArrayRecord shards in `shards`' format."""

  def __init__(self, c, train: bool):
    self.files = pipeline.arrayrecord_files(c, train)
    self.source = grain.sources.ArrayRecordDataSource(self.files)
    # Names, not paths: a run may resume with its shards mounted elsewhere.
    self.name = f'{len(self.files)} ArrayRecord shard(s) {os.path.basename(self.files[0])}...'
    self.max_objects = None
    if len(self.source):
      try:
        arrays = shards.decode_record(self.source[0]).arrays
      except shards.CorruptRecordError:
        arrays = {}
      if all(k in arrays for k in pipeline.OBJECT_FIELDS):
        self.max_objects = int(arrays['boxes'].shape[0])

  def __len__(self):
    return len(self.source)

  def load(self, index: int):
    r = shards.decode_record(self.source[index])
    return r.image, r.captions, r.key, r.arrays


def decode_image(data) -> np.ndarray:
  """uint8 [H, W, 3] from encoded bytes (any format PIL reads) or an array."""
  if isinstance(data, np.ndarray):
    return data
  with Image.open(io.BytesIO(data)) as im:
    rgb = im.convert('RGB')  # forces the full decode: truncated files fail here
  array = np.asarray(rgb)
  if array.ndim != 3 or min(array.shape[:2]) < 1:
    raise ValueError(f'decoded to an empty image {array.shape}')
  return array


def _entropy(seed: int):
  return int(seed) % 2**64


class ExampleTransform:
  """(stream position, record index) -> example dict. Picklable (grain worker
  processes run it).

  The example's randomness comes from one vector of draws,
  rng((seed, epoch, record)).random(NUM_UNIFORMS + 2): the crop window, then
  the caption choice, then the colour drop. A corrupt record raises with
  on_error='raise'; with 'skip' it becomes {'_error', '_record'}, which
  DropCorrupt drops.
  """

  def __init__(self, records, c, *, train, seed, epoch_len, image_size, context_length):
    self.records, self.train, self.seed = records, train, _entropy(seed)
    self.epoch_len, self.size, self.context_length = epoch_len, image_size, context_length
    self.on_error = c.on_error
    self.augment = train and c.augment.enabled
    if self.augment:
      self.scale, self.ratio = augment.check_params(c.augment.scale, c.augment.ratio)
    self.drop_color_prob = float(c.digits.drop_color_prob) if train else 0.0
    self.has_objects = records.max_objects is not None
    self.prompts = prompts.settings(c)

  def pair(self, position_and_index):
    """The (global position, record) pairs ProcessRows yields."""
    return self(*position_and_index)

  def __call__(self, position: int, index: int):
    index = int(index)
    try:
      image, captions, name, arrays = self.records.load(index)
    except shards.CorruptRecordError as e:
      return self._corrupt(str(index), str(e))
    key = f'{index} ({name})' if name else str(index)
    captions = [c for c in captions if c.strip()]
    if not captions:
      return self._corrupt(key, 'no non-blank caption')
    if self.has_objects and not all(k in arrays for k in pipeline.OBJECT_FIELDS):
      return self._corrupt(key, f'missing object arrays {pipeline.OBJECT_FIELDS}')
    try:
      image = decode_image(image)
    except _IMAGE_ERRORS as e:
      return self._corrupt(key, f'image does not decode ({type(e).__name__}: {e})')

    u = None
    if self.train:
      epoch = position // self.epoch_len
      u = np.random.default_rng((self.seed, epoch, index)).random(augment.NUM_UNIFORMS + 2)
    height, width = image.shape[:2]
    mask = arrays.get('mask') if self.has_objects else None
    window = None
    if self.augment:
      window = augment.crop_window(u[:augment.NUM_UNIFORMS], height, width, self.scale, self.ratio)
      image, mask = augment.resized_crop(image, window, self.size, mask)
    else:
      image, mask = augment.center_crop(image, self.size, mask)

    caption = captions[int(u[-2] * len(captions))] if self.train else captions[0]
    if self.drop_color_prob and 'colors' in arrays and u[-1] < self.drop_color_prob:
      k = int(arrays['num_objects'])
      caption = digits.caption_for(list(zip([None] * k, arrays['labels'][:k].tolist())),
                                   include_colors=False)
    out = {'image': np.ascontiguousarray(image),
           'tokens': tokenizer.tokenize([caption], self.context_length)[0]}
    if self.prompts is not None:  # nouns of the caption this example trains on (colours dropped or not)
      out.update({k: v[0] for k, v in prompts.prompt_fields([caption], *self.prompts, self.context_length).items()})
    if self.has_objects:
      scale_xy, offset_xy = augment.geometry_boxes_np(window, height, width, self.size)
      out['boxes'], out['labels'], out['num_objects'] = augment.transform_boxes(
          arrays['boxes'], arrays['labels'], arrays['num_objects'], scale_xy, offset_xy, self.size)
      out['mask'] = np.ascontiguousarray(mask)
    return out

  def _corrupt(self, record: str, reason: str):
    if self.on_error == 'raise':
      raise ValueError(pipeline.corrupt_message(record, reason))
    return {'_error': reason, '_record': record}


class ProcessRows(grain.MapDataset):
  """Element j of this process's stream is global position
  g = (j // b) * B + p * b + j % b of `parent`, yielded as (g, parent[g]):
  process p's rows of global batch j // b."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, local_batch: int, process_index: int):
    super().__init__(parent)
    self._global, self._local, self._offset = global_batch, local_batch, process_index * local_batch

  def __len__(self):
    return len(self._parent) // self._global * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g = index // self._local * self._global + self._offset + index % self._local
    return g, self._parent[g]

  def __str__(self):
    return f'ProcessRows(global_batch={self._global}, local_batch={self._local}, offset={self._offset})'


class DropCorrupt(grain.IterDataset):
  """Drops corrupt-record markers; each example that follows carries
  `_dropped`, how many were dropped just before it, so batches count them
  wherever batching runs (worker processes included). Markers after the last
  example of an eval pass are counted at its end (GrainIterator)."""

  def __init__(self, parent, limit: int):
    super().__init__(parent)
    self._limit = limit

  def __iter__(self):
    return _DropCorruptIterator(self._parent.__iter__(), self._limit)


class _DropCorruptIterator(grain.DatasetIterator):
  """Stateless on top of its parent: a batch boundary never falls inside a
  run of dropped records, because the run is consumed with the example after
  it."""

  def __init__(self, parent, limit):
    super().__init__(parent)
    self._limit = limit

  def __next__(self):
    dropped = 0
    while True:
      ex = next(self._parent)
      if '_error' not in ex:
        ex['_dropped'] = np.int32(dropped)
        return ex
      dropped += 1
      if dropped > self._limit:
        raise ValueError(f'every record of an epoch is corrupt (last: {ex["_record"]}: '
                         f'{ex["_error"]}); check the data')

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class GrainIterator(pipeline.DataIterator):
  """`pipeline.DataIterator` over grain; see the module docstring."""

  def __init__(self, c, *, local_batch, image_size, context_length, seed, train,
               process_index, process_count):
    records = DigitsRecords(c, train) if c.source == 'digits' else ShardRecords(c, train)
    n = len(records)
    start, stop = pipeline.shard_range(n, process_index, process_count)
    if stop == start:
      raise ValueError(f'{records.name} has {n} records: too few to give each of '
                       f'{process_count} processes one; add data or use fewer processes')
    self._train, self._local_batch = train, local_batch
    self._shard_len = shard_len = stop - start
    settings = prompts.settings(c)
    self._fields = pipeline.batch_spec(image_size, context_length, records.max_objects,
                                       settings[0] if settings else 0)
    self._num_batches = None if train else pipeline.num_eval_batches(n, process_count, local_batch)
    workers = c.num_workers if train else 0  # eval stays in order, in this process
    self._spec = {'train': train, 'seed': int(seed), 'local_batch': local_batch,
                  'image_size': image_size, 'context_length': context_length,
                  'process_index': process_index, 'process_count': process_count,
                  'source': records.name, 'num_records': n, 'num_workers': workers}

    if train:
      shuffle_seed = int(np.random.SeedSequence(_entropy(seed)).generate_state(1)[0])
      ds = grain.MapDataset.range(n).shuffle(seed=shuffle_seed).repeat()
      ds = ProcessRows(ds, local_batch * process_count, local_batch, process_index)
      transform = ExampleTransform(records, c, train=True, seed=seed, epoch_len=n, image_size=image_size,
                                   context_length=context_length)
      ds = ds.map(transform.pair)
    else:
      ds = grain.MapDataset.range(start, stop).map_with_index(ExampleTransform(
          records, c, train=False, seed=seed, epoch_len=shard_len, image_size=image_size,
          context_length=context_length))
    buffer = c.prefetch * local_batch
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.num_threads if buffer else 0,
                                                 prefetch_buffer_size=buffer))
    it_ds = DropCorrupt(it_ds, limit=n if train else shard_len)
    it_ds = it_ds.batch(local_batch, drop_remainder=train)
    if workers:
      # grain's worker processes read absl flags; outside an absl app (tests,
      # notebooks) nothing parsed them, so take the defaults. An app that
      # parses flags has done so before building the data pipeline.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=max(1, c.prefetch)))
    self._it = iter(it_ds)
    self._batches = 0
    self._delivered = 0  # eval: examples so far, for the drops after the last one
    self._exhausted = False
    self.skipped = 0

  def __next__(self):
    if self._num_batches is not None and self._batches >= self._num_batches:
      raise StopIteration
    batch = None
    if not self._exhausted:
      try:
        batch = next(self._it)
      except StopIteration:
        if self._train:
          raise RuntimeError('the training stream ended; it repeats forever') from None
        self._exhausted = True
        self.skipped = self._shard_len - self._delivered  # every record not delivered
    self._batches += 1
    if batch is None:
      return pipeline.pad_batch(pipeline.empty_rows(self._fields), self._local_batch)
    self.skipped += int(batch.pop('_dropped').sum())
    if self._train:
      return batch
    self._delivered += len(batch['image'])
    if len(batch['image']) < self._local_batch:  # only the pass's last batch is short
      self._exhausted = True
      self.skipped = self._shard_len - self._delivered
    return pipeline.pad_batch(batch, self._local_batch)

  def get_state(self) -> bytes:
    return json.dumps({'format': _FORMAT, 'spec': self._spec, 'grain': self._it.get_state(),
                       'skipped': self.skipped, 'batches': self._batches,
                       'delivered': self._delivered}).encode()

  def set_state(self, state: bytes):
    try:
      saved = json.loads(bytes(state).decode())
      ok = saved.get('format') == _FORMAT
    except (ValueError, AttributeError):
      ok = False
    if not ok:
      raise ValueError('not a grain data iterator state (config.data.loader must be the one '
                       'the checkpoint was written with)')
    pipeline.check_state_spec(saved['spec'], self._spec, 'grain')
    self._it.set_state(saved['grain'])
    self.skipped, self._batches = int(saved['skipped']), int(saved['batches'])
    self._delivered = int(saved['delivered'])
    self._exhausted = False

  def close(self):
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()
