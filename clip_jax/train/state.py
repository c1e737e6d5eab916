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
  frozen: Any = flax.struct.field(default_factory=dict)  # parameters no optimizer touches (teachers)


def create(params, model_state, optimizer, rng) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    model_state=model_state, rng=rng, bad_steps=jnp.zeros((), jnp.int32))
