"""The Task interface: one objective family, pluggable into the one trainer.

A run's objective is a model *forward* (how a batch is fed to the model,
giving a dict of outputs) plus one or more weighted *tasks*, each turning
those outputs and the batch into a scalar loss and metrics. All of it runs in
the same jitted step; combining objectives (ViLD = supervised + distillation)
is listing several tasks over one forward, so the model runs once.
"""

import abc
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from clip_jax.train import frozen as frozen_lib

# forward(model, variables, batch, *, train, rngs) -> (outputs, updated mutable collections)
Forward = Callable[..., tuple[dict, dict]]


def mutable_collections(variables: Mapping, train: bool) -> list:
  """The collections a forward updates: when training, all but the parameters and a teacher's
  (BatchNorm statistics); none in evaluation."""
  return [k for k in variables if k not in ('params', frozen_lib.TEACHER)] if train else []


class Task(abc.ABC):
  """One objective. Subclasses are frozen dataclasses configured from `config.tasks.<name>`."""

  name: str = 'task'
  batch_keys: Sequence[str] = ()  # batch fields the task reads beyond its model forward's

  def check(self, config) -> None:
    """Raises ValueError for a run config this task cannot train with (called once, at setup)."""
    del config

  @abc.abstractmethod
  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(scalar loss, metrics) for the global batch."""

  def evaluate(self, model, variables, config) -> dict[str, float]:
    """Held-out metrics, run on the host between training steps (optional)."""
    del model, variables, config
    return {}


@dataclasses.dataclass(frozen=True)
class Objective:
  forward: Forward
  tasks: Sequence[tuple[float, Task]]
  batch_keys: Sequence[str] = ('image', 'tokens')  # the batch fields the step needs on device

  def select(self, batch: Mapping[str, Any]) -> dict:
    """The fields of a host batch this objective uses (the rest never reach the device)."""
    missing = [k for k in self.batch_keys if k not in batch]
    if missing:
      raise ValueError(f'the objective needs batch fields {missing} but the data yields {sorted(batch)}; '
                       'choose a config.data source that provides them')
    return {k: batch[k] for k in self.batch_keys}

  def __call__(self, model, variables, batch, *, train: bool, rngs: dict):
    """(total loss, metrics, updated mutable collections); metrics are prefixed by task name."""
    outputs, updates = self.forward(model, variables, batch, train=train, rngs=rngs)
    total, metrics = self.loss(outputs, batch)
    return total, metrics, updates

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    """(weighted total loss, metrics) of the forward's outputs for the global batch."""
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, Any] = {}
    for weight, task in self.tasks:
      loss, task_metrics = task.loss(outputs, batch)
      total = total + weight * loss
      metrics[f'{task.name}/loss'] = loss
      metrics.update({f'{task.name}/{k}': v for k, v in task_metrics.items()})
    metrics.update({k: v for k, v in outputs.items() if k in ('logit_scale', 'logit_bias')})
    return total, metrics

  def evaluate(self, model, variables, config) -> dict[str, float]:
    results = {}
    for _, task in self.tasks:
      results.update({f'{task.name}/{k}': v for k, v in task.evaluate(model, variables, config).items()})
    return results
