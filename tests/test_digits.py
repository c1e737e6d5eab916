"""The embedded digits dataset: split, determinism, captions, masks, boxes, readers."""

import os

import numpy as np
import pytest

from clip_jax.data import digits

N = 300  # scenes per property check: every digit count and colour appears


@pytest.fixture(scope='module')
def train_examples():
  src = digits.DigitsSource('train', N, seed=0)
  return [src[i] for i in range(N)]


def _objects(ex):
  k = int(ex['num_objects'])
  return ex['boxes'][:k], ex['labels'][:k], ex['colors'][:k]


def test_scan_split_is_fixed_and_disjoint():
  _, _, train_ids = digits.load_scans('train')
  images, labels, test_ids = digits.load_scans('test')
  assert len(test_ids) == 360 and len(train_ids) == 1797 - 360
  assert np.all(test_ids % 5 == 0) and np.all(train_ids % 5 != 0)
  assert images.shape == (360, 8, 8) and images.dtype == np.float32
  assert 0 <= images.min() and images.max() == 1.0
  assert set(labels.tolist()) == set(range(10))
  with pytest.raises(ValueError, match='split'):
    digits.load_scans('validation')


@pytest.mark.parametrize('split,num_digits', [('train', (1, 3)), ('test', (1, 3)), ('train', 1)])
def test_scenes_use_only_their_splits_scans(split, num_digits):
  src = digits.DigitsSource(split, 400, seed=5, num_digits=num_digits)
  used = np.concatenate([ex['scan_ids'][:ex['num_objects']] for ex in map(src.__getitem__, range(400))])
  assert np.all((used % 5 == 0) == (split == 'test'))
  # The recorded scan really is the one painted: its label matches.
  _, sk_labels = digits._sklearn_digits()
  ex = src[0]
  k = int(ex['num_objects'])
  np.testing.assert_array_equal(sk_labels[ex['scan_ids'][:k]], ex['labels'][:k])


def test_layout_and_padding(train_examples):
  counts = []
  for ex in train_examples:
    assert ex['image'].shape == (64, 64, 3) and ex['image'].dtype == np.uint8
    assert ex['mask'].shape == (64, 64) and ex['mask'].dtype == np.uint8
    assert ex['boxes'].shape == (3, 4) and ex['boxes'].dtype == np.float32
    for key in ('labels', 'colors', 'scan_ids'):
      assert ex[key].shape == (3,) and ex[key].dtype == np.int32
    k = int(ex['num_objects'])
    counts.append(k)
    assert np.all(ex['boxes'][k:] == 0)
    for key in ('labels', 'colors', 'scan_ids'):
      assert np.all(ex[key][k:] == -1) and np.all(ex[key][:k] >= 0)
  # 1..3 digits all occur; crowding drops a third digit only sometimes.
  assert np.bincount(counts, minlength=4)[1:].min() > N // 6


def test_same_index_same_scene_any_order():
  a = digits.DigitsSource('train', 50, seed=7)
  b = digits.DigitsSource('train', 50, seed=7)
  later = b[31]  # random access: index 31 does not depend on 0..30
  for i in (31, 0, 49):
    ea, eb = a[i], b[i]
    assert ea.keys() == eb.keys()
    for key in ea:
      np.testing.assert_array_equal(ea[key], eb[key])
  np.testing.assert_array_equal(later['image'], a[31]['image'])
  assert not np.array_equal(a[3]['image'], a[4]['image'])
  assert not np.array_equal(a[3]['image'], digits.DigitsSource('train', 50, seed=8)[3]['image'])
  assert not np.array_equal(a[3]['image'], digits.DigitsSource('test', 50, seed=7)[3]['image'])
  with pytest.raises(IndexError):
    a[50]


def test_caption_grammar():
  assert digits.caption_for([('red', 7)]) == 'a photo of a red seven.'
  assert digits.caption_for([('red', 7), ('blue', 2)]) == 'a photo of a red seven and a blue two.'
  assert (digits.caption_for([('red', 7), ('blue', 2), ('green', 1)])
          == 'a photo of a red seven, a blue two and a green one.')
  assert digits.caption_for([('orange', 8)]) == 'a photo of an orange eight.'
  assert digits.parse_caption('a photo of a red seven, an orange two and a white one.') == [
      ('red', 7), ('orange', 2), ('white', 1)]
  for bad in ('a photo of a red seven', 'a photo of a purple seven.', 'a photo of an red seven.',
              'a photo of a red seven and a blue two and a green one.', 'a photo of .'):
    with pytest.raises(ValueError, match='not a digits caption'):
      digits.parse_caption(bad)


def test_caption_names_objects_left_to_right(train_examples):
  for ex in train_examples:
    boxes, labels, colors = _objects(ex)
    assert digits.parse_caption(ex['caption']) == [
        (digits.COLOR_NAMES[c], int(d)) for c, d in zip(colors, labels)]
    assert np.all(np.diff(boxes[:, 0] + boxes[:, 2]) >= 0)


def test_boxes_do_not_overlap(train_examples):
  for ex in train_examples:
    boxes, _, _ = _objects(ex)
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] <= 64)
    assert np.all(boxes[:, 2:] > boxes[:, :2])
    for i in range(len(boxes)):
      for j in range(i):
        w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
        h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
        assert w <= 0 or h <= 0, (boxes[i], boxes[j])


