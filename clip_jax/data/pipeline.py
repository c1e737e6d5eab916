"""The trainer's input pipelines: one entry point, two loaders, one batch dict.

    it = make_iterator(config.data, batch_size=256, image_size=64, context_length=77, seed=0)
    batch = next(it)           # this process's share of the global batch
    state = it.get_state()     # bytes: checkpoint with the model
    it.set_state(state)        # resume exactly

`config.data.loader` picks the reader: 'grain' (embedded digits, or
ArrayRecord shards written by `python -m clip_jax.data.shards`) or 'tfdata'
(any TFDS builder, or the digits as a locally generated TFDS builder). Both
yield the same per-process batch (b = batch_size // process_count):

  image        uint8   [b, image_size, image_size, 3]
  tokens       int32   [b, context_length]   clip_jax.tokenize(caption)
  prompt_tokens int32  [b, K, context_length] } with data.prompts.max_prompts = K > 0:
  prompt_valid bool    [b, K]                 } the caption's nouns as prompts (`prompts`)
  mask         uint8   [b, image_size, image_size]   } digits data, or a TFDS
  boxes        float32 [b, M, 4]                     } builder's boxes / masks
  labels       int32   [b, M]                        } (tfds_dense): the crop/resize
  num_objects  int32   [b]                           } applied, boxes clipped,
                                                     } objects cropped away removed
  valid        bool    [b]                   eval only: False on padding rows

Training iterators are infinite: epochs repeat, reshuffled each epoch,
deterministic given the seed; each example gets a random-resized-crop (see
`augment`) and, for records with several captions, a random one, drawn from
an RNG keyed by (seed, epoch, record), never from the read order. Eval
iterators make one pass in order with the eval geometry and the first
caption; every process yields the same number of batches,
ceil(ceil(N / process_count) / b), padding with valid=False rows, so a
multi-process eval loop never waits on a process that ran out.

Each process reads a disjoint contiguous share of the split (sizes differ by
at most one, as `tfds.even_splits`). Corrupt records (image bytes that do not
decode, no non-blank caption) are dropped and counted in `it.skipped` with
`on_error='skip'` (in eval too: the rows they would have filled become
padding at the end of the pass), or stop the run with a ValueError naming the
record with 'raise'.

Iterator state is exact: after `set_state(s)` the next batch is the one the
iterator that produced `s` would have yielded next, and `skipped` is
restored with it. How each loader does it is described in `grain_loader`
and `tfdata_loader`.
"""

import abc
import glob
import os
from typing import Dict, Optional, Tuple

import ml_collections
import numpy as np

from clip_jax.data import augment
from clip_jax.data import prompts

