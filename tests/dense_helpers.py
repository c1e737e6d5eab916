"""Random variables for the dense / detection model tests, without compiling `init`.

`jax.jit(model.init)` of LSeg takes ~20 s to compile on a 2-core CPU (every
initializer is its own op); the tests only need variables of the right
shapes with non-trivial values, so they take the shapes from `eval_shape`
and fill them with numpy. Norm scales and BN variances stay near 1 so
activations keep their scale; everything else (biases included, which a
fresh init zeroes) is small noise, so a dropped or mis-wired tensor shows.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model: nn.Module, *args, seed: int = 0, scale: float = 0.05, **kwargs) -> dict:
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs)))
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  out = {}
  for path, leaf in sorted(flat.items()):
    if path[-1] in ('scale', 'var'):
      value = rng.uniform(0.8, 1.2, leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) * scale
    out[path] = jnp.asarray(value, leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)
