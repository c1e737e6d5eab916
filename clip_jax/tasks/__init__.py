"""Objectives: `build_objective(config)` from `config.tasks` (name -> {weight, options})."""

import ml_collections

from clip_jax.tasks.base import Objective, Task
from clip_jax.tasks.contrastive import ContrastiveTask, clip_forward

# model.name -> (how a batch is fed to that model, the batch fields it reads).
FORWARDS = {'clip': (clip_forward, ('image', 'tokens'))}


def _contrastive(options):
  return ContrastiveTask(loss_type=options.get('loss', 'softmax'))


# config.tasks.<name> -> Task. Options other than `weight` are the task's own.
TASKS = {'contrastive': _contrastive}


def build_objective(config: ml_collections.ConfigDict) -> Objective:
  model_name = config.model.name
  if model_name not in FORWARDS:
    raise ValueError(f'model.name={model_name!r} has no training forward; known: {sorted(FORWARDS)}')
  if not config.get('tasks'):
    raise ValueError(f'config.tasks is empty: add at least one of {sorted(TASKS)}, '
                     "e.g. config.tasks.contrastive = dict(weight=1.0, loss='softmax')")
  tasks = []
  for name, options in config.tasks.items():
    if name not in TASKS:
      raise ValueError(f'config.tasks.{name}: unknown task; choose from {sorted(TASKS)}')
    weight = options.get('weight', 1.0)
    if not weight > 0:
      raise ValueError(f'config.tasks.{name}.weight={weight}: weights must be positive')
    tasks.append((float(weight), TASKS[name](options)))
  forward, batch_keys = FORWARDS[model_name]
  return Objective(forward=forward, tasks=tuple(tasks), batch_keys=batch_keys)


__all__ = ['build_objective', 'Objective', 'Task', 'ContrastiveTask']
