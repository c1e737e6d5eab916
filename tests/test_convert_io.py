"""Checkpoint files: .pt / .bin (torch.save), TorchScript archives, .safetensors."""

import numpy as np
import open_clip
import pytest
import torch

from clip_jax import convert
from clip_jax.convert.io import save_safetensors
from parity_helpers import perturb_


@pytest.fixture(scope='module')
def model():
  torch.manual_seed(0)
  return perturb_(open_clip.CLIP(
      embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=16),
      text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=100, width=64, heads=1, layers=1)))


def _assert_same(loaded, reference):
  assert sorted(loaded) == sorted(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(np.asarray(loaded[key]), value.numpy())


@pytest.mark.parametrize('suffix', ['.pt', '.bin', '.pth'])
def test_torch_save_files(model, tmp_path, suffix):
  path = tmp_path / f'model{suffix}'
  torch.save(model.state_dict(), path)
  _assert_same(convert.load(str(path)), model.state_dict())


def test_wrapped_state_dict_and_prefixes(model, tmp_path):
  path = tmp_path / 'wrapped.pt'
  torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
  config, variables = convert.from_open_clip(convert.load(str(path)))
  np.testing.assert_array_equal(variables['params']['text']['text_projection'], model.text_projection.detach().numpy())


def test_torchscript_archive(tmp_path):
  """OpenAI's released .pt files are TorchScript archives."""
  module = torch.jit.script(torch.nn.Linear(3, 2))
  path = tmp_path / 'scripted.pt'
  module.save(str(path))
  _assert_same(convert.load(str(path)), module.state_dict())


def test_safetensors(model, tmp_path):
  path = tmp_path / 'model.safetensors'
  reference = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_safetensors({k: v.numpy() for k, v in reference.items()}, str(path))
  _assert_same(convert.load(str(path)), reference)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    convert.load(str(tmp_path / 'missing.pt'))
  (tmp_path / 'weights.h5').write_bytes(b'')
  with pytest.raises(ValueError, match=r"unknown checkpoint extension '.h5'"):
    convert.load(str(tmp_path / 'weights.h5'))
  torch.save([1, 2, 3], tmp_path / 'list.pt')
  with pytest.raises(ValueError, match='holds a list, not a state dict'):
    convert.load(str(tmp_path / 'list.pt'))
