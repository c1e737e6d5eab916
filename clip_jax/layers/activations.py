"""The MLP activations the CLIP family uses, selectable by name."""

import jax


def quick_gelu(x):
  """OpenAI CLIP's approximation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """Exact (erf) GELU, torch.nn.GELU()'s default."""
  return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': gelu, 'gelu_tanh': gelu_tanh, 'relu': jax.nn.relu}


def get(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'act={name!r} is not a known activation; choose one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]