LOADERS = ('grain', 'tfdata')
SOURCES = ('digits', 'tfds', 'arrayrecord')
ON_ERROR = ('skip', 'raise')
# The per-object fields a batch carries when the data has them (digits).
OBJECT_FIELDS = ('mask', 'boxes', 'labels', 'num_objects')


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data` with every field at its default."""
  c = ml_collections.ConfigDict()
  c.loader = 'grain'            # 'grain' | 'tfdata'
  c.source = 'digits'           # 'digits' | 'tfds' (tfdata) | 'arrayrecord' (grain)
  # TFDS (loader='tfdata'). For source='digits' tfdata generates the digits
  # as a local TFDS builder under tfds_data_dir ('' = TFDS's default dir).
  c.tfds_name = ''              # e.g. 'coco_captions' or 'laion400m'
  c.tfds_data_dir = ''
  c.train_split = 'train'       # TFDS split syntax works: 'train[:90%]'
  c.eval_split = 'test'
  c.image_key = 'image'         # TFDS feature holding the image
  # TFDS feature holding the caption; 'a/b' reaches into nested features
  # ('captions/text' for coco_captions). A sequence of captions gives a
  # random one per example in training and the first in eval.
  c.caption_key = 'caption'
  # True: TFDS hands over the encoded image bytes and the pipeline decodes
  # them, so a corrupt image follows on_error. False: TFDS decodes (a corrupt
  # image then stops the pipeline); only needed for odd builders.
  c.decode_in_pipeline = True
  # Detection / segmentation features (tf.data; see clip_jax.data.tfds_dense): e.g. coco/2017's
  # 'objects/bbox' and 'objects/label', a builder's 'segmentation_mask'. '' = none.
  c.boxes_key = ''
  c.labels_key = ''
  c.mask_key = ''
  c.max_objects = 100
  # ArrayRecord shards (loader='grain'), globs of files written by
  # `python -m clip_jax.data.shards`.
  c.arrayrecord_pattern = ''
  c.arrayrecord_eval_pattern = ''

  c.digits = ml_collections.ConfigDict()
  c.digits.num_train = 20_000
  c.digits.num_test = 2_000
  c.digits.seed = 0             # which scenes (the run's seed orders and augments them)
  c.digits.canvas_size = 64
  c.digits.num_digits = (1, 3)
  # Per training example, the probability that its caption leaves out the
  # colours ('a photo of a seven and a two.').
  c.digits.drop_color_prob = 0.0

  # Caption nouns as prompts (GroupViT's multi-label loss); see clip_jax.data.prompts.
  c.prompts = prompts.default_config()

  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True      # False: training uses the eval geometry
  c.augment.scale = (0.9, 1.0)  # crop area as a fraction of the image (open_clip's default)
  c.augment.ratio = (3 / 4, 4 / 3)  # crop width / height, sampled log-uniformly

  # tf.data: records in the shuffle buffer. The tf.data iterator state holds
  # the buffer (a record's stored size each: ~2 KB for digits, so ~4 MB of
  # the ~6 MB state at batch 128, 64 px), plus in-flight and prefetched batches.
  c.shuffle_buffer = 2_048
  c.num_workers = 0             # grain worker processes (training; eval reads in order here)
  c.num_threads = 2             # grain reader threads per process (the GIL limits more)
  c.prefetch = 2                # batches prepared ahead
  c.on_error = 'skip'           # corrupt records: 'skip' (counted) | 'raise'
  return c


class DataIterator(abc.ABC):
  """What both loaders implement; see the module docstring."""

  skipped: int = 0  # corrupt records dropped so far by this process (restored with the state)

  def __iter__(self):
    return self

  @abc.abstractmethod
  def __next__(self) -> Dict[str, np.ndarray]:
    ...

  @abc.abstractmethod
  def get_state(self) -> bytes:
    """This process's position, opaque; small enough to save every few hundred steps."""

  @abc.abstractmethod
  def set_state(self, state: bytes):
    """Restores a position from `get_state`; the next batch is the one that followed it."""

  def close(self):
    """Releases threads, worker processes and files."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_iterator(data_config, *, batch_size: int, image_size: int, context_length: int,
                  seed: int, train: bool = True, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> DataIterator:
  """This process's iterator over `data_config`'s data.

  Args:
    data_config: `config.data` (see `default_data_config`).
    batch_size: the GLOBAL batch size; each process yields batch_size // process_count.
    image_size: side of the square images.
    context_length: token row length.
    seed: the run's seed: shuffling, crops and caption choices follow from it.
    train: infinite shuffled augmented stream, or one ordered eval pass.
    process_index, process_count: this process's share; default from JAX.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  local_batch = local_batch_size(batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} must be in [0, process_count={process_count})')
  for name, value in (('image_size', image_size), ('context_length', context_length)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}')
  validate(data_config)
  kwargs = dict(local_batch=local_batch, image_size=int(image_size),
                context_length=int(context_length), seed=int(seed), train=bool(train),
                process_index=int(process_index), process_count=int(process_count))
  if data_config.loader == 'grain':
    from clip_jax.data import grain_loader  # pylint: disable=g-import-not-at-top
    return grain_loader.GrainIterator(data_config, **kwargs)
  from clip_jax.data import tfdata_loader  # pylint: disable=g-import-not-at-top
  return tfdata_loader.TFDataIterator(data_config, **kwargs)


def local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} (global) must be a positive multiple of '
                     f'process_count {process_count}: each process yields batch_size // '
                     'process_count examples; change the batch size')
  return batch_size // process_count


def validate(c) -> None:
  """Config checks that need no data: a ValueError naming the field and the fix."""
  def one_of(field, value, allowed):
    if value not in allowed:
      raise ValueError(f'config.data.{field} must be one of {allowed}, got {value!r}')
  one_of('loader', c.loader, LOADERS)
  one_of('source', c.source, SOURCES)
  one_of('on_error', c.on_error, ON_ERROR)
  if c.loader == 'tfdata' and c.source == 'arrayrecord':
    raise ValueError("config.data.source='arrayrecord' needs config.data.loader='grain' "
                     '(tf.data reads TFDS builders)')
  if c.loader == 'grain' and c.source == 'tfds':
    raise ValueError("config.data.source='tfds' needs config.data.loader='tfdata'; to read a "
                     'TFDS dataset with grain, write it to ArrayRecord shards with '
                     '`python -m clip_jax.data.shards --from_tfds NAME:SPLIT --out PREFIX` and '
                     "set source='arrayrecord'")
  if c.source == 'tfds' and not c.tfds_name:
    raise ValueError("config.data.tfds_name is empty but source='tfds': set it to a TFDS "
                     "builder name, e.g. 'coco_captions'")
  if c.loader == 'tfdata':
    if not c.image_key:  # caption_key may be empty: detection / segmentation data (tfds_dense)
      raise ValueError('config.data.image_key is empty: name the TFDS feature to read')
  if c.augment.enabled:
    augment.check_params(c.augment.scale, c.augment.ratio)
  if not 0 <= c.digits.drop_color_prob <= 1:
    raise ValueError(f'config.data.digits.drop_color_prob must be in [0, 1], '
                     f'got {c.digits.drop_color_prob}')
  if 'prompts' in c:
    prompts.validate(c.prompts)
  for field, lo in (('shuffle_buffer', 1), ('num_workers', 0), ('num_threads', 0), ('prefetch', 0)):
    if c[field] < lo:
      raise ValueError(f'config.data.{field} must be >= {lo}, got {c[field]}')


def arrayrecord_files(c, train: bool):
  """The sorted shard files of config.data.arrayrecord_[eval_]pattern."""
  field = 'arrayrecord_pattern' if train else 'arrayrecord_eval_pattern'
  pattern = c[field]
  if not pattern:
    raise ValueError(f"config.data.{field} is empty but source='arrayrecord': set it to a glob "
                     'of shards, e.g. /data/cc3m/train-*.array_record (write them with '
                     '`python -m clip_jax.data.shards`)')
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise ValueError(f'config.data.{field}={pattern!r} matches no files: check the path, or '
                     'write shards with `python -m clip_jax.data.shards ... --out PREFIX`')
  return files


def shard_range(num_examples: int, process_index: int, process_count: int) -> Tuple[int, int]:
  """[start, stop) of this process's contiguous share, as tfds.even_splits:
  the first num_examples % process_count processes get one extra."""
  q, r = divmod(num_examples, process_count)
  start = process_index * q + min(process_index, r)
  return start, start + q + (process_index < r)


def num_eval_batches(num_examples: int, process_count: int, local_batch: int) -> int:
  """Batches every process yields in eval: enough for the largest share."""
  largest = -(-num_examples // process_count)
  return -(-largest // local_batch)


def pad_batch(batch: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
  """Pads a batch's rows to `size` and adds `valid` (eval): padding rows are
  zeros, labels -1, valid False."""
  n = len(batch['image'])
  out = {}
  for key, value in batch.items():
    fill = -1 if key == 'labels' else 0
    pad = np.full((size - n,) + value.shape[1:], fill, value.dtype)
    out[key] = np.concatenate([value, pad]) if n < size else value
  out['valid'] = np.arange(size) < n
  return out


def empty_rows(spec: Dict[str, Tuple[tuple, np.dtype]]) -> Dict[str, np.ndarray]:
  """Zero-row arrays with the batch's field shapes (for padding-only batches)."""
  return {key: np.zeros((0,) + tuple(shape), dtype) for key, (shape, dtype) in spec.items()}


def batch_spec(image_size: int, context_length: int, max_objects: Optional[int], max_prompts: int = 0):
  """{field: (per-example shape, dtype)} of a batch (without `valid`)."""
  spec = {'image': ((image_size, image_size, 3), np.uint8),
          'tokens': ((context_length,), np.int32)}
  if max_prompts:
    spec.update(prompt_tokens=((max_prompts, context_length), np.int32), prompt_valid=((max_prompts,), np.bool_))
  if max_objects:
    spec.update(mask=((image_size, image_size), np.uint8), boxes=((max_objects, 4), np.float32),
                labels=((max_objects,), np.int32), num_objects=((), np.int32))
  return spec


def corrupt_message(what: str, reason: str) -> str:
  return (f'corrupt record {what}: {reason}. Set config.data.on_error=\'skip\' to drop such '
          'records (they are counted in it.skipped and the metrics), or fix the data.')


def check_state_spec(saved: dict, expected: dict, loader: str):
  """A state from another data setup would resume at a wrong position: refuse it."""
  diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
  if diff:
    lines = ', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in diff.items())
    raise ValueError(f'{loader} iterator state does not match this iterator ({lines}); restore '
                     'with the data config, batch size, seed and process layout it was saved '
                     'with, or start the data iterator afresh (skip set_state)')
