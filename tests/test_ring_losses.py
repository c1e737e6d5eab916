"""Ring (chunked shard_map) contrastive losses: the global losses' numbers without B x B logits.

The references are the global losses of clip_jax.losses.contrastive, themselves
checked against open_clip in test_losses.py.
"""

import re

import jax
import numpy as np
import pytest

from clip_jax import sharding, tasks
from clip_jax.data import pipeline
from clip_jax.losses import contrastive, ring
from clip_jax.tasks import ContrastiveTask
from clip_jax.train import trainer
from trainer_helpers import tiny_config

SCALE, BIAS = 14.3, -10.0


def _features(batch=16, dim=32, noise=0.0, seed=0):
  """L2-normalised image features and text features that are `noise` away from their pairs."""
  rng = np.random.default_rng(seed)
  img, other = rng.standard_normal((2, batch, dim)).astype(np.float32)
  txt = img + noise * other if noise else other
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return normalize(img), normalize(txt)


def _all_losses(img, txt, scale, bias):
  """(global, ring) softmax and sigmoid losses; one jit per mesh keeps the test cheap."""
  return (contrastive.softmax_loss(img, txt, scale), ring.ring_softmax_loss(img, txt, scale),
          contrastive.sigmoid_loss(img, txt, scale, bias), ring.ring_sigmoid_loss(img, txt, scale, bias))


def _value_and_grads(img, txt):
  """[(loss, (d img, d txt, d scale, d bias))] for the four losses of `_all_losses`, jitted."""

  def one(index):
    return jax.value_and_grad(lambda *a: _all_losses(*a)[index], argnums=(0, 1, 2, 3))

  return jax.jit(lambda *a: [one(k)(*a) for k in range(4)])(img, txt, SCALE, BIAS)


def _put(mesh, x):
  return jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)],
                         ids=['data8', 'fsdp8', 'data2xfsdp4', 'data2xfsdp2xtensor2', 'tensor8'])
def test_ring_losses_match_global_values_and_gradients(mesh_shape):
  img, txt = _features()
  mesh = sharding.make_mesh(*mesh_shape)
  with sharding.use(mesh):
    soft, soft_ring, sig, sig_ring = _value_and_grads(_put(mesh, img), _put(mesh, txt))
  for (want, want_grads), (got, got_grads) in ((soft, soft_ring), (sig, sig_ring)):
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g_want, g_got in zip(want_grads, got_grads):  # images, texts, scale, bias
      np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-6)
  assert len(soft_ring[1][0].sharding.device_set) == 8  # the feature gradients stay sharded


def test_ring_losses_without_a_mesh_are_a_ring_of_one():
  img, txt = _features(batch=8)
  soft, soft_ring, sig, sig_ring = _value_and_grads(img, txt)  # plain arrays, no mesh in scope
  for (want, want_grads), (got, got_grads) in ((soft, soft_ring), (sig, sig_ring)):
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g_want, g_got in zip(want_grads, got_grads):
      np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-6)


def _tied_features():
  """One-hot rows where text i and text i + 8 are identical: argmax must pick the lower index."""
  eye = np.eye(8, dtype=np.float32)
  both = np.concatenate([eye, eye])
  return both, both  # rows 0-7 hit, rows 8-15 tie with (and lose to) rows 0-7: accuracy 0.5


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 4, 1)], ids=['data8', 'data2xfsdp4'])
def test_ring_retrieval_accuracy_matches_global(mesh_shape):
  mesh = sharding.make_mesh(*mesh_shape)
  cases = {'noisy': _features(noise=3.0), 'tied': _tied_features()}
  with sharding.use(mesh):
    pairs = {name: jax.jit(lambda i, t: (contrastive.retrieval_accuracy(i, t), ring.ring_retrieval_accuracy(i, t)))(
        _put(mesh, img), _put(mesh, txt)) for name, (img, txt) in cases.items()}
  want, got = pairs['noisy']
  assert 0.0 < float(want) < 1.0  # a non-trivial mix of hits and misses
  assert float(got) == float(want)
  assert float(pairs['tied'][0]) == 0.5
  assert float(pairs['tied'][1]) == 0.5


