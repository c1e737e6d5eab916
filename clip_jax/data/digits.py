"""The embedded default dataset: coloured scenes of real handwritten digits.

Built from scikit-learn's bundled digits (1,797 real 8x8 scans, values
0..16), so the main job runs offline on a laptop. The split is fixed by scan:
sklearn index ``i % 5 == 0`` is test (360 scans) and is never drawn into a
train scene, so test scenes contain handwriting the model has not seen.

A scene is a black ``S x S`` canvas with 1-3 digits of random size, position
and palette colour that do not overlap. Each example carries everything the
families need: a caption (CLIP, GroupViT), a per-pixel class mask (LSeg) and
boxes with classes (ViLD, GLIP).

Example layout (``DigitsSource``; ``M = max objects = num_digits[1]``, 3 by
default). Object fields are padded to ``M`` so examples batch with a plain
stack; ``num_objects`` says how many rows are real:

  image        uint8   [S, S, 3]  scan intensity x palette colour, on black
  caption      str                see ``caption_for`` for the grammar
  mask         uint8   [S, S]     0 = background, 1 + digit where inked
  boxes        float32 [M, 4]     (x1, y1, x2, y2) pixels, tight to the mask
                                  pixels, x2/y2 exclusive; padding rows 0
  labels       int32   [M]        digit 0..9; padding -1
  colors       int32   [M]        index into PALETTE; padding -1
  scan_ids     int32   [M]        sklearn index of the scan; padding -1
  num_objects  int32   []         real objects, 1..M

Objects are ordered left to right by box x-centre (ties: top first), the order
the caption names them in.

Look at samples with ``python -m clip_jax.data.digits --out DIR --n 16``.
"""

import argparse
import collections
import functools
import os
import re
from typing import Optional, Sequence, Tuple, Union

import numpy as np

DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
               'eight', 'nine')

PALETTE = collections.OrderedDict([
    ('red', (255, 0, 0)),
    ('green', (0, 255, 0)),
    ('blue', (0, 0, 255)),
    ('yellow', (255, 255, 0)),
    ('cyan', (0, 255, 255)),
    ('magenta', (255, 0, 255)),
    ('white', (255, 255, 255)),
    ('orange', (255, 128, 0)),
])
COLOR_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array(list(PALETTE.values()), np.float32)

SPLITS = ('train', 'test')
NUM_CLASSES = len(DIGIT_NAMES)  # mask classes are 1 + this many, with background
# Digit side as a fraction of the canvas: 16..28 px on the default 64 canvas.
# The top keeps three digits placeable on most tries; the bottom keeps a
# digit's strokes a couple of pixels thick after up-scaling 8 -> 16.
SCALE_RANGE = (0.25, 0.45)
# A pixel belongs to the digit (mask, box) where the up-scaled scan reaches
# this fraction of the digit's own peak; below it is the faint bilinear halo.
INK_THRESHOLD = 0.25
# Placement tries per digit before it is dropped from a crowded scene.
_PLACE_TRIES = 64


@functools.lru_cache(maxsize=1)
def _sklearn_digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  return d.images.astype(np.float32) / 16.0, d.target.astype(np.int32)


def load_scans(split: str):
  """The scans of one split: (images f32 [N,8,8] in 0..1, labels i32, sklearn ids)."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  images, labels = _sklearn_digits()
  ids = np.arange(len(images), dtype=np.int32)
  keep = (ids % 5 == 0) if split == 'test' else (ids % 5 != 0)
  return images[keep], labels[keep], ids[keep]


@functools.lru_cache(maxsize=None)
def _resize_matrix(size: int, src: int = 8) -> np.ndarray:
  """[size, src] bilinear weights, half-pixel centres, edges clamped (as PIL)."""
  c = np.clip((np.arange(size) + 0.5) * src / size - 0.5, 0, src - 1)
  lo = np.floor(c).astype(int)
  hi = np.minimum(lo + 1, src - 1)
  frac = (c - lo).astype(np.float32)
  m = np.zeros((size, src), np.float32)
  np.add.at(m, (np.arange(size), lo), 1 - frac)
  np.add.at(m, (np.arange(size), hi), frac)
  return m


def upscale(scan: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of one [8,8] scan to [size,size] (separable: A @ x @ A.T)."""
  a = _resize_matrix(size, scan.shape[0])
  return a @ scan @ a.T


