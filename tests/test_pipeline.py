"""The pipeline entry point, its config, and the grain loader on the digits."""

import numpy as np
import pytest

from clip_jax.data import augment
from clip_jax.data import digits
from clip_jax.data import pipeline
from clip_jax.data import tokenizer
from pipeline_helpers import L, assert_batches_equal, assert_eval_resumes_mid_pass, image_index, make

# grain and array-record are dependencies; an install without them skips, not fails.
pytest.importorskip('grain')
pytest.importorskip('array_record')


def digits_config(num_train=40, num_test=30, **overrides):
  c = pipeline.default_data_config()
  c.digits.num_train, c.digits.num_test = num_train, num_test
  for k, v in overrides.items():
    c[k] = v
  return c


def check_objects_follow_the_crop(batch, tol=1.0):
  """Every mask pixel of class c lies in a box of label c - 1 (within tol px,
  for the resize), boxes stay inside the image, padding rows are padding."""
  size = batch['image'].shape[1]
  checked = 0
  for mask, boxes, labels, k in zip(batch['mask'], batch['boxes'], batch['labels'],
                                    batch['num_objects']):
    assert np.all(labels[k:] == -1) and np.all(boxes[k:] == 0)
    assert np.all(labels[:k] >= 0) and np.all((boxes >= 0) & (boxes <= size))
    assert np.all(boxes[:k, 2] > boxes[:k, 0]) and np.all(boxes[:k, 3] > boxes[:k, 1])
    ys, xs = np.nonzero(mask)
    for y, x, cls in zip(ys, xs, mask[ys, xs]):
      cx, cy = x + 0.5, y + 0.5  # pixel centre
      inside = ((boxes[:k, 0] - tol <= cx) & (cx <= boxes[:k, 2] + tol)
                & (boxes[:k, 1] - tol <= cy) & (cy <= boxes[:k, 3] + tol) & (labels[:k] == cls - 1))
      assert inside.any(), f'mask pixel ({y}, {x}) of class {cls} is in no box: {boxes[:k]} {labels[:k]}'
      checked += 1
  return checked


# --------------------------------------------------------------------- config


def test_default_config_has_every_field():
  c = pipeline.default_data_config()
  for field in ('loader', 'source', 'tfds_name', 'tfds_data_dir', 'train_split', 'eval_split',
                'image_key', 'caption_key', 'arrayrecord_pattern', 'arrayrecord_eval_pattern',
                'shuffle_buffer', 'num_workers', 'prefetch', 'on_error'):
    assert field in c, field
  assert set(c.digits) >= {'num_train', 'num_test', 'canvas_size', 'num_digits', 'drop_color_prob'}
  assert set(c.augment) == {'enabled', 'scale', 'ratio'}
  assert (c.loader, c.source, c.on_error) == ('grain', 'digits', 'skip')


@pytest.mark.parametrize('field,value,match', [
    ('loader', 'torch', r"config\.data\.loader must be one of \('grain', 'tfdata'\), got 'torch'"),
    ('source', 'webdataset', r'config\.data\.source must be one of'),
    ('on_error', 'ignore', r"config\.data\.on_error must be one of \('skip', 'raise'\)"),
    ('source', 'tfds', r"config\.data\.source='tfds' needs config\.data\.loader='tfdata'.*shards"),
    ('source', 'arrayrecord', r'config\.data\.arrayrecord_pattern is empty'),
    ('shuffle_buffer', 0, r'config\.data\.shuffle_buffer must be >= 1'),
])
def test_config_errors_name_the_field(field, value, match):
  c = digits_config()
  c[field] = value
  with pytest.raises(ValueError, match=match):
    make(c)


