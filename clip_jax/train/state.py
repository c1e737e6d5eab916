"""The train state: everything a step reads and writes, one pytree."""

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # batches consumed (bad steps included, so data and step stay aligned)
  params: Any
  opt_state: Any
  model_state: Any           # mutable collections other than params (BatchNorm statistics)
  rng: jax.Array             # base key; each step folds in its step number
  bad_steps: jax.Array       # consecutive non-finite steps (reset by a good one)
  # Variables no optimizer touches (clip_jax.train.frozen): {'params': frozen subtrees of the
  # model's parameters, 'teacher': a teacher model's variables}, either absent.
  frozen: Any = flax.struct.field(default_factory=dict)


def create(params, model_state, optimizer, rng, frozen=None) -> TrainState:
  """A step-0 state; the optimizer state covers the trainable `params` only."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    model_state=model_state, rng=rng, bad_steps=jnp.zeros((), jnp.int32), frozen=frozen or {})
