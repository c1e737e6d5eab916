"""THE training loop: every objective of the library trains through `train()`.

The step is a pure function `step(state, batch) -> (state, metrics)`, jitted
once with explicit in/out shardings and the state donated. The state is born
sharded: its shapes come from `jax.eval_shape`, its shardings from the
logical axis names in clip_jax.sharding, and `jax.jit(init, out_shardings=…)`
creates it in place.
"""

import dataclasses
import logging
import signal
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clip_jax import checkpoint, distributed, models, sharding, tasks
from clip_jax.data import pipeline
from clip_jax.train import accumulate
from clip_jax.train import frozen as frozen_lib
from clip_jax.train import logging as run_logging
from clip_jax.train import optim
from clip_jax.train import pretrained
from clip_jax.train import state as state_lib

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """The run cannot continue (e.g. too many non-finite steps in a row)."""


def validate(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """Checks the run-level fields against this machine; returns the mesh shape."""
  try:
    mesh_shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  except ValueError as e:
    if jax.process_count() == 1:
      raise
    raise ValueError(f'{e} ({jax.process_count()} processes with {jax.local_device_count()} devices each)') from None
  data, fsdp, _ = mesh_shape
  if config.batch_size % (data * fsdp):
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the batch-sharding axes '
                     f'data*fsdp = {data}*{fsdp} = {data * fsdp}; choose a multiple of {data * fsdp}')
  accum = config.get('grad_accum_steps', 1)
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f'grad_accum_steps={accum!r} must be a positive integer (1 = no accumulation)')
  if config.batch_size % (data * fsdp * accum):
    raise ValueError(f'batch_size={config.batch_size} must split into grad_accum_steps={accum} micro-batches '
                     f'that each divide over data*fsdp = {data * fsdp} devices: choose a multiple of '
                     f'{data * fsdp * accum}')
  if config.batch_size % jax.process_count():
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the process count {jax.process_count()}')
  for field in ('total_steps', 'checkpoint.every_steps', 'log_every_steps', 'max_bad_steps'):
    node, value = config, None
    for part in field.split('.'):
      value = node = node[part]
    if value < 1:
      raise ValueError(f'{field}={value} must be at least 1')
  return mesh_shape


def make_step(model, objective, optimizer, schedule, grad_accum_steps: int = 1):
  """The pure train step. A non-finite loss or gradient leaves the state untouched (but counts).

  With grad_accum_steps > 1 the gradient is GradCache's (train/accumulate.py): the exact
  big-batch gradient, with the activation memory of one micro-batch.
  """

  def step(state: state_lib.TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    rngs = dict(zip(('dropout', 'gumbel', 'augment'), jax.random.split(rng, 3)))

    def loss_fn(params):
      variables = frozen_lib.model_variables(params, state.model_state, state.frozen)
      loss, metrics, updates = objective(model, variables, batch, train=True, rngs=rngs)
      return loss, (metrics, updates)

    if grad_accum_steps > 1:
      loss, metrics, updates, grads = accumulate.gradcache(
          objective, model, state.params, state.model_state, state.frozen, batch, rngs, grad_accum_steps)
    else:
      (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        model_state=keep({**state.model_state, **updates}, state.model_state),
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   bad_steps=new_state.bad_steps, step_applied=ok)
    return new_state, metrics

  return step


@dataclasses.dataclass
class Setup:
  """Everything `train()` derives from the config before the first step."""
  config: ml_collections.ConfigDict
  mesh: Any
  rules: Any
  model: Any
  objective: Any
  optimizer: Any
  schedule: Any
  abstract_state: Any
  state_shardings: Any
  init_state: Any  # rng -> sharded TrainState (jitted), with config.init / config.teacher weights loaded


def setup(config: ml_collections.ConfigDict) -> Setup:
  mesh = sharding.make_mesh(*validate(config))
  distributed.check_process_layout(mesh, sharding.BATCH_AXES)
  rules = sharding.axis_rules(config.mesh.get('rules'))
  model = models.build(config.model)
  objective = tasks.build_objective(config)
  schedule = optim.schedule(config.optim, config.total_steps)
  optimizer = optim.make(config.optim, config.total_steps)
  pretrained.check_init(config)
  frozen_paths = frozen_lib.paths_of(config)
  inputs = [jnp.zeros(x.shape, x.dtype) for x in models.example_inputs(config.model)]
  teacher_config = pretrained.teacher_config(config)
  if teacher_config is not None:
    teacher = models.build(teacher_config)
    teacher_inputs = [jnp.zeros(x.shape, x.dtype) for x in models.example_inputs(teacher_config)]

  def boxed_init(rng):
    variables = model.init(rng, *inputs)
    params, fixed = frozen_lib.split(variables['params'], frozen_paths)
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    frozen = {'params': fixed} if fixed else {}
    if teacher_config is not None:  # random here; pretrained.apply loads its weights
      frozen[frozen_lib.TEACHER] = teacher.init(jax.random.fold_in(rng, 2), *teacher_inputs)
    return state_lib.create(params, model_state, optimizer, jax.random.fold_in(rng, 1), frozen)

  def init(rng):
    return nn.unbox(boxed_init(rng))

  with sharding.use(mesh, rules):
    logical = nn.get_partition_spec(jax.eval_shape(boxed_init, jax.random.PRNGKey(0)))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.logical_sharding(logical, abstract, mesh, rules)
    random_state = jax.jit(init, out_shardings=shardings)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)

  def init_state(rng):
    return pretrained.apply(random_state(rng), config, config.model, shardings)

  return Setup(config, mesh, rules, model, objective, optimizer, schedule, abstract, shardings, init_state)