# Words that take "an": a vowel sound, not a vowel letter ("a one").
_AN_WORDS = ('orange', 'eight')


def object_phrase(color: Optional[str], digit: int, include_colors: bool = True) -> str:
  """One object of a caption: ``a red seven``, ``an orange two``; without its
  colour ``a seven``, ``an eight``, ``a one``."""
  first = color if include_colors else DIGIT_NAMES[digit]
  words = f'{color} {DIGIT_NAMES[digit]}' if include_colors else DIGIT_NAMES[digit]
  return f"{'an' if first in _AN_WORDS else 'a'} {words}"


def caption_for(objects: Sequence[Tuple[Optional[str], int]], include_colors: bool = True) -> str:
  """The caption naming (colour name, digit) pairs in the order given.

  Grammar: ``a photo of OBJ.``, ``a photo of OBJ and OBJ.``,
  ``a photo of OBJ, OBJ and OBJ.`` (commas between all but the last pair, no
  Oxford comma), where ``OBJ = ARTICLE COLOUR DIGITWORD`` and ARTICLE is
  ``an`` before a vowel sound (only "an orange") and ``a`` otherwise:
  ``a photo of a red seven, an orange two and a white one.``

  ``include_colors=False`` leaves the colours out (``OBJ = ARTICLE
  DIGITWORD``; "an eight", "a one"): ``a photo of a seven and a two.`` Input
  pipelines use it to drop colours from some training captions, so the text
  tower also learns digit names alone; ``parse_caption`` reads only the full
  form.
  """
  if not objects:
    raise ValueError('a caption needs at least one object')
  words = [object_phrase(c, d, include_colors) for c, d in objects]
  body = words[0] if len(words) == 1 else ', '.join(words[:-1]) + ' and ' + words[-1]
  return f'a photo of {body}.'


_OBJ_RE = re.compile(r'an? (%s) (%s)' % ('|'.join(COLOR_NAMES), '|'.join(DIGIT_NAMES)))


def parse_caption(caption: str):
  """Inverse of ``caption_for``: the [(colour name, digit)] a caption names."""
  m = re.fullmatch(r'a photo of (.+)\.', caption)
  parts = re.split(r', | and ', m.group(1)) if m else []
  objs = [_OBJ_RE.fullmatch(p) for p in parts]
  if not objs or not all(objs) or caption_for(
      [(o.group(1), DIGIT_NAMES.index(o.group(2))) for o in objs]) != caption:
    raise ValueError(f'not a digits caption: {caption!r}')
  return [(o.group(1), DIGIT_NAMES.index(o.group(2))) for o in objs]


def _size_bounds(canvas_size, scale_range):
  lo, hi = (max(2, int(round(f * canvas_size))) for f in scale_range)
  if not lo <= hi <= canvas_size:
    raise ValueError(f'scale_range {scale_range} must give 2 <= min <= max <= canvas '
                     f'side on a {canvas_size} canvas')
  return lo, hi


def _compose(scans, labels, scan_ids, canvas_size, placed):
  """Paints the placed (scan position, size, x0, y0, colour) digits: the scene."""
  image = np.zeros((canvas_size, canvas_size, 3), np.uint8)
  mask = np.zeros((canvas_size, canvas_size), np.uint8)
  boxes = np.zeros((len(placed), 4), np.float32)
  for k, (j, s, x0, y0, color) in enumerate(placed):
    ink = upscale(scans[j], s)
    image[y0:y0 + s, x0:x0 + s] = np.rint(ink[..., None] * _PALETTE_RGB[color])
    on = ink > INK_THRESHOLD * ink.max()
    mask[y0:y0 + s, x0:x0 + s][on] = 1 + labels[j]
    rows, cols = on.any(1), on.any(0)
    boxes[k] = (x0 + cols.argmax(), y0 + rows.argmax(),
                x0 + s - cols[::-1].argmax(), y0 + s - rows[::-1].argmax())
  # Left to right by box x-centre (top first on ties): the caption's order.
  order = np.lexsort((boxes[:, 1] + boxes[:, 3], boxes[:, 0] + boxes[:, 2]))
  picked = np.array([p[0] for p in placed], np.int64)[order]
  colors = np.array([p[4] for p in placed], np.int32)[order]
  digits = labels[picked].astype(np.int32)
  return {
      'image': image,
      'caption': caption_for([(COLOR_NAMES[c], d) for c, d in zip(colors, digits)]),
      'mask': mask,
      'boxes': boxes[order],
      'labels': digits,
      'colors': colors,
      'scan_ids': (picked if scan_ids is None else scan_ids[picked]).astype(np.int32),
      'num_objects': np.int32(len(placed)),
  }


