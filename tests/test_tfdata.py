"""The tf.data loader: the digits as a TFDS builder, mocked real builders, corrupt records."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')
from etils import epath  # noqa: E402  pylint: disable=g-import-not-at-top

from clip_jax.data import augment  # noqa: E402
from clip_jax.data import digits  # noqa: E402
from clip_jax.data import pipeline  # noqa: E402
from clip_jax.data import tokenizer  # noqa: E402
from pipeline_helpers import L, assert_batches_equal, assert_eval_resumes_mid_pass, image_index, make  # noqa: E402

logging.getLogger('absl').setLevel(logging.ERROR)  # TFDS deprecation chatter

NUM_TRAIN, NUM_TEST = 40, 30


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  digits.build_tfds(d, num_train=NUM_TRAIN, num_test=NUM_TEST)
  return d


def digits_config(data_dir, **overrides):
  c = pipeline.default_data_config()
  c.loader, c.tfds_data_dir = 'tfdata', data_dir
  c.digits.num_train, c.digits.num_test = NUM_TRAIN, NUM_TEST
  c.shuffle_buffer = 16
  for k, v in overrides.items():
    c[k] = v
  return c


# --------------------------------------------------- numpy and TF agree


def test_crop_window_is_the_same_in_numpy_and_tf():
  rng = np.random.default_rng(0)
  for i in range(200):
    u = rng.random(augment.NUM_UNIFORMS)
    height, width = (int(v) for v in rng.integers(4, 400, 2))
    scale = ((0.08, 1.0), (0.9, 1.0), (0.99, 1.0))[i % 3]
    ratio = ((3 / 4, 4 / 3), (0.2, 5.0), (3.0, 4.0))[i % 3]  # the last often falls back
    want = augment.crop_window(u, height, width, scale, ratio)
    got = tuple(int(v) for v in augment.crop_window_tf(tf.constant(u), height, width, scale, ratio))
    assert got == want, (height, width, scale, ratio)


def test_resize_paths_agree():
  ex = digits.DigitsSource('train', 4)[1]
  for window, size in (((3, 5, 50, 40), 48), ((0, 0, 64, 64), 64), ((10, 2, 30, 60), 20)):
    image, mask = augment.resized_crop(ex['image'], window, size, ex['mask'])
    image_tf, mask_tf = augment.resized_crop_tf(tf.constant(ex['image']), window, size,
                                                tf.constant(ex['mask']))
    # PIL's fixed-point bicubic vs TF's float one; at the crop's edge PIL's
    # kernel also reads the pixels outside the window, TF's clamps.
    diff = np.abs(image.astype(int) - image_tf.numpy())
    assert diff[2:-2, 2:-2].max() <= 4 and diff.mean() < 0.5
    assert np.mean(mask != mask_tf.numpy()) < 0.01
  y, x = np.mgrid[:50, :70]  # a smooth photo-like image (noise would exaggerate)
  rgb = np.stack([127 + 120 * np.sin(x / 9), 127 + 120 * np.cos(y / 7), (x + y) * 2], -1)
  rgb = rgb.round().astype(np.uint8)
  image, _ = augment.center_crop(rgb, 32)
  image_tf, _ = augment.center_crop_tf(tf.constant(rgb), 32)
  assert image.shape == image_tf.shape == (32, 32, 3)
  assert np.abs(image.astype(int) - image_tf.numpy()).max() <= 2


# ------------------------------------------------------------- the digits


def test_same_batch_schema_as_grain(data_dir):
  c = digits_config(data_dir)
  g = pipeline.default_data_config()
  g.digits.num_train = NUM_TRAIN
  for train in (True, False):
    a = next(make(c, train=train))
    b = next(make(g, train=train))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
  # Eval at the canvas size reads exactly the scenes grain reads.
  a = next(make(c, train=False, image_size=64))
  b = next(make(g, train=False, image_size=64))
  assert_batches_equal(a, b)


def test_caption_prompts_same_as_grain(data_dir):
  """GroupViT's prompt fields (config.data.prompts) come from the same host code in both loaders."""
  c, g = digits_config(data_dir), pipeline.default_data_config()
  g.digits.num_train = NUM_TRAIN
  for config in (c, g):
    config.prompts.max_prompts = 3
  a, b = next(make(c, train=False, image_size=64)), next(make(g, train=False, image_size=64))
  assert a['prompt_tokens'].shape == (8, 3, L)
  assert_batches_equal(a, b)


def test_deterministic_and_exact_resume(data_dir):
  c = digits_config(data_dir)
  c.digits.drop_color_prob = 0.5
  a, b = make(c, seed=5), make(c, seed=5)
  for _ in range(2):
    assert_batches_equal(next(a), next(b))
  state = a.get_state()
  want = [next(a) for _ in range(6)]  # into the next epochs (5 batches each)
  resumed = make(c, seed=5)
  resumed.set_state(state)
  for w in want:
    assert_batches_equal(next(resumed), w)
  assert not np.array_equal(next(make(c, seed=6))['image'], next(make(c, seed=5))['image'])
  with pytest.raises(ValueError, match='not a tf.data iterator state'):
    make(c, seed=5).set_state(b'{"format": "clip_jax.grain/1"}')
  with pytest.raises(ValueError, match=r'process_index: saved 0, now 1'):
    make(c, seed=5, process_index=1, process_count=2, batch_size=16).set_state(state)


