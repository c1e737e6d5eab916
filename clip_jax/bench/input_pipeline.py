"""Input-pipeline throughput: grain and tf.data on the digits, grain on ArrayRecord shards.

Each reader gets the main job's data config (loader settings, augmentation,
batch, image size, context length) with the source swapped; only
`digits.num_train` is lowered to `records`, so that the tf.data builder and
the shards are quick to write (in a temporary directory, outside the timing).
A reader is built, yields `warmup` batches (threads and prefetch buffers
fill), then `batches` timed ones.
"""

import os
import tempfile
import time

READERS = ('grain_digits', 'tfdata_digits', 'grain_arrayrecord')


def _reader_config(data, reader: str, tmp: str, records: int):
  c = data.copy_and_resolve_references()
  c.digits.num_train = records
  c.digits.num_test = 16  # not read; keeps the tf.data builder quick to write
  if reader == 'grain_digits':
    c.loader, c.source = 'grain', 'digits'
  elif reader == 'tfdata_digits':
    c.loader, c.source, c.tfds_data_dir = 'tfdata', 'digits', os.path.join(tmp, 'tfds')
  elif reader == 'grain_arrayrecord':
    from clip_jax.data import shards  # pylint: disable=g-import-not-at-top
    d = c.digits
    prefix = os.path.join(tmp, 'shards', 'digits-train')
    shards.write_shards(shards.digits_records('train', records, d.seed, d.canvas_size, tuple(d.num_digits)),
                        records, prefix, num_shards=4)
    c.loader, c.source, c.arrayrecord_pattern = 'grain', 'arrayrecord', prefix + '-*'
  else:
    raise ValueError(f'unknown reader {reader!r}; choose from {READERS}')
  return c


def measure(make, batches: int, warmup: int, batch_size: int) -> dict:
  """Times `batches` next() calls of the iterator `make()` builds, after `warmup` untimed ones."""
  start = time.perf_counter()
  it = make()
  try:
    setup = time.perf_counter() - start
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return dict(setup_seconds=setup, batches=batches, seconds=seconds, batches_per_second=batches / seconds,
              images_per_second=batches * batch_size / seconds)


def run(config, readers=READERS, batches: int = 20, warmup: int = 2, records: int = 2048) -> dict:
  """reader -> throughput on `config`'s data, batch, image size and context length."""
  from clip_jax import models  # pylint: disable=g-import-not-at-top
  from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  out = {}
  with tempfile.TemporaryDirectory(prefix='clip_jax_bench_') as tmp:
    for reader in readers:
      start = time.perf_counter()
      c = _reader_config(config.data, reader, tmp, records)
      prepare = time.perf_counter() - start

      def make(c=c):
        return pipeline.make_iterator(c, batch_size=config.batch_size, image_size=config.model.vision.image_size,
                                      context_length=models.context_length(config.model), seed=config.seed,
                                      train=True, process_index=0, process_count=1)

      out[reader] = dict(measure(make, batches, warmup, config.batch_size), prepare_seconds=prepare)
  return out