def _draws(rng, count, num_scans, lo, hi, canvas_size, tries):
  """All of a scene's random choices from one uniform draw (cheaper than many
  small ``rng.integers`` calls): per digit (scan, side, colour, tries x (x0, y0)),
  largest digit first, which fits more digits on the canvas."""
  u = rng.random((count, 3 + 2 * tries))
  picks = (u[:, 0] * num_scans).astype(int)
  sizes = lo + (u[:, 1] * (hi - lo + 1)).astype(int)
  colors = (u[:, 2] * len(PALETTE)).astype(int)
  pos = (u[:, 3:].reshape(count, tries, 2) * (canvas_size - sizes + 1)[:, None, None]).astype(int)
  order = np.argsort(-sizes, kind='stable')
  return [(picks[k], sizes[k], colors[k], pos[k].tolist()) for k in order.tolist()]


def make_scene(rng: np.random.Generator, scans, labels, canvas_size: int = 64,
               num_digits: Tuple[int, int] = (1, 3), scale_range=SCALE_RANGE,
               scan_ids: Optional[np.ndarray] = None) -> dict:
  """A scene of ``num_digits`` (inclusive range) non-overlapping digits.

  Each digit's square footprint (side in ``scale_range`` x canvas) is placed
  by rejection sampling against the footprints already placed, largest first;
  a digit that finds no room in ``_PLACE_TRIES`` tries is dropped, so a
  crowded draw yields fewer digits rather than overlapping ones. Object fields
  have length K (no padding); ``scan_ids`` (sklearn indices of ``scans``) is
  recorded if given, else positions in ``scans``.
  """
  lo, hi = _size_bounds(canvas_size, scale_range)
  count = int(rng.integers(num_digits[0], num_digits[1] + 1))
  placed = []
  for j, s, color, tries in _draws(rng, count, len(scans), lo, hi, canvas_size, _PLACE_TRIES):
    for x0, y0 in tries:
      if all(x0 + s <= px or px + ps <= x0 or y0 + s <= py or py + ps <= y0
             for _, ps, px, py, _ in placed):
        placed.append((j, s, x0, y0, color))
        break
  return _compose(scans, labels, scan_ids, canvas_size, placed)


