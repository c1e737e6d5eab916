"""Shared pieces of the PyTorch-reference parity tests."""

import numpy as np
import torch


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
  """Adds noise to every parameter and BN statistic, in place.

  Random-init references zero some tensors (open_clip zero-inits each
  bottleneck's last BN scale, transformers zeroes biases); a parity test over
  zeros would not notice a dropped or mis-mapped tensor.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
      elif name.endswith('running_var'):
        b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
  return model.eval()


def random_inputs(image_size: int, context_length: int, vocab_size: int, batch: int = 2, seed: int = 0):
  """NCHW float images and token rows that end at different positions (EOT = vocab - 1)."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
  tokens = rng.integers(1, vocab_size - 2, (batch, context_length)).astype(np.int64)
  for i in range(batch):
    end = [context_length // 3, context_length - 1][i % 2]
    tokens[i, end] = vocab_size - 1
    tokens[i, end + 1:] = 0
  return images, tokens


def nhwc(images: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def to_torch_state_dict(state_dict):
  return {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
