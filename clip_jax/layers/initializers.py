"""Parameter creation with logical axis names (see clip_jax.sharding)."""

import flax.linen as nn


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes):
  """`module.param` whose value carries logical axis names for sharding."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def normal(stddev: float):
  return nn.initializers.normal(stddev=stddev)
