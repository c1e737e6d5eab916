"""The one trainer: sharding equivalence, non-finite steps, validation, checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import checkpoint, tasks
from clip_jax.data import pipeline
from clip_jax.train import trainer
from trainer_helpers import losses, tiny_config

STEPS = 20


@pytest.fixture(scope='module')
def reference_losses(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('mesh_8x1x1')
  trainer.train(tiny_config(total_steps=STEPS, **{'mesh.data': 8}), str(workdir), progress=False)
  return losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize('mesh_shape', [(2, 4, 1), (2, 2, 2), (1, 8, 1)], ids=['2x4x1', '2x2x2', '1x8x1'])
def test_first_losses_agree_across_meshes(mesh_shape, reference_losses, tmp_path):
  data, fsdp, tensor = mesh_shape
  config = tiny_config(total_steps=STEPS, **{'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor})
  trainer.train(config, str(tmp_path), progress=False)
  got = losses(tmp_path)
  assert sorted(got) == list(range(1, STEPS + 1))
  want = np.array([reference_losses[s] for s in range(1, STEPS + 1)])
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], want, rtol=1e-4)
  assert want[-1] < want[0]  # and it is learning


def test_checkpoint_load_returns_the_trained_variables(tmp_path):
  config = tiny_config(total_steps=2)
  trainer.train(config, str(tmp_path), progress=False)
  loaded_config, variables = checkpoint.load(str(tmp_path))
  assert loaded_config.model.to_dict() == config.model.to_dict()
  assert loaded_config.total_steps == 2
  assert isinstance(variables['params']['logit_scale'], np.ndarray)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 7 .* available: \[2\]'):
    checkpoint.load(str(tmp_path), step=7)
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    checkpoint.load(str(tmp_path / 'elsewhere'))


def test_non_finite_step_is_skipped_and_counted():
  config = tiny_config()
  s = trainer.setup(config)
  step_fn = jax.jit(trainer.make_step(s.model, s.objective, s.optimizer, s.schedule))
  data = pipeline.make_iterator(config.data, batch_size=config.batch_size, image_size=64, context_length=24,
                                seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(data).items()}
  state = s.init_state(jax.random.PRNGKey(0))
  before = jax.device_get(state.params)
  poisoned = dict(batch, tokens=batch['tokens'].at[0, 1].set(10 ** 6))  # out of vocabulary -> NaN features
  state, metrics = step_fn(state, poisoned)
  assert not np.isfinite(float(metrics['loss']))
  assert int(metrics['bad_steps']) == 1 and not bool(metrics['step_applied'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  assert int(state.step) == 1  # the batch was consumed
  for _ in range(2):  # the warmup schedule's first learning rate is 0
    state, metrics = step_fn(state, batch)
    assert np.isfinite(float(metrics['loss'])) and int(metrics['bad_steps']) == 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), before)
  assert all(jax.tree.leaves(changed))


def test_too_many_bad_steps_stop_with_the_good_checkpoint(tmp_path, monkeypatch):
  make = pipeline.make_iterator

  class Poisoned:
    """Good batches for two steps, then out-of-vocabulary tokens forever."""

    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count > 2:
        batch = dict(batch, tokens=np.full_like(batch['tokens'], 10 ** 6))
      return batch

    def __getattr__(self, name):
      return getattr(self.inner, name)

  monkeypatch.setattr(pipeline, 'make_iterator', lambda *a, **k: Poisoned(make(*a, **k)))
  config = tiny_config(total_steps=20, max_bad_steps=3, **{'checkpoint.every_steps': 2})
  with pytest.raises(trainer.TrainingError, match=r'3 non-finite steps in a row \(max_bad_steps=3\) at step 5'):
    trainer.train(config, str(tmp_path), progress=False)
  _, good = checkpoint.load(str(tmp_path), step=2)
  latest_config, latest = checkpoint.load(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, latest, good)  # bad steps never touched the parameters
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(latest))


@pytest.mark.parametrize('overrides,match', [
    ({'batch_size': 12, 'mesh.data': 8}, r'batch_size=12 is not divisible by the batch-sharding axes data\*fsdp = 8\*1'),
    ({'mesh.data': 3, 'mesh.fsdp': 2}, r'data\*fsdp\*tensor = 6 but there are 8 devices'),
    ({'mesh.data': -1, 'mesh.fsdp': -1}, 'only one of data/fsdp/tensor may be -1'),
    ({'total_steps': 0}, 'total_steps=0 must be at least 1'),
    ({'tasks.contrastive.loss': 'hinge'}, r"tasks.contrastive.loss='hinge'"),
    ({'optim.warmup_steps': 50}, r'optim.warmup_steps=50 must be below total_steps=4'),
])
def test_startup_refuses_bad_configs(overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    trainer.train(tiny_config(**overrides), str(tmp_path), progress=False)


def test_logs_summary_keep_n_and_no_compilation_after_the_first_step(tmp_path, capsys, monkeypatch):
  """Also: the step compiles once, and later steps (new batches and rngs, logging, a checkpoint
  every step) compile nothing."""
  steps = []  # the jitted step functions the trainer made
  make = trainer.jit_step
  monkeypatch.setattr(trainer, 'jit_step', lambda s: steps.append(make(s)) or steps[-1])
  events = []  # ('compile', name) from JAX, ('logged', step) from the metrics writer
  listener = lambda event, duration, **_: events.append(('compile', event)) if 'backend_compile' in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  write = trainer.run_logging.MetricsWriter.write
  monkeypatch.setattr(trainer.run_logging.MetricsWriter, 'write',
                      lambda self, step, row: (events.append(('logged', step)), write(self, step, row))[1])
  config = tiny_config(total_steps=4, tensorboard=True, **{'checkpoint.every_steps': 1, 'checkpoint.keep': 2})
  try:
    trainer.train(config, str(tmp_path), progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(steps) == 1 and steps[0]._cache_size() == 1  # pylint: disable=protected-access
  logged = [i for i, (kind, _) in enumerate(events) if kind == 'logged']
  assert [events[i][1] for i in logged] == [1, 2, 3, 4]
  assert any(kind == 'compile' for kind, _ in events[:logged[0]])  # the listener does see compilations
  assert [e for e in events[logged[0]:] if e[0] == 'compile'] == []
  out = capsys.readouterr().out
  assert 'mesh: data=8, fsdp=1, tensor=1' in out and 'parameters: ' in out and 'per-device bytes' in out
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for key in ('loss', 'learning_rate', 'examples_per_second', 'skipped_records', 'grad_norm', 'bad_steps'):
    assert all(key in r for r in rows), key
  assert rows[0]['learning_rate'] == 0.0 and rows[1]['learning_rate'] > 0
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert sorted(checkpoint.manager(str(tmp_path), read_only=True).all_steps()) == [3, 4]


def test_sigmoid_loss_trains_with_a_logit_bias(tmp_path):
  config = tiny_config(total_steps=4, **{'model.init_logit_bias': -10.0, 'model.init_logit_scale': 2.302585,
                                         'tasks.contrastive.loss': 'sigmoid'})
  results = trainer.train(config, str(tmp_path), progress=False)
  assert np.isfinite(results['loss']) and results['bad_steps'] == 0
  assert 'logit_bias' in results
  _, variables = checkpoint.load(str(tmp_path))
  assert variables['params']['logit_bias'] != -10.0  # learned


def test_sigmoid_loss_without_a_bias_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"needs a logit bias: set model.init_logit_bias"):
    trainer.train(tiny_config(**{'tasks.contrastive.loss': 'sigmoid'}), str(tmp_path), progress=False)


def test_only_the_fields_the_objective_reads_are_selected():
  objective = tasks.build_objective(tiny_config())
  batch = {'image': np.zeros((2, 4, 4, 3), np.uint8), 'tokens': np.zeros((2, 5), np.int32),
           'mask': np.zeros((2, 4, 4), np.uint8)}
  assert sorted(objective.select(batch)) == ['image', 'tokens']
  with pytest.raises(ValueError, match=r"needs batch fields \['tokens'\] but the data yields \['image'\]"):
    objective.select({'image': batch['image']})

