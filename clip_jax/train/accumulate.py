"""Exact gradient accumulation for batch-coupled losses (GradCache).

A contrastive loss couples every example to every other one, so summing the
gradients of k independent micro-batch losses is *not* the gradient of the
big-batch loss. GradCache gets the exact gradient with the memory of one
micro-batch:

  1. embed every micro-batch without gradients (no activations kept);
  2. compute the loss over all the embeddings at once, and its gradient with
     respect to the embeddings (cheap: B x D numbers);
  3. recompute each micro-batch's forward with gradients and pull the cached
     embedding gradients back through it (a VJP), summing parameter gradients.

Step 3 costs a second forward, so a step is ~4/3 the compute of a plain one.

Micro-batch j takes rows j, j+k, j+2k, ... of the global batch. Each device
holds B/(D*k) rows of every micro-batch, so the split is local (no
communication), and the embeddings reassemble in the original row order.

Outputs with a leading batch axis are split and reassembled that way; scalar
outputs (the logit scale and bias) depend only on the parameters, so they are
taken from micro-batch 0, which also receives their whole gradient. Layers
with batch statistics (ModifiedResNet's BatchNorm in training mode) see
micro-batch statistics, as with any accumulation; their running averages are
updated micro-batch after micro-batch.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.train import frozen as frozen_lib


def split(tree: Any, k: int) -> Any:
  """[B, ...] leaves -> [k, B/k, ...]; micro-batch j holds rows j, j+k, ..."""
  def one(x):
    micro = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(micro, (None, 'act_batch') + (None,) * (x.ndim - 1))
  return jax.tree.map(one, tree)


def merge(tree: Any) -> Any:
  """The inverse of `split` for [k, b, ...] leaves; [k] scalar leaves give micro-batch 0's."""
  def one(x):
    if x.ndim == 1:
      return x[0]
    merged = x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
    return nn.with_logical_constraint(merged, ('act_batch',) + (None,) * (x.ndim - 2))
  return jax.tree.map(one, tree)


def _micro_rngs(rngs: dict, j) -> dict:
  return {name: jax.random.fold_in(key, j) for name, key in rngs.items()}


def gradcache(objective, model, params, model_state: dict, frozen: dict, batch: dict, rngs: dict, k: int):
  """(loss, metrics, the new model state, parameter gradients) of `objective` on the global `batch`,
  computed micro-batch by micro-batch; equal to one big-batch step's. `model_state` holds the
  mutable collections (batch statistics), `frozen` the variables that are never updated."""
  micro = split(batch, k)
  steps = jnp.arange(k)

  def forward(p, state, mb, j):
    variables = frozen_lib.model_variables(p, state, frozen)
    outputs, updates = objective.forward(model, variables, mb, train=True, rngs=_micro_rngs(rngs, j))
    return outputs, {name: updates.get(name, state[name]) for name in state}

  # 1. Embeddings of every micro-batch, no gradients.
  no_grad = jax.lax.stop_gradient(params)
  outputs = jax.lax.map(lambda xs: forward(no_grad, model_state, *xs)[0], (micro, steps))

  # 2. The loss over the whole batch, and its gradient with respect to the embeddings.
  full = merge(outputs)
  (loss, metrics), output_grads = jax.value_and_grad(objective.loss, has_aux=True)(full, batch)

  # 3. Recompute each micro-batch with gradients; pull the cached embedding gradients through it.
  # A parameter-only scalar's gradient goes to micro-batch 0 alone.
  first = (steps == 0)
  micro_grads = jax.tree.map(lambda g: split(g, k) if g.ndim else jnp.where(first, g, jnp.zeros_like(g)),
                             output_grads)

  def body(carry, xs):
    grads, state = carry
    mb, g_out, j = xs
    _, vjp, updates = jax.vjp(lambda p: forward(p, state, mb, j), params, has_aux=True)
    (g,) = vjp(g_out)
    return (jax.tree.map(jnp.add, grads, g), updates), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, state), _ = jax.lax.scan(body, (zeros, model_state), (micro, micro_grads, steps))
  return loss, metrics, state, grads
