"""PNG overlays of supervised predictions: label masks (LSeg) and scored boxes (ViLD).

A panel is columns of the same canvas, zoomed with nearest-neighbour so single
pixels stay visible, each titled: masks are blended half-and-half over the
input in clip_jax.evaluate.overlay's class colours with each region's class
name at its centre; boxes are outlined, solid for ground truth and one colour
per class for detections, with "name score" above them.
"""

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from clip_jax.evaluate.overlay import CLASS_COLORS

_TITLE = 12
_GAP = 4


def _colors(n: int) -> np.ndarray:
  """CLASS_COLORS, extended with fixed pseudo-random colours past its 11."""
  extra = np.random.default_rng(0).integers(60, 256, (max(0, n - len(CLASS_COLORS)), 3)).astype(np.uint8)
  return np.concatenate([CLASS_COLORS, extra])[:max(n, 1)]


def mask_column(image: np.ndarray, mask: np.ndarray, names: Sequence[str], zoom: int):
  """(zoomed RGB image, [(x, y, text)]) of a label mask over `image`; label 0 is left unpainted."""
  colors = _colors(len(names))
  out = image.astype(np.float32)
  where = mask > 0
  out[where] = 0.5 * out[where] + 0.5 * colors[np.minimum(mask, len(colors) - 1)][where]
  big = Image.fromarray(np.rint(out).astype(np.uint8)).resize((image.shape[1] * zoom, image.shape[0] * zoom),
                                                             Image.NEAREST)
  labels = []
  for cls in np.unique(mask):
    if cls == 0 or cls >= len(names):
      continue
    ys, xs = np.nonzero(mask == cls)
    labels.append((int(xs.mean()) * zoom - 8, int(ys.mean()) * zoom - 6, names[cls]))
  return big, labels


def panel(columns, zoom: int) -> Image.Image:
  """One PNG from [(title, zoomed image, [(x, y, text)], [(box, colour, text)])] columns."""
  width = sum(c[1].width for c in columns) + _GAP * (len(columns) - 1)
  height = _TITLE + max(c[1].height for c in columns)
  canvas = Image.new('RGB', (width, height), (48, 48, 48))
  draw = ImageDraw.Draw(canvas)
  x0 = 0
  for title, image, texts, boxes in columns:
    canvas.paste(image, (x0, _TITLE))
    draw.text((x0 + 2, 0), title, fill=(220, 220, 220))
    for x, y, text in texts:
      draw.text((x0 + x, _TITLE + y), text, fill=(255, 255, 255))
    for box, color, text in boxes:
      x1, y1, x2, y2 = (np.asarray(box, np.float64) * zoom).tolist()
      draw.rectangle([x0 + x1, _TITLE + y1, x0 + max(x2 - 1, x1), _TITLE + max(y2 - 1, y1)], outline=tuple(color))
      if text:
        draw.text((x0 + x1 + 1, _TITLE + max(y1 - 10, 0)), text, fill=tuple(color))
    x0 += image.width + _GAP
  return canvas


def segmentation_panel(image, truth, preds: dict, names: Sequence[str], zoom: int = 4) -> Image.Image:
  """input | truth | one column per method (preds: method -> label mask)."""
  big = Image.fromarray(image).resize((image.shape[1] * zoom, image.shape[0] * zoom), Image.NEAREST)
  columns = [('input', big, [], [])]
  for title, mask in [('truth', truth)] + list(preds.items()):
    img, texts = mask_column(image, mask, names, zoom)
    columns.append((title, img, texts, []))
  return panel(columns, zoom)


def detection_panel(image, gt_boxes, gt_labels, detections: dict, names: Sequence[str], novel: Sequence[int] = (),
                    zoom: int = 4) -> Image.Image:
  """truth | one column per method; detections: method -> (boxes [K, 4], labels [K], scores [K]).

  Novel classes' names carry a '*'.
  """
  colors = _colors(len(names) + 1)[1:]  # skip the background colour
  name = lambda c: names[c] + ('*' if c in novel else '')
  big = Image.fromarray(image).resize((image.shape[1] * zoom, image.shape[0] * zoom), Image.NEAREST)
  truth = [(b, (200, 200, 200), name(int(c))) for b, c in zip(gt_boxes, gt_labels)]
  columns = [('truth', big, [], truth)]
  for title, (boxes, labels, scores) in detections.items():
    drawn = [(b, colors[int(c) % len(colors)], f'{name(int(c))} {s:.2f}') for b, c, s in zip(boxes, labels, scores)]
    columns.append((title, big, [], drawn))
  return panel(columns, zoom)


def save(image: Image.Image, path: str) -> str:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  image.save(path)
  return path
