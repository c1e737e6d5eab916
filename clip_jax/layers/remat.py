"""Rematerialisation (activation checkpointing) of repeated blocks, by policy name.

A model config names a policy (`model.remat`); the towers wrap each residual
block (or ResNet bottleneck) with `nn.remat` under it. The backward pass then
recomputes what the policy did not save, trading compute for activation
memory; the values and gradients are unchanged.
"""

from typing import Callable

import flax.linen as nn
import jax

# name -> what the forward pass keeps for the backward pass.
POLICIES = {
    'none': None,  # no remat: every intermediate is kept (the fastest, the most memory)
    'full': jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    'dots': jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the elementwise ops
    # keep the weight matmuls (no batch dims), recompute attention's batched q.k / p.v products
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check(name: str, field: str = 'model.remat') -> None:
  if name not in POLICIES:
    raise ValueError(f'{field}={name!r} is not a remat policy; use one of {sorted(POLICIES)} '
                     "('none' turns rematerialisation off)")


def checkpointed(fn: Callable, name: str, prevent_cse: bool = True) -> Callable:
  """`fn(module, *args)` rematerialised under policy `name` ('none': `fn` itself).

  Anything static (a `causal` flag, BatchNorm's `train`) must be closed over
  by `fn`, not passed as an argument: arguments of a remat'ed function are
  traced. Inside `nn.scan` pass `prevent_cse=False` (scan already stops XLA
  from merging the recomputation back into the forward pass).
  """
  check(name)
  if name == 'none':
    return fn
  return nn.remat(fn, policy=POLICIES[name], prevent_cse=prevent_cse)
