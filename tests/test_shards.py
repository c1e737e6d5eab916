"""ArrayRecord shards: the record format, the writer CLI, and grain reading them back."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from clip_jax.data import augment
from clip_jax.data import digits
from clip_jax.data import pipeline
from clip_jax.data import shards
from clip_jax.data import tokenizer

# grain and array-record are dependencies; an install without them skips, not fails.
pytest.importorskip('grain')
pytest.importorskip('array_record')


def _config(pattern, **overrides):
  c = pipeline.default_data_config()
  c.source = 'arrayrecord'
  c.arrayrecord_pattern = c.arrayrecord_eval_pattern = pattern
  for k, v in overrides.items():
    c[k] = v
  return c


def _iterator(c, batch_size=8, image_size=64, train=False, seed=0, **kw):
  return pipeline.make_iterator(c, batch_size=batch_size, image_size=image_size, context_length=32,
                                seed=seed, train=train, process_index=kw.pop('process_index', 0),
                                process_count=kw.pop('process_count', 1))


def _png(array) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, 'PNG')
  return out.getvalue()


def _consumed(it) -> int:
  """Stream elements grain has handed over (white box: its iterator state)."""
  return json.loads(it.get_state())['grain']['next_index']


def test_record_round_trip():
  arrays = {'mask': np.arange(12, dtype=np.uint8).reshape(3, 4),
            'boxes': np.array([[1.5, 2, 3, 4]], np.float32),
            'num_objects': np.int32(7), 'empty': np.zeros((0, 4), np.int64)}
  data = shards.encode_record(b'\x89PNG fake', ['un café ☕', 'second'], 'dir/x.jpg', arrays)
  assert data[:4] == b'CJR1'
  r = shards.decode_record(data)
  assert r.image == b'\x89PNG fake' and r.captions == ['un café ☕', 'second'] and r.key == 'dir/x.jpg'
  assert r.arrays.keys() == arrays.keys()
  for k, v in arrays.items():
    assert r.arrays[k].dtype == v.dtype and r.arrays[k].shape == np.shape(v)
    np.testing.assert_array_equal(r.arrays[k], v)
  assert shards.decode_record(shards.encode_record(b'', 'one caption')).captions == ['one caption']


@pytest.mark.parametrize('data', [
    b'', b'garbage that is no record', b'CJR1\x05\x00\x00\x00{"ke',
    b'CJR1' + (2).to_bytes(4, 'little') + b'{}',  # header lacks fields
    shards.encode_record(b'image', ['c'])[:-2],  # truncated payload
    shards.encode_record(b'image', ['c']) + b'xx',  # trailing bytes
])
def test_malformed_records_are_corrupt(data):
  with pytest.raises(shards.CorruptRecordError):
    shards.decode_record(data)


@pytest.fixture(scope='module')
def digit_shards(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp('digits') / 'test')
  summary = shards.main(['--from_digits', 'test', '--n', '20', '--out', prefix, '--num_shards', '3'])
  return prefix, summary


def test_digits_shards_layout(digit_shards):
  prefix, summary = digit_shards
  names = sorted(os.listdir(os.path.dirname(prefix)))
  assert names == [f'test-0000{k}-of-00003.array_record' for k in range(3)]
  assert summary['records'] == 20 and summary['shards'] == 3


def test_digits_shards_read_back_as_the_digits_source(digit_shards):
  """Shards of the digits read exactly as the digits themselves, train and eval."""
  prefix, _ = digit_shards
  from_shards = _config(f'{prefix}-*.array_record')
  from_source = pipeline.default_data_config()
  from_source.eval_split = from_source.train_split = 'test'
  from_source.digits.num_test = from_source.digits.num_train = 20
  for c in (from_shards, from_source):
    c.digits.drop_color_prob = 0.5
  src = digits.DigitsSource('test', 20)
  eval_batches = list(_iterator(from_shards, batch_size=8))
  assert len(eval_batches) == 3
  for b, ref in zip(eval_batches, _iterator(from_source, batch_size=8)):
    assert b.keys() == ref.keys()
    for k in b:
      np.testing.assert_array_equal(b[k], ref[k], err_msg=k)
  # Eval geometry at the canvas size is the identity: exact source examples.
  rows = {k: np.concatenate([b[k] for b in eval_batches])[:20] for k in eval_batches[0]}
  assert rows['valid'].all() and not eval_batches[-1]['valid'][4:].any()
  for i in range(20):
    ex = src[i]
    np.testing.assert_array_equal(rows['image'][i], ex['image'])
    np.testing.assert_array_equal(rows['mask'][i], ex['mask'])
    np.testing.assert_array_equal(rows['boxes'][i], ex['boxes'])
    np.testing.assert_array_equal(rows['labels'][i], ex['labels'])
    np.testing.assert_array_equal(rows['tokens'][i], tokenizer.tokenize([ex['caption']], 32)[0])

  # Training: same record indices, same seed, so the same shuffled, cropped batches.
  a = _iterator(from_shards, batch_size=8, image_size=32, train=True, seed=3)
  b = _iterator(from_source, batch_size=8, image_size=32, train=True, seed=3)
  for _ in range(4):
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _write_folder(root):
  """Five images: four captioned (one a corrupt JPEG), one without a caption."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, '00001'))

  def image(path, size, fmt):
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(path, fmt)

  image(os.path.join(root, 'a.jpg'), (40, 60), 'JPEG')
  image(os.path.join(root, 'd.png'), (50, 30), 'PNG')
  image(os.path.join(root, 'e.jpg'), (33, 33), 'JPEG')
  image(os.path.join(root, '00001', 'f.jpg'), (20, 20), 'JPEG')  # no caption
  with open(os.path.join(root, 'b.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 this is not a JPEG body')
  captions = {'a': 'a photo of noise', 'b': 'the corrupt one', 'd': '  a png  \n', 'e': 'last one'}
  for stem, text in captions.items():
    with open(os.path.join(root, f'{stem}.txt'), 'w') as f:
      f.write(text)
  return captions


def test_folder_to_shards_then_grain(tmp_path, capsys):
  root = tmp_path / 'pairs'
  _write_folder(str(root))
  prefix = str(tmp_path / 'out' / 'train')
  summary = shards.main(['--from_folder', str(root), '--out', prefix, '--num_shards', '2'])
  assert summary['records'] == 4 and summary['skipped'] == {'missing_caption': 1, 'missing_image': 0}
  assert 'f.jpg' in capsys.readouterr().err

  c = _config(summary['pattern'])
  it = _iterator(c, batch_size=4, image_size=24)
  (batch,) = list(it)
  # Sorted by path: a, b (corrupt: dropped), d, e; the freed row is padding.
  np.testing.assert_array_equal(batch['valid'], [True, True, True, False])
  assert it.skipped == 1
  np.testing.assert_array_equal(batch['tokens'][:3],
                                tokenizer.tokenize(['a photo of noise', 'a png', 'last one'], 32))
  assert not batch['tokens'][3].any() and not batch['image'][3].any()
  with Image.open(root / 'd.png') as im:
    want, _ = augment.center_crop(np.asarray(im.convert('RGB')), 24)
  np.testing.assert_array_equal(batch['image'][1], want)

  c.on_error = 'raise'
  with pytest.raises(ValueError, match=r"corrupt record 1 \(.*b\.jpg\): image does not decode.*on_error='skip'"):
    list(_iterator(c, batch_size=4, image_size=24))


def _handcrafted_shard(path):
  """30 digits records with five corrupt ones at known indices."""
  src = digits.DigitsSource('train', 30, seed=1)
  bad = {4: b'not a record at all',
         9: shards.encode_record(_png(src[9]['image']), ['   ']),
         15: shards.encode_record(b'\x89PNG\r\n\x1a\n truncated', ['a photo of junk.']),
         22: shards.encode_record(_png(src[22]['image']), []),
         29: shards.encode_record(b'', ['no image bytes'])}
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  writer = ArrayRecordWriter(path, 'group_size:1')
  for i in range(30):
    if i in bad:
      writer.write(bad[i])
    else:
      ex = src[i]
      writer.write(shards.encode_record(_png(ex['image']), [ex['caption']], f'scene {i}',
                                        {k: ex[k] for k in pipeline.OBJECT_FIELDS}))
  writer.close()
  return sorted(bad)


def test_corrupt_records_skip_or_raise_in_eval(tmp_path):
  path = str(tmp_path / 'bad-00000-of-00001.array_record')
  bad = _handcrafted_shard(path)
  c = _config(path)
  it = _iterator(c, batch_size=8, image_size=64)
  batches = list(it)
  assert len(batches) == 4 and it.skipped == len(bad)  # the last corrupt record ends the pass
  valid = np.concatenate([b['valid'] for b in batches])
  np.testing.assert_array_equal(valid, np.arange(32) < 25)
  images = np.concatenate([b['image'] for b in batches])[:25]
  src = digits.DigitsSource('train', 30, seed=1)
  good = [i for i in range(30) if i not in bad]
  for image, i in zip(images, good):  # the good records, in order
    np.testing.assert_array_equal(image, src[i]['image'])

  c.on_error = 'raise'
  it = _iterator(c, batch_size=8, image_size=32)
  with pytest.raises(ValueError, match=r'corrupt record 4: does not start with'):
    list(it)
  c.arrayrecord_pattern = c.arrayrecord_eval_pattern = str(tmp_path / 'missing-*.array_record')
  with pytest.raises(ValueError, match=r'config\.data\.arrayrecord_eval_pattern=.*matches no files'):
    _iterator(c)


def test_corrupt_records_counted_exactly_in_training_and_restored(tmp_path):
  path = str(tmp_path / 'bad-00000-of-00001.array_record')
  _handcrafted_shard(path)
  c = _config(path)
  it = _iterator(c, batch_size=6, image_size=32, train=True, seed=5)
  for step in range(1, 13):  # 72 examples: a few epochs of 25 good records
    batch = next(it)
    assert batch['image'].shape == (6, 32, 32, 3) and 'valid' not in batch
    # Every element grain handed over is delivered or skipped: none lost, none twice.
    assert _consumed(it) - 6 * step == it.skipped
    if step == 6:
      state, skipped_then = it.get_state(), it.skipped
  assert it.skipped >= 10  # two full epochs hold ten corrupt records
  skipped_12 = it.skipped
  later = [next(it) for _ in range(3)]

  resumed = _iterator(c, batch_size=6, image_size=32, train=True, seed=5)
  resumed.set_state(state)
  assert resumed.skipped == skipped_then
  for _ in range(6):
    next(resumed)
  assert resumed.skipped == skipped_12
  for want in later:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert resumed.skipped == it.skipped


def test_from_tfds_writes_a_mocked_builder(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  prefix = str(tmp_path / 'laion')
  with tfds.testing.mock_data(num_examples=6):
    summary = shards.main(['--from_tfds', 'laion400m:train', '--out', prefix, '--num_shards', '2'])
    stored = tfds.decode.PartialDecoding({'image': True, 'caption': True},
                                         decoders={'image': tfds.decode.SkipDecoding()})
    direct = list(tfds.as_numpy(tfds.builder('laion400m').as_dataset(split='train',
                                                                      decoders=stored)))
    with pytest.raises(ValueError, match=r"--caption_key 'text' is not a feature of laion400m.*caption"):
      shards.main(['--from_tfds', 'laion400m', '--caption_key', 'text', '--out', prefix])
  assert summary['records'] == 6
  records = [shards.decode_record(r) for r in _read_all(summary['pattern'])]
  assert [r.captions for r in records] == [[d['caption'].decode()] for d in direct]
  for r, d in zip(records, direct):
    assert r.image == d['image']  # the encoded bytes as TFDS stores them
    with Image.open(io.BytesIO(r.image)) as im:
      assert im.mode == 'RGB' and min(im.size) >= 1


def _read_all(pattern):
  import glob  # pylint: disable=g-import-not-at-top
  from array_record.python.array_record_data_source import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
  source = ArrayRecordDataSource(sorted(glob.glob(pattern)))
  return [source[i] for i in range(len(source))]