def jit_step(s: Setup):
  """The jitted train step for `s`: state shardings in and out, the state donated."""
  return jax.jit(make_step(s.model, s.objective, s.optimizer, s.schedule, s.config.get('grad_accum_steps', 1)),
                 in_shardings=(s.state_shardings, None), out_shardings=(s.state_shardings, None),
                 donate_argnums=0)


def abstract_batch(s: Setup) -> dict:
  """Shapes, dtypes and shardings of the global batch the step takes (for AOT compilation)."""
  c = s.config
  prompts = c.data.get('prompts')
  spec = pipeline.batch_spec(c.model.vision.image_size, models.context_length(c.model),
                             max_objects=c.data.digits.num_digits[1] if c.data.source == 'digits' else None,
                             max_prompts=prompts.max_prompts if prompts else 0)
  missing = [k for k in s.objective.batch_keys if k not in spec]
  if missing:
    raise ValueError(f'abstract_batch: no shape known for batch fields {missing}')
  out = {}
  for key in s.objective.batch_keys:
    shape, dtype = spec[key]
    out[key] = jax.ShapeDtypeStruct((c.batch_size,) + tuple(shape), dtype,
                                    sharding=sharding.batch_sharding(s.mesh, 1 + len(shape)))
  return out


def global_batch(mesh, local: dict) -> dict:
  """This process's numpy batch -> global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local.items()}


class _Preemption:
  """SIGTERM -> save, then leave cleanly, at a step every process agrees on.

  One process: a Python signal handler sets a flag the loop polls. Several
  processes: each may get the signal at a different step, and a checkpoint
  save is a collective, so JAX's preemption sync (the coordination service
  propagates the notice and picks the next step all processes reach) decides;
  its notifier owns SIGTERM then, so no Python handler is installed.
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: preemption is then the caller's business
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (call once per step, on every process)."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged and eval metrics."""
  s = setup(config)
  mngr = checkpoint.manager(workdir, max_to_keep=config.checkpoint.keep, async_save=config.checkpoint.get('async', True))
  writer = run_logging.MetricsWriter(workdir, tensorboard=config.get('tensorboard', True))
  data = pipeline.make_iterator(config.data, batch_size=config.batch_size, image_size=config.model.vision.image_size,
                                context_length=models.context_length(config.model), seed=config.seed, train=True)
  step_fn = jit_step(s)
  start = mngr.latest_step()
  with sharding.use(s.mesh, s.rules):
    if start is None:
      state = s.init_state(jax.random.PRNGKey(config.seed))
      start = 0
    else:
      state, data_state = checkpoint.restore(mngr, start, s.abstract_state)
      data.set_state(data_state)
      log.info('resumed from step %d', start)
  if jax.process_index() == 0:
    print(run_logging.startup_summary(s.mesh, s.abstract_state, s.state_shardings), flush=True)

  bar = None
  if progress and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=config.total_steps, initial=start, desc='train', dynamic_ncols=True)

  throughput = run_logging.Throughput()
  last: dict[str, Any] = {}
  pending = None  # (step, metrics) of the step before: read after the next dispatch, so they overlap
  step = start
  stopped_early = False

  def finish_step(done_step, metrics):
    nonlocal last
    metrics = jax.device_get(metrics)  # waits for that step: throughput counts finished steps
    throughput.add(config.batch_size)
    if int(metrics['bad_steps']) >= config.max_bad_steps:
      raise TrainingError(
          f'{int(metrics["bad_steps"])} non-finite steps in a row (max_bad_steps={config.max_bad_steps}) at step '
          f'{done_step}; the parameters were not updated by them and the last good checkpoint is '
          f'{mngr.latest_step()} in {checkpoint.checkpoint_dir(workdir)}')
    if done_step % config.log_every_steps == 0 or done_step == config.total_steps:
      row = {k: v for k, v in metrics.items() if k != 'step_applied'}
      row.update(examples_per_second=throughput.rate(), skipped_records=data.skipped)
      writer.write(done_step, row)
      last = row
      if bar is not None:
        bar.set_postfix(loss=f'{float(metrics["loss"]):.4f}')

  try:
    with _Preemption() as preemption, sharding.use(s.mesh, s.rules):
      while step < config.total_steps:
        batch = global_batch(s.mesh, s.objective.select(next(data)))
        state, metrics = step_fn(state, batch)
        step += 1
        if pending is not None:
          finish_step(*pending)
        pending = (step, metrics)
        if bar is not None:
          bar.update(1)
        preempted = preemption.reached(step)
        if step % config.checkpoint.every_steps == 0 or step == config.total_steps or preempted:
          finish_step(*pending)  # never checkpoint past a run of bad steps unchecked
          pending = None
          checkpoint.save(mngr, step, state, data.get_state(), config)
        if config.eval.every_steps and step % config.eval.every_steps == 0 and step < config.total_steps:
          writer.write(step, evaluate(s, state))
        if preempted:
          log.warning('SIGTERM: saved step %d, exiting', step)
          stopped_early = True
          break
      if pending is not None:
        finish_step(*pending)
      mngr.wait_until_finished()
      results = dict(last)
      if not stopped_early and config.eval.at_end:
        eval_metrics = evaluate(s, state)
        writer.write(step, eval_metrics)
        results.update(eval_metrics)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    data.close()
    if bar is not None:
      bar.close()
  results['step'] = step
  results['preempted'] = stopped_early
  return results


def evaluate(s: Setup, state) -> dict:
  """The tasks' held-out metrics; they see the whole model (frozen parts merged) and any teacher."""
  variables = frozen_lib.model_variables(state.params, state.model_state, state.frozen)
  return s.objective.evaluate(s.model, variables, s.config)
