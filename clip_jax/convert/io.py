"""Reading checkpoint files: .pt / .pth / .bin (torch) and .safetensors."""

import os
import zipfile
from typing import Any, Optional

import numpy as np


def load(path: str) -> dict[str, Any]:
  """A flat state dict (name -> tensor/array) from a checkpoint file.

  OpenAI's released `.pt` files are TorchScript archives; those are opened
  with `torch.jit.load` and their state dict taken. Everything else is read
  with `torch.load(weights_only=True)`, so a checkpoint cannot run code.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    from safetensors.numpy import load_file
    return dict(load_file(path))
  if ext not in ('.pt', '.pth', '.bin', '.ckpt'):
    raise ValueError(f'{path!r}: unknown checkpoint extension {ext!r}; expected .pt, .pth, .bin or .safetensors')
  import torch  # optional dependency: only needed for torch checkpoints
  if _is_torchscript(path):
    return dict(torch.jit.load(path, map_location='cpu').state_dict())
  obj = torch.load(path, map_location='cpu', weights_only=True)
  if isinstance(obj, dict) and 'state_dict' in obj and isinstance(obj['state_dict'], dict):
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise ValueError(f'{path!r} holds a {type(obj).__name__}, not a state dict')
  return obj


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(name.endswith('constants.pkl') or '/code/' in name for name in z.namelist())


def save_safetensors(state_dict: dict[str, np.ndarray], path: str, metadata: Optional[dict[str, str]] = None) -> None:
  """`metadata`: safetensors' string -> string header entries (transformers wants {'format': 'pt'})."""
  from safetensors.numpy import save_file
  # ascontiguousarray turns 0-d arrays 1-d; the reshape keeps scalars (logit_scale) scalar.
  save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state_dict.items()}, path, metadata=metadata)
