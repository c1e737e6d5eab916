"""Box utilities of two-stage detectors: anchors, IoU, delta encoding, clipping, NMS.

Boxes are (x1, y1, x2, y2) in image pixels, float32, x2 >= x1 and y2 >= y1
for a real box. Everything is jit-able with static shapes: NMS returns a
fixed number of indices with a validity mask instead of a ragged list.

The delta parameterisation is Faster R-CNN's (torchvision's `BoxCoder`):
  dx = wx (gx - ax) / aw,  dy = wy (gy - ay) / ah,  dw = ww log(gw / aw),  dh = wh log(gh / ah)
with centres and sizes computed without the legacy +1, and dw, dh clamped at
log(1000 / 16) when decoding so exp cannot overflow. The RPN uses weights
(1, 1, 1, 1), the box head (10, 10, 5, 5).
"""

import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
DELTA_CLIP = math.log(1000.0 / 16)


def make_anchors(grid_h: int, grid_w: int, stride: float, sizes: Sequence[float],
                 aspect_ratios: Sequence[float]) -> np.ndarray:
  """Anchors [grid_h * grid_w * A, 4], A = len(aspect_ratios) * len(sizes), location-major.

  Each location (row-major) carries one anchor per (ratio, size), ratio-major
  as torchvision orders them; ratio = height / width and the area is size^2.
  Unlike torchvision (anchors centred on each cell's top-left corner), they
  are centred on the cell centre, (i + 0.5) * stride, which a single-level
  detector on a ViT grid prefers: a cell's token describes its whole patch.
  """
  ratios = np.asarray(aspect_ratios, np.float64)
  sizes = np.asarray(sizes, np.float64)
  hs = (np.sqrt(ratios)[:, None] * sizes[None, :]).reshape(-1)
  ws = ((1 / np.sqrt(ratios))[:, None] * sizes[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=-1) / 2  # [A, 4]
  cy, cx = np.meshgrid((np.arange(grid_h) + 0.5) * stride, (np.arange(grid_w) + 0.5) * stride, indexing='ij')
  centres = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
  return (centres + base[None]).reshape(-1, 4).astype(np.float32)


def box_area(boxes):
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a, b):
  """IoU [..., N, M] of boxes a [..., N, 4] and b [..., M, 4] (torchvision's `box_iou`).

  Pairs whose union is empty (two zero-area boxes) get 0, where torchvision
  returns NaN.
  """
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def _centre_size(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(boxes, anchors, weights: Sequence[float] = RPN_WEIGHTS):
  """Regression targets [..., 4] taking `anchors` to `boxes` (both [..., 4], positive sizes)."""
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centre_size(anchors)
  gx, gy, gw, gh = _centre_size(boxes)
  return jnp.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                    ww * jnp.log(gw / aw), wh * jnp.log(gh / ah)], axis=-1)


def decode_boxes(deltas, anchors, weights: Sequence[float] = RPN_WEIGHTS, clip: float = DELTA_CLIP):
  """The boxes [..., 4] that `deltas` [..., 4] make of `anchors` [..., 4] (inverse of encode_boxes)."""
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centre_size(anchors)
  dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clip)
  dh = jnp.minimum(deltas[..., 3] / wh, clip)
  cx, cy = dx * aw + ax, dy * ah + ay
  w, h = jnp.exp(dw) * aw, jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def clip_boxes(boxes, height: float, width: float):
  """Boxes clipped to the image [0, width] x [0, height]."""
  upper = jnp.asarray([width, height, width, height], boxes.dtype)
  return jnp.clip(boxes, 0, upper)


def nms(boxes, scores, iou_threshold: float, max_outputs: int) -> Tuple[jax.Array, jax.Array]:
  """Greedy non-maximum suppression of one image's boxes [N, 4] with scores [N].

  A box is dropped when its IoU with a higher-scoring kept box exceeds
  `iou_threshold` (strictly, as torchvision's `nms`); boxes scored -inf are
  never kept. Returns (indices [max_outputs] into `boxes`, in decreasing score
  order, valid [max_outputs] bool): the slots past the kept count are
  invalid and point at index 0. The loop runs N sequential steps over an
  N x N IoU matrix, so keep N to a pre-NMS top-k of at most a few thousand.
  """
  n = boxes.shape[0]
  order = jnp.argsort(-scores)
  sorted_boxes = boxes[order]
  eligible = scores[order] > -jnp.inf  # NaN and -inf scores never survive
  overlaps = box_iou(sorted_boxes, sorted_boxes) > iou_threshold
  earlier = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]  # [j, i]: j ranks above i
  suppressors = overlaps & earlier

  def step(i, keep):
    suppressed = jnp.any(keep & suppressors[:, i])
    return keep.at[i].set(eligible[i] & ~suppressed)

  keep = jax.lax.fori_loop(0, n, step, jnp.zeros((n,), bool))
  # Kept positions first, each group in score order (a stable sort on the drop flag).
  ranked = jnp.argsort(~keep, stable=True)
  if max_outputs > n:
    ranked = jnp.concatenate([ranked, jnp.zeros((max_outputs - n,), ranked.dtype)])
  slots = ranked[:max_outputs]
  valid = keep[slots] & (jnp.arange(max_outputs) < n)
  return jnp.where(valid, order[slots], 0), valid