def _matrix_dims(hlo: str) -> set[tuple[int, ...]]:
  """Shapes of every f32 buffer of rank >= 2 in a compiled (per-device) HLO module."""
  shapes = re.findall(r'f32\[(\d+(?:,\d+)+)\]', hlo)
  return {tuple(int(d) for d in s.split(',')) for s in shapes}


def _everything_ring(img, txt, scale, bias):
  """Both ring losses with their gradients and the ring metric: one compile for the HLO check."""
  grads = lambda loss: jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
  softmax = lambda i, t, s, b: ring.ring_softmax_loss(i, t, s)
  return (grads(softmax)(img, txt, scale, bias), grads(ring.ring_sigmoid_loss)(img, txt, scale, bias),
          ring.ring_retrieval_accuracy(img, txt))


def test_ring_losses_never_hold_a_batch_sized_logit_dimension():
  batch, dim = 64, 24  # b = 8 rows per device: 8, 24 and 64 cannot be confused
  mesh = sharding.make_mesh(8, 1, 1)
  x = jax.ShapeDtypeStruct((batch, dim), np.float32, sharding=sharding.batch_sharding(mesh, 2))

  def compiled(fn, *args):
    return _matrix_dims(jax.jit(fn).lower(*args).compile().as_text())

  grads = lambda loss: jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
  unsharded = jax.ShapeDtypeStruct((batch, dim), np.float32)
  assert (batch, batch) in compiled(grads(contrastive.sigmoid_loss), unsharded, unsharded, 1.0, 1.0)  # B x B
  with sharding.use(mesh):
    global_dims = compiled(grads(lambda i, t, s, b: contrastive.softmax_loss(i, t, s)), x, x, 1.0, 1.0)
    ring_dims = compiled(_everything_ring, x, x, 1.0, 1.0)
  assert (8, batch) in global_dims  # GSPMD's global loss: each device holds b x B logits
  assert (8, 8) in ring_dims  # the ring: b x b blocks ...
  assert not [s for s in ring_dims if batch in s], ring_dims  # ... and nothing batch-sized


def test_indivisible_batch_is_a_clear_error():
  img, txt = _features(batch=12)
  mesh = sharding.make_mesh(2, 4, 1)
  with sharding.use(mesh), pytest.raises(ValueError, match=r'batch of 12 .* 8 batch shards.*batch_size'):
    ring.ring_softmax_loss(img, txt, SCALE)
  with pytest.raises(ValueError, match='tasks.contrastive.chunked'):
    ContrastiveTask(chunked='yes')


def _first_losses(configs, steps=3):
  """The first `steps` train-step losses of each config: same init and batches, one compile each.

  Drives `trainer.setup`/`jit_step` directly (as `trainer.train` does) rather than
  two full `train()` runs, to skip the checkpoint writes and a second init compile.
  """
  setups = [trainer.setup(c) for c in configs]
  c = configs[0]
  data = pipeline.make_iterator(c.data, batch_size=c.batch_size, image_size=c.model.vision.image_size,
                                context_length=c.model.text.context_length, seed=c.seed, train=True)
  batches = [setups[0].objective.select(next(data)) for _ in range(steps)]
  out = []
  with sharding.use(setups[0].mesh, setups[0].rules):
    for s in setups:
      step, state = trainer.jit_step(s), setups[0].init_state(jax.random.PRNGKey(c.seed))
      losses = []
      for batch in batches:
        state, metrics = step(state, trainer.global_batch(s.mesh, batch))
        losses.append(float(metrics['loss']))
      out.append(losses)
  return out


@pytest.mark.slow  # two train-step compiles: ~30 s of CPU
def test_chunked_training_matches_global_training():
  small = {'model.vision.layers': 1, 'model.text.layers': 1, 'model.vision.image_size': 32,
           'mesh.data': 8}
  configs = [tiny_config(**small, **{'tasks.contrastive.chunked': chunked}) for chunked in (False, True)]
  assert tasks.build_objective(configs[1]).tasks[0][1].chunked  # the option reaches the task
  want, got = _first_losses(configs)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want[-1] < want[0]  # it trains