def test_more_config_errors():
  c = digits_config(loader='tfdata', source='arrayrecord')
  with pytest.raises(ValueError, match=r"source='arrayrecord' needs config\.data\.loader='grain'"):
    make(c)
  c = digits_config(loader='tfdata', source='tfds')
  with pytest.raises(ValueError, match=r'config\.data\.tfds_name is empty.*coco_captions'):
    make(c)
  c = digits_config()
  c.augment.scale = (0.5, 1.5)
  with pytest.raises(ValueError, match=r'config\.data\.augment\.scale must be'):
    make(c)
  c = digits_config()
  c.digits.drop_color_prob = 2.0
  with pytest.raises(ValueError, match=r'drop_color_prob must be in \[0, 1\]'):
    make(c)
  c = digits_config(source='arrayrecord', arrayrecord_pattern='/nonexistent/x-*.array_record')
  with pytest.raises(ValueError, match=r"arrayrecord_pattern='/nonexistent/x-\*.array_record' matches no files"):
    make(c)
  c = digits_config(train_split='validation')
  with pytest.raises(ValueError, match=r"config\.data\.train_split='validation'"):
    make(c)
  with pytest.raises(ValueError, match=r'batch_size 10 \(global\).*process_count 4'):
    make(digits_config(), batch_size=10, process_count=4)
  with pytest.raises(ValueError, match=r'too few to give each of 50 processes'):
    make(digits_config(), batch_size=50, process_index=49, process_count=50)


# ----------------------------------------------------------------------- grain