def test_processes_read_disjoint_shares_covering_each_epoch(data_dir):
  c = digits_config(data_dir)
  c.augment.enabled = False
  table = image_index('train', NUM_TRAIN)
  shares = []
  for p in range(2):
    it = make(c, batch_size=8, image_size=64, process_index=p, process_count=2)
    seen = [table[img.tobytes()] for _ in range(10) for img in next(it)['image']]
    assert sorted(seen[:20]) == sorted(seen[20:])  # one epoch, then the same share again
    assert seen[:20] != seen[20:]  # reshuffled
    shares.append(set(seen))
  assert shares[0] == set(range(20)) and shares[1] == set(range(20, 40))


def test_eval_covers_every_example_once_with_padding(data_dir):
  c = digits_config(data_dir)
  table = image_index('test', NUM_TEST)
  seen, valid_counts = [], []
  for p in range(2):
    it = make(c, batch_size=8, image_size=64, train=False, process_index=p, process_count=2)
    batches = list(it)
    assert len(batches) == 4 and it.skipped == 0
    for b in batches:
      valid_counts.append(int(b['valid'].sum()))
      seen += [table[img.tobytes()] for img in b['image'][b['valid']]]
      assert not b['image'][~b['valid']].any()
  assert seen == list(range(NUM_TEST))
  assert valid_counts == [4, 4, 4, 3] * 2


def test_eval_resume_mid_pass(data_dir):
  c = digits_config(data_dir)
  assert_eval_resumes_mid_pass(c, num_batches=3)


def test_crop_keeps_masks_and_boxes_consistent(data_dir):
  from test_pipeline import check_objects_follow_the_crop  # pylint: disable=g-import-not-at-top
  c = digits_config(data_dir)
  c.augment.scale, c.augment.ratio = (0.25, 1.0), (0.5, 2.0)
  batch = next(make(c, batch_size=32, image_size=48, seed=1))
  assert check_objects_follow_the_crop(batch) > 5000
  inked = batch['image'].max(-1) > 60
  assert np.mean(inked == (batch['mask'] > 0)) > 0.95


def test_tokens_and_colour_dropping(data_dir):
  c = digits_config(data_dir)
  c.augment.enabled = False
  c.digits.drop_color_prob = 0.5
  src = digits.DigitsSource('train', NUM_TRAIN)
  table = image_index('train', NUM_TRAIN)
  plain = 0
  batch = next(make(c, batch_size=40, image_size=64, seed=2))
  for img, tokens in zip(batch['image'], batch['tokens']):
    ex = src[table[img.tobytes()]]
    objects = [(digits.COLOR_NAMES[col], int(d))
               for col, d in zip(ex['colors'][:ex['num_objects']], ex['labels'])]
    with_colors = tokenizer.tokenize([ex['caption']], L)[0]
    without = tokenizer.tokenize([digits.caption_for(objects, include_colors=False)], L)[0]
    assert np.array_equal(tokens, with_colors) or np.array_equal(tokens, without)
    plain += np.array_equal(tokens, without)
  assert 8 <= plain <= 32


# ------------------------------------------------- real builders, mocked


def test_mocked_coco_captions_nested_captions():
  with tfds.testing.mock_data(num_examples=6):
    c = pipeline.default_data_config()
    c.loader, c.source, c.tfds_name = 'tfdata', 'tfds', 'coco_captions'
    c.caption_key, c.eval_split = 'captions/text', 'val'
    # The mock cannot encode coco's nested sequences, so let TFDS decode its
    # (already decoded) images; the encoded path is covered by laion400m.
    c.decode_in_pipeline = False
    ref = tfds.builder('coco_captions').as_dataset(
        split='val', decoders=tfds.decode.PartialDecoding({'image': True, 'captions': {'text': True}}))
    firsts = [next(t.decode() for t in ex['captions']['text'] if t.strip())
              for ex in tfds.as_numpy(ref)]
    (batch,) = list(make(c, batch_size=8, image_size=24, train=False))
    assert batch['image'].shape == (8, 24, 24, 3) and batch['valid'].sum() == 6
    np.testing.assert_array_equal(batch['tokens'][:6], tokenizer.tokenize(firsts, L))
    assert next(make(c, batch_size=4, image_size=24))['tokens'].shape == (4, L)

    c.caption_key = 'captions/txt'
    with pytest.raises(ValueError, match=r"caption_key='captions/txt' is not a feature.*captions/text"):
      make(c)
    c.caption_key, c.image_key = 'captions/text', 'img'
    with pytest.raises(ValueError, match=r"image_key='img' is not a feature.*image/filename"):
      make(c)
    c.image_key, c.caption_key = 'image', 'image/id'
    with pytest.raises(ValueError, match=r"caption_key='image/id' is a int64 feature, not text"):
      make(c)


