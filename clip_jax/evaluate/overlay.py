"""PNG panels of segmentations a person can look at.

One PNG per canvas, columns left to right: the input, the ground truth, then
for each method its segments (each segment one false colour) and its labelled
prediction. Masks are blended half-and-half over the input (background pixels
keep the input, as NVlabs' blend_result with a background class), each
labelled region carries its class name, and the column titles run along the
top. Zoomed with nearest-neighbour so single pixels stay visible.
"""

import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Background, then the ten digits: matplotlib's tab10, distinct from the canvases' pure palette colours.
CLASS_COLORS = np.array([(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                         (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)], np.uint8)
_TITLE = 12  # pixels of title band


def _segment_colors(n: int) -> np.ndarray:
  return np.random.default_rng(0).integers(40, 256, (n, 3)).astype(np.uint8)


def _blend(image: np.ndarray, colors: np.ndarray, where: np.ndarray) -> np.ndarray:
  out = image.astype(np.float32)
  out[where] = 0.5 * out[where] + 0.5 * colors[where]
  return np.rint(out).astype(np.uint8)


def _label_regions(draw: ImageDraw.ImageDraw, mask: np.ndarray, names: Sequence[str], x0: int, zoom: int):
  for cls in np.unique(mask):
    if cls == 0:
      continue
    ys, xs = np.nonzero(mask == cls)
    draw.text((x0 + int(xs.mean()) * zoom - 8, _TITLE + int(ys.mean()) * zoom - 6), names[cls], fill=(255, 255, 255))


def panel(image: np.ndarray, truth: np.ndarray, results: Mapping[str, tuple], names: Sequence[str],
          zoom: int = 4) -> Image.Image:
  """The panel of one canvas; results: method -> (predicted mask [S, S], segment index per pixel [S, S])."""
  size = image.shape[0]
  columns = [('input', image, None), ('truth', _blend(image, CLASS_COLORS[truth], truth > 0), truth)]
  for method, (pred, groups) in results.items():
    seg_colors = _segment_colors(int(groups.max()) + 1)[groups]
    columns.append((f'{method}: segments', _blend(image, seg_colors, np.ones_like(pred, bool)), None))
    columns.append((method, _blend(image, CLASS_COLORS[pred], pred > 0), pred))
  gap = 4
  width = len(columns) * (size * zoom + gap) - gap
  canvas = Image.new('RGB', (width, _TITLE + size * zoom), (48, 48, 48))
  draw = ImageDraw.Draw(canvas)
  for i, (title, pixels, labels) in enumerate(columns):
    x0 = i * (size * zoom + gap)
    canvas.paste(Image.fromarray(pixels).resize((size * zoom, size * zoom), Image.NEAREST), (x0, _TITLE))
    draw.text((x0 + 2, 0), title, fill=(220, 220, 220))
    if labels is not None:
      _label_regions(draw, labels, names, x0, zoom)
  return canvas


def write_panels(out_dir: str, images: np.ndarray, truths: np.ndarray, results: Mapping[str, tuple],
                 names: Sequence[str], count: int) -> list:
  """Writes the first `count` panels as out_dir/NNN.png; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i in range(min(count, len(images))):
    path = os.path.join(out_dir, f'{i:03d}.png')
    panel(images[i], truths[i], {m: (p[i], g[i]) for m, (p, g) in results.items()}, names).save(path)
    paths.append(path)
  return paths
