"""RoIAlign against torchvision's `roi_align(..., aligned=True)`: values and feature gradients.

Tolerance 1e-5 (absolute, features ~ N(0, 1)): both sides place the samples
in float32, and a coordinate of up to ~40 cells carries ~4e-6 of rounding,
which moves a bilinear sample by about that much; both implementations sit
~4e-6 from a float64 evaluation of the same formula.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from clip_jax.layers.roi_align import roi_align

B, H, W, C = 2, 12, 15, 4


def _boxes(spatial_scale: float, seed: int = 0) -> np.ndarray:
  """[B, R, 4] image-coordinate boxes: inside, partly outside, tiny, degenerate, inverted, far outside."""
  rng = np.random.default_rng(seed)
  img_h, img_w = H / spatial_scale, W / spatial_scale
  out = []
  for _ in range(B):
    xy = rng.uniform(0, 1, (6, 2)) * [img_w, img_h]
    inside = np.concatenate([xy, xy + rng.uniform(2, 0.6 * img_w, (6, 2))], axis=-1)
    xy = rng.uniform(-0.5, 1.2, (6, 2)) * [img_w, img_h]
    partly = np.concatenate([xy, xy + rng.uniform(0.3, 1.0, (6, 2)) * [img_w, img_h]], axis=-1)
    xy = rng.uniform(0, 1, (6, 2)) * [img_w, img_h]
    tiny = np.concatenate([xy, xy + rng.uniform(0, 0.3 / spatial_scale, (6, 2))], axis=-1)
    special = np.array([
        [3.0, 4.0, 3.0, 4.0],                                  # zero size
        [9.0, 8.0, 2.0, 1.0],                                  # x2 < x1, y2 < y1
        [-5.0 / spatial_scale, -3.0, -2.0 / spatial_scale, 6.0],  # left of the image: samples < -1 vanish
        [0.0, 0.0, img_w, img_h],                              # the whole image, edge clamping
        [img_w - 1, img_h - 1, img_w + 4, img_h + 4],          # over the bottom-right corner
        [-1.0, -1.0, 1.0, 1.0],
    ])
    out.append(np.concatenate([inside, partly, tiny, special]))
  return np.asarray(out, np.float32)


def _torch(features: np.ndarray, boxes: np.ndarray, output_size, spatial_scale, sampling_ratio, aligned=True,
           cotangent=None):
  x = torch.tensor(features).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  y = tv_roi_align(x, [torch.tensor(b) for b in boxes], output_size, spatial_scale, sampling_ratio, aligned)
  y = y.permute(0, 2, 3, 1)  # [B * R, oh, ow, C]
  grad = None
  if cotangent is not None:
    (y * torch.tensor(cotangent.reshape(y.shape))).sum().backward()
    grad = x.grad.permute(0, 2, 3, 1).numpy()
  return y.detach().numpy().reshape(boxes.shape[:2] + y.shape[1:]), grad


_jitted = jax.jit(roi_align, static_argnames=('output_size', 'spatial_scale', 'sampling_ratio', 'aligned'))


@pytest.mark.parametrize('sampling_ratio', [1, 2, 3])
@pytest.mark.parametrize('output_size', [7, (3, 5)])
@pytest.mark.parametrize('spatial_scale', [1.0, 0.25])
def test_matches_torchvision_aligned(sampling_ratio, output_size, spatial_scale):
  features = np.random.default_rng(1).standard_normal((B, H, W, C)).astype(np.float32)
  boxes = _boxes(spatial_scale)
  want, _ = _torch(features, boxes, output_size, spatial_scale, sampling_ratio)
  got = _jitted(jnp.asarray(features), jnp.asarray(boxes), output_size=output_size, spatial_scale=spatial_scale,
                sampling_ratio=sampling_ratio)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  assert np.abs(want).max() > 0.5  # the boxes sample real values, not just the zeroed outside


def test_matches_torchvision_legacy_alignment():
  """aligned=False (the original Mask R-CNN op) too: no half-pixel shift, boxes at least one cell."""
  features = np.random.default_rng(2).standard_normal((B, H, W, C)).astype(np.float32)
  boxes = _boxes(0.5, seed=3)
  want, _ = _torch(features, boxes, 5, 0.5, 2, aligned=False)
  got = roi_align(jnp.asarray(features), jnp.asarray(boxes), 5, 0.5, 2, aligned=False)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('sampling_ratio,output_size,spatial_scale', [(2, 7, 0.5), (3, (4, 6), 1.0)])
def test_feature_gradient_matches_torch_autograd(sampling_ratio, output_size, spatial_scale):
  rng = np.random.default_rng(4)
  features = rng.standard_normal((B, H, W, C)).astype(np.float32)
  boxes = _boxes(spatial_scale, seed=5)
  out_hw = (output_size, output_size) if isinstance(output_size, int) else output_size
  cotangent = rng.standard_normal(boxes.shape[:2] + out_hw + (C,)).astype(np.float32)
  _, want = _torch(features, boxes, output_size, spatial_scale, sampling_ratio, cotangent=cotangent)

  loss = lambda f: jnp.sum(roi_align(f, jnp.asarray(boxes), output_size, spatial_scale, sampling_ratio) * cotangent)
  got = jax.jit(jax.grad(loss))(jnp.asarray(features))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  assert np.abs(want).max() > 0.1


def test_boxes_get_no_gradient_like_torchvision():
  features = jnp.asarray(np.random.default_rng(6).standard_normal((1, H, W, C)), jnp.float32)
  boxes = jnp.asarray([[[1.3, 2.2, 7.9, 9.1]]], jnp.float32)
  grad = jax.grad(lambda b: jnp.sum(roi_align(features, b, 3, 1.0, 2) ** 2))(boxes)
  assert np.all(np.asarray(grad) == 0)


def test_bad_arguments_are_named():
  features = jnp.zeros((2, H, W, C))
  boxes = jnp.zeros((2, 3, 4))
  with pytest.raises(ValueError, match='sampling_ratio=-1 must be a positive int.*data-dependent shape'):
    roi_align(features, boxes, 7, 1.0, -1)
  with pytest.raises(ValueError, match=r'boxes must be \[batch=2, num_boxes, 4\]'):
    roi_align(features, jnp.zeros((6, 4)), 7)
  with pytest.raises(ValueError, match='features must be NHWC'):
    roi_align(jnp.zeros((H, W, C)), boxes, 7)
  with pytest.raises(ValueError, match='output_size'):
    roi_align(features, boxes, (7, 7, 7))


def test_jit_and_vmap_shapes():
  """Static shapes: any number of boxes per image, zero included, under jit."""
  features = jnp.ones((3, H, W, C))
  fn = jax.jit(functools.partial(roi_align, output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2))
  assert fn(features, jnp.zeros((3, 0, 4))).shape == (3, 0, 2, 3, C)
  out = fn(features, jnp.asarray([[[0.0, 0.0, 8.0, 8.0]]] * 3))
  np.testing.assert_allclose(np.asarray(out), 1.0, atol=1e-6)  # a constant map pools to itself inside the image
