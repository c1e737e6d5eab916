"""Numerical parity of the CLIP towers with random-initialised PyTorch references.

Tolerance: normalised features within 1e-4 max abs difference in float32 (the
issue's bar); in practice the difference is ~1e-7, float32 rounding.
"""

import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from clip_jax import models
from clip_jax.convert import from_hf_clip, from_open_clip, hf_config, to_hf_clip, to_open_clip
from parity_helpers import nhwc, perturb_, random_inputs, to_torch_state_dict

TOL = 1e-4


def _custom_open_clip():
  """A non-standard shape: odd width/depth, MLP ratio 3, short context, small vocab."""
  return open_clip.CLIP(
      embed_dim=96, quick_gelu=True,
      vision_cfg=open_clip.CLIPVisionCfg(layers=3, width=192, patch_size=8, image_size=48, mlp_ratio=3),
      text_cfg=open_clip.CLIPTextCfg(context_length=32, vocab_size=1000, width=128, heads=2, layers=2))


def _custom_resnet_open_clip():
  return open_clip.CLIP(
      embed_dim=48, vision_cfg=open_clip.CLIPVisionCfg(layers=(1, 2, 1, 1), width=16, image_size=64, head_width=32),
      text_cfg=open_clip.CLIPTextCfg(context_length=16, vocab_size=500, width=64, heads=2, layers=1))


# (name, constructor, activation open_clip uses, head width)
OPEN_CLIP_MODELS = [
    ('ViT-B-32', lambda: open_clip.create_model('ViT-B-32'), 'gelu', 64),
    ('ViT-B-16-quickgelu', lambda: open_clip.create_model('ViT-B-16-quickgelu'), 'quick_gelu', 64),
    ('RN50', lambda: open_clip.create_model('RN50'), 'gelu', 64),
    ('custom-vit', _custom_open_clip, 'quick_gelu', 64),
    ('custom-resnet', _custom_resnet_open_clip, 'gelu', 32),
]


def _reference_features(model, images, tokens):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images), normalize=True).numpy(),
            model.encode_text(torch.from_numpy(tokens), normalize=True).numpy())


@pytest.mark.parametrize('name,make,act,head_width', OPEN_CLIP_MODELS, ids=[m[0] for m in OPEN_CLIP_MODELS])
def test_open_clip_parity_and_round_trip(name, make, act, head_width):
  torch.manual_seed(0)
  reference = perturb_(make())
  config, variables = from_open_clip(reference.state_dict(), act=act, head_width=head_width)
  model = models.build(config)
  images, tokens = random_inputs(config.vision.image_size, config.text.context_length, config.text.vocab_size)
  want_img, want_txt = _reference_features(reference, images, tokens)
  img, txt, scale = model.apply(variables, jnp.asarray(nhwc(images)), jnp.asarray(tokens, jnp.int32))
  assert np.abs(np.asarray(img) - want_img).max() < TOL
  assert np.abs(np.asarray(txt) - want_txt).max() < TOL
  np.testing.assert_allclose(float(scale), reference.logit_scale.exp().item(), rtol=1e-6)

  # Round trip: strict load into a fresh open_clip model reproduces the reference.
  fresh = make().eval()
  fresh.load_state_dict(to_torch_state_dict(to_open_clip(config, variables)), strict=True)
  got_img, got_txt = _reference_features(fresh, images, tokens)
  np.testing.assert_allclose(got_img, want_img, atol=1e-6)
  np.testing.assert_allclose(got_txt, want_txt, atol=1e-6)


def test_open_clip_fp16_state_dict_is_upcast():
  torch.manual_seed(1)
  reference = perturb_(_custom_open_clip())
  half = {k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}
  config, variables = from_open_clip(half)
  leaf = variables['params']['vision']['proj']
  assert leaf.dtype == np.float32
  np.testing.assert_array_equal(leaf, reference.visual.proj.detach().half().float().numpy())


def test_inferred_config_matches_the_zoo():
  config, _ = from_open_clip(open_clip.create_model('RN50').state_dict(), act='quick_gelu')
  want = models.zoo.get('RN50')
  assert config.to_dict() == want.to_dict()


HF_CONFIG = dict(
    projection_dim=40,
    text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, eos_token_id=999, bos_token_id=998,
                     pad_token_id=0, hidden_act='gelu'),
    vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
                       image_size=40, patch_size=8, hidden_act='gelu'))


def test_hf_clip_parity_and_round_trip():
  torch.manual_seed(0)
  hf = CLIPConfig(**HF_CONFIG)
  reference = perturb_(CLIPModel(hf))
  config, variables = from_hf_clip(reference.state_dict(), hf.to_dict())
  model = models.build(config)
  images, tokens = random_inputs(40, 32, 1000)
  with torch.no_grad():
    out = reference(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images))
  img, txt, scale = model.apply(variables, jnp.asarray(nhwc(images)), jnp.asarray(tokens, jnp.int32))
  assert np.abs(np.asarray(img) - out.image_embeds.numpy()).max() < TOL
  assert np.abs(np.asarray(txt) - out.text_embeds.numpy()).max() < TOL
  np.testing.assert_allclose(float(scale), reference.logit_scale.exp().item(), rtol=1e-6)

  fresh = CLIPModel(CLIPConfig(**hf_config(config))).eval()
  fresh.load_state_dict(to_torch_state_dict(to_hf_clip(config, variables)), strict=True)
  with torch.no_grad():
    again = fresh(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(images))
  np.testing.assert_allclose(again.image_embeds.numpy(), out.image_embeds.numpy(), atol=1e-6)
  np.testing.assert_allclose(again.text_embeds.numpy(), out.text_embeds.numpy(), atol=1e-6)


def test_hf_first_eos_pooling_when_eos_is_not_the_largest_id():
  """transformers pools at the first eos token unless eos is the legacy id 2."""
  torch.manual_seed(2)
  cfg = {**HF_CONFIG, 'text_config': {**HF_CONFIG['text_config'], 'eos_token_id': 7}}
  reference = perturb_(CLIPModel(CLIPConfig(**cfg)))
  config, variables = from_hf_clip(reference.state_dict(), CLIPConfig(**cfg).to_dict())
  assert config.text.eot_token_id == 7
  _, tokens = random_inputs(40, 32, 1000)
  tokens[:, 5] = 7
  with torch.no_grad():
    want = reference.get_text_features(input_ids=torch.from_numpy(tokens))
  want = getattr(want, 'pooler_output', want)
  if want.shape[-1] != config.embed_dim:  # transformers 5 returns a model output
    want = reference.text_projection(want)
  got = models.build(config).apply(variables, jnp.asarray(tokens, jnp.int32), method='encode_text')
  np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), atol=TOL)