def single_digit_scene(rng: np.random.Generator, scans, labels, canvas_size: int = 64,
                       scale_range=SCALE_RANGE, scan_ids: Optional[np.ndarray] = None) -> dict:
  """One digit near the centre (jitter up to a quarter of the free margin).

  The zero-shot scene: ``a photo of a red seven.``; same sizes as training.
  """
  lo, hi = _size_bounds(canvas_size, scale_range)
  (j, s, color, _), = _draws(rng, 1, len(scans), lo, hi, canvas_size, 0)
  jitter = (canvas_size - s) // 4
  x0, y0 = ((canvas_size - s) // 2 + rng.integers(-jitter, jitter + 1, size=2)).tolist()
  return _compose(scans, labels, scan_ids, canvas_size, [(j, s, x0, y0, color)])


def pad_objects(scene: dict, max_objects: int) -> dict:
  """Pads the per-object fields to ``max_objects`` rows (boxes 0, others -1)."""
  out = dict(scene)
  k = int(scene['num_objects'])
  for key, fill in (('boxes', 0), ('labels', -1), ('colors', -1), ('scan_ids', -1)):
    v = scene[key]
    out[key] = np.full((max_objects,) + v.shape[1:], fill, v.dtype)
    out[key][:k] = v
  return out


class DigitsSource:
  """Digits scenes as a grain RandomAccessDataSource (``len``, ``[i]``).

  Example ``i`` is drawn from its own generator seeded by ``(seed, split, i)``,
  so any index is reproducible on its own: the property that lets a resumed
  data iterator see exactly the examples it would have seen. Changing
  ``canvas_size``, ``num_digits`` or ``scale_range`` changes the examples.
  ``num_digits=1`` (or ``(1, 1)``) gives centred single-digit scenes
  (``single_digit_scene``), for zero-shot evaluation.
  """

  def __init__(self, split: str = 'train', num_examples: int = 20_000, seed: int = 0,
               canvas_size: int = 64, num_digits: Union[int, Tuple[int, int]] = (1, 3),
               scale_range=SCALE_RANGE):
    if isinstance(num_digits, int):
      num_digits = (num_digits, num_digits)
    if not 1 <= num_digits[0] <= num_digits[1]:
      raise ValueError(f'num_digits must be (lo, hi) with 1 <= lo <= hi, got {num_digits}')
    _size_bounds(canvas_size, scale_range)  # fail here, not in a worker
    self.split, self.num_examples, self.seed = split, int(num_examples), int(seed)
    self.canvas_size, self.num_digits = int(canvas_size), tuple(num_digits)
    self.scale_range = tuple(scale_range)
    self.max_objects = self.num_digits[1]
    self._scans, self._labels, self._ids = load_scans(split)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self.num_examples} examples')
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
    if self.num_digits == (1, 1):
      scene = single_digit_scene(rng, self._scans, self._labels, self.canvas_size,
                                 self.scale_range, scan_ids=self._ids)
    else:
      scene = make_scene(rng, self._scans, self._labels, self.canvas_size,
                         self.num_digits, self.scale_range, scan_ids=self._ids)
    return pad_objects(scene, self.max_objects)

  def __repr__(self):
    return (f'DigitsSource(split={self.split!r}, num_examples={self.num_examples}, '
            f'seed={self.seed}, canvas_size={self.canvas_size}, num_digits={self.num_digits})')


def build_tfds(data_dir: str, num_train: int = 20_000, num_test: int = 2_000, seed: int = 0,
               canvas_size: int = 64, num_digits: Tuple[int, int] = (1, 3)):
  """Generates (once) the same scenes as a local TFDS dataset; returns the builder.

  Nothing is downloaded. Example i of split s equals ``DigitsSource(s, ...)[i]``
  and is read back in index order. See ``digits_tfds``.
  """
  from clip_jax.data import digits_tfds  # pylint: disable=g-import-not-at-top
  return digits_tfds.build(data_dir, num_train, num_test, seed, canvas_size, num_digits)


def _write_samples(out: str, n: int, split: str, seed: int, num_digits, zoom: int = 4):
  """Writes n scenes as PNGs (image | mask, boxes drawn) and their captions."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  src = DigitsSource(split, n, seed, num_digits=num_digits)
  # Mask classes in false colour (background black), distinct from the palette.
  lut = np.zeros((256, 3), np.uint8)
  lut[1:NUM_CLASSES + 1] = [(60 + 19 * d, 200 - 15 * d, 80 + 17 * (d % 5) * 2) for d in range(10)]
  lines = []
  for i in range(n):
    ex = src[i]
    s = src.canvas_size
    both = np.concatenate([ex['image'], np.full((s, 2, 3), 64, np.uint8), lut[ex['mask']]], 1)
    img = Image.fromarray(both).resize((both.shape[1] * zoom, s * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for b, d in zip(ex['boxes'][:ex['num_objects']], ex['labels']):
      for off in (0, (s + 2) * zoom):  # on the image and on the mask
        x1, y1, x2, y2 = (b * zoom).tolist()
        draw.rectangle([x1 + off, y1, x2 + off - 1, y2 - 1], outline=(128, 128, 128))
        draw.text((x1 + off + 2, y1 + 1), str(d), fill=(200, 200, 200))
    path = os.path.join(out, f'{split}_{i:04d}.png')
    img.save(path)
    lines.append(f'{os.path.basename(path)}\t{ex["caption"]}')
  with open(os.path.join(out, f'{split}_captions.txt'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description='Write sample digits scenes as PNGs.')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--n', type=int, default=16, help='number of scenes')
  p.add_argument('--split', default='train', choices=SPLITS)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--single', action='store_true', help='centred single digits (zero-shot scenes)')
  args = p.parse_args(argv)
  num_digits = 1 if args.single else (1, 3)
  for line in _write_samples(args.out, args.n, args.split, args.seed, num_digits):
    print(line)


if __name__ == '__main__':
  main()
