"""Objectives: `build_objective(config)` from `config.tasks` (name -> {weight, options})."""

import ml_collections

from clip_jax.tasks.base import Objective, Task
from clip_jax.tasks.contrastive import ContrastiveTask, clip_forward
from clip_jax.tasks.multilabel import GroupBalanceTask, MultiLabelTask, clip_prompts_forward, groupvit_forward
from clip_jax.tasks import detection, distill, segmentation

# model.name -> (how a batch is fed to that model, the batch fields it reads). Tasks may read more
# fields (Task.batch_keys); the prompt-aware forwards encode prompt_tokens when the batch has them.
FORWARDS = {'clip': (clip_forward, ('image', 'tokens')), 'groupvit': (groupvit_forward, ('image', 'tokens'))}
# Used instead when a task reads prompts (groupvit_forward reads them when present).
_PROMPT_FORWARDS = {'clip': clip_prompts_forward}
# model.name -> config -> (forward, batch fields): forwards fixed per run (class prompts, a teacher).
CONFIG_FORWARDS = {'lseg': segmentation.lseg_forward_for, 'vild': detection.vild_forward_for}


def _contrastive(options):
  return ContrastiveTask(loss_type=options.get('loss', 'softmax'), chunked=options.get('chunked', False))


def _weight_only(name, task, hint=''):
  """The builder of a task whose only option is its weight; other options are named in the error."""
  def build(options):
    unknown = sorted(set(options) - {'weight'})
    if unknown:
      raise ValueError(f'config.tasks.{name}: unknown options {unknown}; it takes only `weight`{hint}')
    return task()
  return build


_multi_label = _weight_only('multi_label', MultiLabelTask, ' (the prompts are configured in config.data.prompts)')
_group_balance = _weight_only('group_balance', GroupBalanceTask)


# config.tasks.<name> -> Task. Options other than `weight` are the task's own.
TASKS = {'contrastive': _contrastive, 'multi_label': _multi_label, 'group_balance': _group_balance}
# The same, for tasks that read the run config too (config.classes, config.model): (config, options) -> Task.
CONFIG_TASKS = {'pixel_ce': segmentation.pixel_ce, 'rpn': detection.rpn, 'box_regression': detection.box_regression,
                'vild_text': detection.vild_text, 'vild_image': distill.vild_image,
                'feature_distill': distill.feature_distill, 'pixel_distill': segmentation.pixel_distill}
# Tasks that bring their own forward (config -> (forward, batch fields)) when they are a run's only task.
TASK_FORWARDS = {'feature_distill': distill.clip_distill_forward_for}
# Tasks that add outputs to whatever forward the other tasks use: (forward, config) -> forward.
FORWARD_WRAPPERS = {'feature_distill': distill.with_teacher_features}


def build_objective(config: ml_collections.ConfigDict) -> Objective:
  model_name = config.model.name
  if model_name not in FORWARDS and model_name not in CONFIG_FORWARDS:
    raise ValueError(f'model.name={model_name!r} has no training forward; known: '
                     f'{sorted(set(FORWARDS) | set(CONFIG_FORWARDS))}')
  known = sorted(set(TASKS) | set(CONFIG_TASKS))
  if not config.get('tasks'):
    raise ValueError(f'config.tasks is empty: add at least one of {known}, '
                     "e.g. config.tasks.contrastive = dict(weight=1.0, loss='softmax')")
  tasks = []
  for name, options in config.tasks.items():
    if name not in known:
      raise ValueError(f'config.tasks.{name}: unknown task; choose from {known}')
    weight = options.get('weight', 1.0)
    if not weight > 0:
      raise ValueError(f'config.tasks.{name}.weight={weight}: weights must be positive')
    tasks.append((float(weight), TASKS[name](options) if name in TASKS else CONFIG_TASKS[name](config, options)))
  for _, task in tasks:
    task.check(config)
  names = list(config.tasks)
  if len(names) == 1 and names[0] in TASK_FORWARDS:
    forward, batch_keys = TASK_FORWARDS[names[0]](config)
  elif model_name in CONFIG_FORWARDS:
    forward, batch_keys = CONFIG_FORWARDS[model_name](config)
  else:
    forward, batch_keys = FORWARDS[model_name]
  extra = tuple(k for _, task in tasks for k in task.batch_keys if k not in batch_keys)
  if any(k.startswith('prompt_') for k in extra):
    forward = _PROMPT_FORWARDS.get(model_name, forward)
  if len(names) > 1:
    for name in names:
      if name in FORWARD_WRAPPERS:
        forward = FORWARD_WRAPPERS[name](forward, config)
  return Objective(forward=forward, tasks=tuple(tasks), batch_keys=tuple(dict.fromkeys(batch_keys + extra)))


__all__ = ['build_objective', 'Objective', 'Task', 'ContrastiveTask', 'MultiLabelTask']
