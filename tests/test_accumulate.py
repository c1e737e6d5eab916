"""GradCache accumulation: k micro-batches give the big batch's update, exactly."""

import jax
import numpy as np
import pytest

from clip_jax import sharding
from clip_jax.data import pipeline
from clip_jax.models import zoo
from clip_jax.train import trainer
from trainer_helpers import tiny_config


def one_step(config):
  """(initial state, state after one train step on the run's first batch, its metrics)."""
  s = trainer.setup(config)
  data = pipeline.make_iterator(config.data, batch_size=config.batch_size, image_size=config.model.vision.image_size,
                                context_length=config.model.text.context_length, seed=config.seed)
  with sharding.use(s.mesh, s.rules):
    state = s.init_state(jax.random.PRNGKey(config.seed))
    init = jax.device_get(state)
    batch = trainer.global_batch(s.mesh, s.objective.select(next(data)))
    state, metrics = trainer.jit_step(s)(state, batch)
  data.close()
  return init, jax.device_get(state), jax.device_get(metrics)


def max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


@pytest.mark.parametrize('loss', ['softmax', 'sigmoid'])
def test_four_micro_batches_of_32_equal_one_step_of_128(loss):
  # No warmup: the first step has the full learning rate, so it moves the parameters.
  overrides = {'batch_size': 128, 'mesh.data': 2, 'mesh.fsdp': 4, 'tasks.contrastive.loss': loss,
               'optim.warmup_steps': 0, 'model.vision.image_size': 32}
  if loss == 'sigmoid':
    overrides['model.init_logit_bias'] = -10.0
  init, big, big_metrics = one_step(tiny_config(**overrides))
  _, accumulated, metrics = one_step(tiny_config(grad_accum_steps=4, **overrides))
  np.testing.assert_allclose(metrics['loss'], big_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], big_metrics['grad_norm'], rtol=1e-4)
  assert max_diff(accumulated.params, big.params) <= 1e-5
  assert max_diff(big.params, init.params) > 1e-4  # the step did move them (lr 1e-3 scale)


def test_batch_statistics_are_updated_with_accumulation():
  config = tiny_config(batch_size=32, grad_accum_steps=2, **{'mesh.data': 8, 'optim.warmup_steps': 0})
  config.model = zoo.get('tiny-rn')
  config.model.vision.image_size = 32
  config.model.text.context_length = 24
  init, state, metrics = one_step(config)
  assert np.isfinite(metrics['loss']) and metrics['step_applied']
  stats = jax.tree.leaves(state.model_state)
  assert stats and all(np.all(np.isfinite(x)) for x in stats)
  assert max_diff(state.model_state, init.model_state) > 0


def test_a_batch_that_does_not_split_is_refused():
  with pytest.raises(ValueError, match=r'grad_accum_steps=3 micro-batches .* multiple of 24'):
    trainer.validate(tiny_config(batch_size=128, grad_accum_steps=3, **{'mesh.data': 8}))
  with pytest.raises(ValueError, match='grad_accum_steps=0 must be a positive integer'):
    trainer.validate(tiny_config(grad_accum_steps=0))
