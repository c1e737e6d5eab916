"""Contrastive losses: values and gradients against open_clip's PyTorch losses, sharded and not."""

import jax
import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

from clip_jax import sharding
from clip_jax.losses import contrastive


def _features(batch=16, dim=32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, batch, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return x[0], x[1]


def _torch_reference(kind, img, txt, scale, bias):
  ti = torch.tensor(img, requires_grad=True)
  tt = torch.tensor(txt, requires_grad=True)
  if kind == 'softmax':
    loss = ClipLoss()(ti, tt, torch.tensor(scale))
  else:
    loss = SigLipLoss()(ti, tt, torch.tensor(scale), torch.tensor(bias))
  loss.backward()
  return loss.item(), ti.grad.numpy(), tt.grad.numpy()


def _ours(kind):
  if kind == 'softmax':
    return lambda i, t, s, b: contrastive.softmax_loss(i, t, s)
  return contrastive.sigmoid_loss


@pytest.mark.parametrize('kind', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('mesh_shape', [None, (8, 1, 1), (1, 8, 1), (2, 4, 1)],
                         ids=['single', 'data8', 'fsdp8', 'data2xfsdp4'])
def test_loss_and_gradients_match_open_clip(kind, mesh_shape):
  img, txt = _features()
  scale, bias = 14.3, -10.0
  want_loss, want_gi, want_gt = _torch_reference(kind, img, txt, scale, bias)
  fn = jax.jit(jax.value_and_grad(_ours(kind), argnums=(0, 1)))
  if mesh_shape is None:
    loss, (gi, gt) = fn(img, txt, scale, bias)
  else:
    mesh = sharding.make_mesh(*mesh_shape)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, 2))
    with sharding.use(mesh):
      loss, (gi, gt) = fn(put(img), put(txt), scale, bias)
    assert len(gi.sharding.device_set) == 8
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gi), want_gi, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gt), want_gt, atol=1e-6)


def test_softmax_loss_reaches_zero_only_for_separable_pairs():
  eye = np.eye(8, dtype=np.float32)
  assert float(contrastive.softmax_loss(eye, eye, 100.0)) < 1e-30 + 1e-6
  assert float(contrastive.softmax_loss(eye, np.roll(eye, 1, axis=0), 100.0)) > 50


def test_retrieval_accuracy_counts_diagonal_hits():
  eye = np.eye(4, dtype=np.float32)
  swapped = eye[[1, 0, 2, 3]]
  assert float(contrastive.retrieval_accuracy(eye, swapped)) == pytest.approx(0.5)