def test_mocked_laion400m_encoded_images():
  with tfds.testing.mock_data(num_examples=5):
    c = pipeline.default_data_config()
    c.loader, c.source, c.tfds_name = 'tfdata', 'tfds', 'laion400m'
    c.eval_split = 'train'
    stored = tfds.decode.PartialDecoding({'image': True, 'caption': True},
                                         decoders={'image': tfds.decode.SkipDecoding()})
    ref = list(tfds.as_numpy(tfds.builder('laion400m').as_dataset(split='train', decoders=stored)))
    it = make(c, batch_size=4, image_size=20, train=False)
    batches = list(it)
    assert len(batches) == 2 and it.skipped == 0
    for i, ex in enumerate(ref):
      row = batches[i // 4]
      np.testing.assert_array_equal(row['tokens'][i % 4], tokenizer.tokenize([ex['caption'].decode()], L)[0])
      with Image.open(io.BytesIO(ex['image'])) as im:
        want, _ = augment.center_crop(np.asarray(im.convert('RGB')), 20)
      diff = np.abs(row['image'][i % 4].astype(int) - want)  # TF vs PIL bicubic, on noise
      assert diff.mean() < 1 and diff.max() <= 16
    train = next(make(c, batch_size=4, image_size=20))
    assert train['image'].shape == (4, 20, 20, 3)


# --------------------------------------------------------- corrupt records


def _png(seed):
  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), np.uint8)).save(out, 'PNG')
  return out.getvalue()


BAD = {2: 'image', 5: 'caption', 7: 'image', 11: 'image'}  # 11 is the last record


class CorruptCaptions(tfds.core.GeneratorBasedBuilder):
  """Twelve image-caption pairs, four of them corrupt."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Test data.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # see digits_tfds: no importlib_resources lookup
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(None, None, 3)),
                                             'caption': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(12):
      image, caption = _png(i), f'picture number {i}'
      if BAD.get(i) == 'image':
        image = b'\x89PNG\r\n\x1a\n cut short' if i == 7 else b'not an image'
      if BAD.get(i) == 'caption':
        caption = ' \n '
      yield i, {'image': image, 'caption': caption}


@pytest.fixture(scope='module')
def corrupt_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('corrupt'))
  CorruptCaptions(data_dir=d).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return d


def corrupt_config(d, **overrides):
  c = pipeline.default_data_config()
  c.loader, c.source, c.tfds_name, c.tfds_data_dir = 'tfdata', 'tfds', 'corrupt_captions', d
  c.eval_split, c.shuffle_buffer = 'train', 8
  for k, v in overrides.items():
    c[k] = v
  return c


def test_corrupt_records_skipped_and_counted_in_eval(corrupt_dir):
  it = make(corrupt_config(corrupt_dir), batch_size=4, image_size=16, train=False)
  batches = list(it)
  assert len(batches) == 3 and it.skipped == 4  # the trailing corrupt record counts too
  valid = np.concatenate([b['valid'] for b in batches])
  np.testing.assert_array_equal(valid, np.arange(12) < 8)
  tokens = np.concatenate([b['tokens'] for b in batches])[:8]
  good = [i for i in range(12) if i not in BAD]
  np.testing.assert_array_equal(tokens, tokenizer.tokenize([f'picture number {i}' for i in good], L))


def test_corrupt_records_raise_names_the_record(corrupt_dir):
  c = corrupt_config(corrupt_dir, on_error='raise')
  it = make(c, batch_size=4, image_size=16, train=False)
  with pytest.raises(ValueError, match=r'corrupt record corrupt_captions-train\.tfrecord-00000-of-00001__2 '
                                       r'\(stream position 2\): image does not decode'):
    list(it)
  it = make(c, batch_size=4, image_size=16, train=False)
  it.set_state(make(corrupt_config(corrupt_dir, on_error='raise'), batch_size=4, image_size=16,
                    train=False).get_state())
  with pytest.raises(ValueError, match=r'__2 .*image does not decode'):
    next(it)


def test_corrupt_records_counted_exactly_in_training_and_restored(corrupt_dir):
  c = corrupt_config(corrupt_dir)
  it = make(c, batch_size=4, image_size=16, train=True, seed=1)
  for step in range(1, 9):  # four epochs of eight good records
    next(it)
    # Stream positions 0..last were all handed over: delivered rows plus skipped ones.
    assert it._last_pos + 1 == 4 * step + it.skipped  # pylint: disable=protected-access
    if step == 3:
      state, skipped_then = it.get_state(), it.skipped
  assert it.skipped >= 12  # at least three epochs' four corrupt records
  skipped_8 = it.skipped
  later = [next(it) for _ in range(2)]
  resumed = make(c, batch_size=4, image_size=16, train=True, seed=1)
  resumed.set_state(state)
  assert resumed.skipped == skipped_then
  for _ in range(5):
    next(resumed)
  assert resumed.skipped == skipped_8
  for want in later:
    assert_batches_equal(next(resumed), want)