def test_batch_schema():
  batch = next(make(digits_config(), batch_size=8, image_size=32))
  want = {'image': ((8, 32, 32, 3), np.uint8), 'tokens': ((8, L), np.int32),
          'mask': ((8, 32, 32), np.uint8), 'boxes': ((8, 3, 4), np.float32),
          'labels': ((8, 3), np.int32), 'num_objects': ((8,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want
  eval_batch = next(make(digits_config(), batch_size=8, image_size=32, train=False))
  assert eval_batch.keys() == want.keys() | {'valid'} and eval_batch['valid'].dtype == bool


def test_deterministic_given_the_seed():
  c = digits_config()
  a, b, other = make(c, seed=7), make(c, seed=7), make(c, seed=8)
  for _ in range(6):  # past an epoch: 40 records, 8 a batch
    x, y = next(a), next(b)
    assert_batches_equal(x, y)
  assert not np.array_equal(next(a)['image'], next(other)['image'])


def test_exact_resume_mid_epoch_and_across_epochs():
  c = digits_config()
  it = make(c, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert isinstance(state, bytes) and len(state) < 2000
  want = [next(it) for _ in range(7)]  # crosses into epochs 2 and 3
  resumed = make(c, seed=3)
  resumed.set_state(state)
  for w in want:
    assert_batches_equal(next(resumed), w)
  with pytest.raises(ValueError, match=r'local_batch: saved 8, now 4'):
    make(c, seed=3, batch_size=4).set_state(state)
  with pytest.raises(ValueError, match=r'seed: saved 3, now 4'):
    make(c, seed=4).set_state(state)


def test_eval_resume_mid_pass():
  c = digits_config(num_test=30)
  assert_eval_resumes_mid_pass(c, num_batches=3)


def test_processes_split_each_global_batch_disjointly():
  """Process p yields rows [p*b, (p+1)*b) of the global batch the single-process run yields:
  the stream does not depend on the process count, and processes never read the same record."""
  c = digits_config(num_train=40)
  c.augment.enabled = False  # eval geometry at 64 px: images identify their scene
  table = image_index('train', 40)
  single = make(c, batch_size=8, image_size=64)
  shares = [make(c, batch_size=8, image_size=64, process_index=p, process_count=2) for p in range(2)]
  seen = []
  for _ in range(10):  # two epochs of 40
    whole = next(single)
    parts = [next(it) for it in shares]
    assert_batches_equal(whole, {k: np.concatenate([q[k] for q in parts]) for k in whole})
    ids = [[table[img.tobytes()] for img in q['image']] for q in parts]
    assert not set(ids[0]) & set(ids[1])
    seen += ids[0] + ids[1]
  assert sorted(seen[:40]) == sorted(seen[40:]) == list(range(40))  # every record once an epoch
  assert seen[:40] != seen[40:]  # reshuffled each epoch


def test_eval_covers_every_example_once_with_padding():
  c = digits_config(num_test=30)
  table = image_index('test', 30)
  seen, valid_counts = [], []
  for p in range(2):
    batches = list(make(c, batch_size=8, image_size=64, train=False, process_index=p, process_count=2))
    assert len(batches) == 4  # ceil(15 / 4) in every process
    for b in batches:
      assert b['valid'].shape == (4,)
      valid_counts.append(int(b['valid'].sum()))
      seen += [table[img.tobytes()] for img in b['image'][b['valid']]]
      assert not b['image'][~b['valid']].any() and np.all(b['labels'][~b['valid']] == -1)
  assert seen == list(range(30))  # in order, each once
  assert valid_counts == [4, 4, 4, 3] * 2


def test_crop_keeps_masks_boxes_and_image_together():
  c = digits_config(num_train=64)
  c.augment.scale, c.augment.ratio = (0.25, 1.0), (0.5, 2.0)
  it = make(c, batch_size=32, image_size=48, seed=1)
  checked = sum(check_objects_follow_the_crop(next(it)) for _ in range(2))
  assert checked > 10_000
  batch = next(it)
  # The image is inked exactly where the mask is (up to the resize's blur).
  inked = batch['image'].max(-1) > 60
  assert np.mean(inked == (batch['mask'] > 0)) > 0.95
  # Some crops cut digits away: fewer objects than the scene had.
  full = next(make(c, batch_size=32, image_size=48, seed=1, train=False))
  assert full['num_objects'].sum() > 0
  assert any(next(it)['num_objects'].sum() < 32 * 2 for _ in range(3))


def test_no_augmentation_at_canvas_size_is_exact():
  c = digits_config(num_train=40)
  c.augment.enabled = False
  src = digits.DigitsSource('train', 40)
  table = image_index('train', 40)
  batch = next(make(c, batch_size=16, image_size=64))
  for img, boxes, labels, mask, tokens in zip(batch['image'], batch['boxes'], batch['labels'],
                                              batch['mask'], batch['tokens']):
    ex = src[table[img.tobytes()]]
    np.testing.assert_array_equal(boxes, ex['boxes'])
    np.testing.assert_array_equal(labels, ex['labels'])
    np.testing.assert_array_equal(mask, ex['mask'])
    np.testing.assert_array_equal(tokens, tokenizer.tokenize([ex['caption']], L)[0])


def test_tokens_and_colour_dropping():
  c = digits_config(num_train=40)
  c.augment.enabled = False
  c.digits.drop_color_prob = 0.5
  src = digits.DigitsSource('train', 40)
  table = image_index('train', 40)
  plain = 0
  it = make(c, batch_size=40, image_size=64, seed=2)
  for _ in range(2):
    batch = next(it)
    for img, tokens in zip(batch['image'], batch['tokens']):
      ex = src[table[img.tobytes()]]
      objects = [(digits.COLOR_NAMES[col], int(d))
                 for col, d in zip(ex['colors'][:ex['num_objects']], ex['labels'])]
      with_colors = tokenizer.tokenize([ex['caption']], L)[0]
      without = tokenizer.tokenize([digits.caption_for(objects, include_colors=False)], L)[0]
      assert np.array_equal(tokens, with_colors) or np.array_equal(tokens, without)
      plain += np.array_equal(tokens, without)
  assert 20 <= plain <= 60  # about half of 80
  # Eval captions keep their colours.
  batch = next(make(c, batch_size=8, image_size=64, train=False))
  test = digits.DigitsSource('test', 30)
  np.testing.assert_array_equal(batch['tokens'],
                                tokenizer.tokenize([test[i]['caption'] for i in range(8)], L))


def test_crop_window_parameterisation():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(2000):
    top, left, h, w = augment.crop_window(rng.random(augment.NUM_UNIFORMS), 100, 200,
                                          (0.2, 0.6), (0.5, 2.0))
    assert 0 <= top <= 100 - h and 0 <= left <= 200 - w
    areas.append(h * w / 20_000)
    ratios.append(w / h)
  assert 0.19 <= min(areas) and max(areas) <= 0.61
  assert 0.48 <= min(ratios) and max(ratios) <= 2.05
  # No candidate fits a 4x100 image with ratio in [1, 1]: centred square fallback.
  assert augment.crop_window(np.full(augment.NUM_UNIFORMS, 0.5), 4, 100, (0.9, 1.0), (1.0, 1.0)) == (0, 48, 4, 4)


def test_worker_processes_resume_exactly():
  """With worker processes each batch is built in a worker; the state still
  covers exactly the delivered batches."""
  c = digits_config(num_train=48, num_workers=2)
  it = make(c, batch_size=8, seed=4)
  try:
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
  finally:
    it.close()
  resumed = make(c, batch_size=8, seed=4)
  try:
    resumed.set_state(state)
    for w in want:
      assert_batches_equal(next(resumed), w)
  finally:
    resumed.close()