def test_mask_agrees_with_boxes(train_examples):
  for ex in train_examples:
    boxes, labels, _ = _objects(ex)
    mask = ex['mask']
    covered = np.zeros_like(mask, bool)
    for (x1, y1, x2, y2), d in zip(boxes.astype(int), labels):
      inside = mask[y1:y2, x1:x2]
      # Only this digit's class inside its box, and the box is tight: its
      # class touches all four edges.
      assert set(np.unique(inside).tolist()) <= {0, 1 + d}
      on = inside == 1 + d
      assert on[0].any() and on[-1].any() and on[:, 0].any() and on[:, -1].any()
      covered[y1:y2, x1:x2] = True
    assert np.all(mask[~covered] == 0)  # no class pixel outside every box
    assert mask.max() <= digits.NUM_CLASSES


def test_colours_are_palette_colours(train_examples):
  palette = np.array(list(digits.PALETTE.values()), np.float32)
  seen = set()
  for ex in train_examples:
    boxes, labels, colors = _objects(ex)
    seen.update(colors.tolist())
    image = ex['image'].astype(np.float32)
    lit = image.max(-1) > 0
    # Every lit pixel is intensity x one of this scene's colours (+-1 rounding).
    fits = np.zeros(lit.shape, bool)
    for c in colors:
      ideal = np.rint(image.max(-1, keepdims=True) / 255 * palette[c])
      fits |= np.abs(image - ideal).max(-1) <= 1
    assert np.all(fits[lit])
    # And each digit's inked pixels carry its own colour.
    for (x1, y1, x2, y2), d, c in zip(boxes.astype(int), labels, colors):
      px = image[y1:y2, x1:x2][ex['mask'][y1:y2, x1:x2] == 1 + d]
      ideal = np.rint(px.max(-1, keepdims=True) / 255 * palette[c])
      assert np.abs(px - ideal).max() <= 1
  assert seen == set(range(len(digits.PALETTE)))


def test_single_digit_scenes_are_centred():
  src = digits.DigitsSource('test', 100, seed=0, num_digits=1)
  for ex in map(src.__getitem__, range(100)):
    (box,), (d,), (c,) = _objects(ex)
    assert ex['boxes'].shape == (1, 4)
    assert ex['caption'] == digits.caption_for([(digits.COLOR_NAMES[c], d)])
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert 16 <= cx <= 48 and 16 <= cy <= 48


def test_upscale_matches_pil_bilinear():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scan = digits.load_scans('train')[0][11]
  for size in (16, 23, 28):
    ref = np.asarray(Image.fromarray(scan, mode='F').resize((size, size), Image.BILINEAR))
    np.testing.assert_allclose(digits.upscale(scan, size), ref, atol=1e-5)


def test_bad_arguments_fail_at_construction():
  with pytest.raises(ValueError, match='scale_range'):
    digits.DigitsSource('train', 10, canvas_size=16, scale_range=(0.5, 1.5))
  with pytest.raises(ValueError, match='num_digits'):
    digits.DigitsSource('train', 10, num_digits=(2, 1))
  with pytest.raises(ValueError, match='split'):
    digits.DigitsSource('val', 10)


def test_grain_map_dataset_reads_the_source():
  grain = pytest.importorskip('grain')
  src = digits.DigitsSource('test', 20, seed=3)
  ds = grain.MapDataset.source(src)
  assert len(ds) == 20
  for key, value in src[6].items():
    np.testing.assert_array_equal(ds[6][key], value)
  batch = ds.batch(4)[1]
  assert batch['image'].shape == (4, 64, 64, 3) and batch['boxes'].shape == (4, 3, 4)
  assert list(batch['caption']) == [src[i]['caption'] for i in range(4, 8)]


def test_tfds_builder_matches_source(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  builder = digits.build_tfds(str(tmp_path), num_train=12, num_test=5, seed=4)
  assert builder.info.splits['train'].num_examples == 12
  assert builder.info.splits['test'].num_examples == 5
  for split, n in (('train', 12), ('test', 5)):
    src = digits.DigitsSource(split, n, seed=4)
    got = list(builder.as_dataset(split=split).as_numpy_iterator())
    assert len(got) == n
    for i, ex in enumerate(got):  # read back in index order
      ref = src[i]
      assert ex.keys() == ref.keys()
      assert ex.pop('caption').decode() == ref.pop('caption')
      for key, value in ref.items():
        assert ex[key].dtype == value.dtype and ex[key].shape == value.shape, key
        np.testing.assert_array_equal(ex[key], value, err_msg=f'{split}[{i}] {key}')
  # Preparing again reuses the files.
  again = digits.build_tfds(str(tmp_path), num_train=12, num_test=5, seed=4)
  assert again.data_dir == builder.data_dir


def test_sample_cli_writes_pngs(tmp_path):
  digits.main(['--out', str(tmp_path), '--n', '3'])
  names = sorted(os.listdir(tmp_path))
  assert names == ['train_0000.png', 'train_0001.png', 'train_0002.png', 'train_captions.txt']
  lines = (tmp_path / 'train_captions.txt').read_text().splitlines()
  assert [l.split('\t')[1] for l in lines] == [
      digits.DigitsSource('train', 3)[i]['caption'] for i in range(3)]
