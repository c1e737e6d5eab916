"""Hugging Face transformers `CLIPModel` state dicts <-> clip_jax CLIP variables.

HF keeps q/k/v as separate Linears and the projections as bias-free Linears;
the architecture comes from the HF config dict (`CLIPConfig.to_dict()`).
Only ViT image towers exist in HF's CLIPModel.
"""

import json
import os
import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from clip_jax.convert import io, mapping as m
from clip_jax import models
from clip_jax.models import layout, zoo

_IGNORED = re.compile(r'position_ids$')


def _tower_rules(prefix: tuple, key: str, layers: int, heads: int) -> list:
  rules = []
  for i in range(layers):
    p, k = prefix + (f'resblocks_{i}',), f'{key}.layers.{i}'
    rules += m.layer_norm(p + ('ln_1',), k + '.layer_norm1')
    rules += m.separate_qkv(p + ('attn', 'qkv'), [f'{k}.self_attn.{n}_proj' for n in 'qkv'], heads)
    rules += m.attn_out(p + ('attn', 'out'), k + '.self_attn.out_proj', heads)
    rules += m.layer_norm(p + ('ln_2',), k + '.layer_norm2')
    rules += m.dense(p + ('mlp', 'c_fc'), k + '.mlp.fc1') + m.dense(p + ('mlp', 'c_proj'), k + '.mlp.fc2')
  return rules


def rules(config: ml_collections.ConfigDict) -> list:
  v, t = config.vision, config.text
  if v.kind != 'vit':
    raise ValueError("Hugging Face's CLIPModel has only ViT image towers; "
                     f"model.vision.kind={v.kind!r} converts with clip_jax.convert.to_open_clip instead")
  V, T = ('params', 'vision'), ('params', 'text')
  out = [m.conv_weight(V + ('conv1', 'kernel'), 'vision_model.embeddings.patch_embedding.weight'),
         m.copy(V + ('class_embedding',), 'vision_model.embeddings.class_embedding'),
         m.copy(V + ('positional_embedding',), 'vision_model.embeddings.position_embedding.weight'),
         m.linear_weight(V + ('proj',), 'visual_projection.weight')]
  out += m.layer_norm(V + ('ln_pre',), 'vision_model.pre_layrnorm')  # sic: HF's spelling
  out += m.layer_norm(V + ('ln_post',), 'vision_model.post_layernorm')
  out += _tower_rules(V + ('transformer',), 'vision_model.encoder', v.layers, v.heads)
  out += [m.copy(T + ('token_embedding',), 'text_model.embeddings.token_embedding.weight'),
          m.copy(T + ('positional_embedding',), 'text_model.embeddings.position_embedding.weight'),
          m.linear_weight(T + ('text_projection',), 'text_projection.weight')]
  out += m.layer_norm(T + ('ln_final',), 'text_model.final_layer_norm')
  out += _tower_rules(T + ('transformer',), 'text_model.encoder', t.layers, t.heads)
  out += [m.copy(('params', 'logit_scale'), 'logit_scale')]
  return out


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  tc, vc = hf_config.get('text_config') or {}, hf_config.get('vision_config') or {}
  if not tc or not vc:
    raise ValueError('hf_config must be CLIPConfig.to_dict() with text_config and vision_config')
  acts = {tc.get('hidden_act', 'quick_gelu'), vc.get('hidden_act', 'quick_gelu')}
  if len(acts) != 1:
    raise ValueError(f'hf_config: text and vision hidden_act differ ({sorted(acts)}); clip_jax uses one model.act')
  act = acts.pop()
  for name, c in (('text_config', tc), ('vision_config', vc)):
    if abs(c.get('layer_norm_eps', 1e-5) - 1e-5) > 1e-12:
      raise ValueError(f'hf_config.{name}.layer_norm_eps={c["layer_norm_eps"]}: clip_jax CLIP uses 1e-5')
  vocab = tc.get('vocab_size', 49408)
  eos = tc.get('eos_token_id')
  # HF pools at argmax(ids) for the legacy eos_token_id == 2, else at the first eos token.
  eot_token_id = None if eos in (None, 2, vocab - 1) else eos
  text = zoo.text_tower(width=tc['hidden_size'], layers=tc['num_hidden_layers'], heads=tc['num_attention_heads'],
                        mlp_dim=tc['intermediate_size'], context_length=tc['max_position_embeddings'],
                        vocab_size=vocab, eot_token_id=eot_token_id)
  vision = zoo.vit_vision(image_size=vc['image_size'], patch_size=vc['patch_size'], width=vc['hidden_size'],
                          layers=vc['num_hidden_layers'], heads=vc['num_attention_heads'],
                          mlp_dim=vc['intermediate_size'])
  config = zoo.clip_config(hf_config.get('projection_dim', 512), vision, text, act=act)
  config.init_logit_scale = float(hf_config.get('logit_scale_init_value', config.init_logit_scale))
  return config


def hf_config(config: ml_collections.ConfigDict) -> dict:
  """The `CLIPConfig(**d)` arguments for a clip_jax ViT CLIP config."""
  v, t = config.vision, config.text
  eos = t.get('eot_token_id')
  return dict(
      projection_dim=config.embed_dim, logit_scale_init_value=config.init_logit_scale,
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                       num_hidden_layers=t.layers, num_attention_heads=t.heads,
                       max_position_embeddings=t.context_length, hidden_act=config.act, layer_norm_eps=1e-5,
                       eos_token_id=t.vocab_size - 1 if eos is None else eos,
                       bos_token_id=t.vocab_size - 2, pad_token_id=0 if t.vocab_size != 49408 else 1,
                       projection_dim=config.embed_dim),
      vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                         intermediate_size=v.mlp_dim, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                         hidden_act=config.act, layer_norm_eps=1e-5, num_channels=3,
                         projection_dim=config.embed_dim))


def from_hf_clip(state_dict: Mapping[str, Any], hf_config: Mapping[str, Any], scan_layers: bool = False):
  """(model_config, variables) from a transformers CLIPModel state dict and its config dict.

  `scan_layers=True` returns a config with model.scan_layers set and the
  variables in its stacked layout.
  """
  config = config_from_hf(hf_config)
  variables = m.from_state_dict(dict(state_dict), rules(config), models.abstract_variables(config),
                                ignore=_IGNORED.search, what='Hugging Face CLIPModel state dict')
  config.scan_layers = bool(scan_layers)
  return config, layout.from_loop(variables, config)


def to_hf_clip(config: ml_collections.ConfigDict, variables: Mapping) -> dict[str, np.ndarray]:
  """A state dict that transformers' CLIPModel(CLIPConfig(**hf_config(config))) loads strictly."""
  return m.to_state_dict(layout.to_loop(variables, config), rules(config))


def load_hf_clip(directory: str, scan_layers: bool = False):
  """(model_config, variables) from a `CLIPModel.save_pretrained` directory (config.json +
  model.safetensors or pytorch_model.bin), e.g. one `python -m clip_jax.export --format hf` wrote."""
  config_path = os.path.join(directory, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{directory!r} has no config.json: pass a directory that CLIPModel.save_pretrained '
                            'wrote (or python -m clip_jax.export --format hf)')
  weights = [os.path.join(directory, n) for n in ('model.safetensors', 'pytorch_model.bin')
             if os.path.isfile(os.path.join(directory, n))]
  if not weights:
    raise FileNotFoundError(f'{directory!r} has neither model.safetensors nor pytorch_model.bin (sharded '
                            'checkpoints: load them with transformers and save_pretrained(safe_serialization=True, '
                            'max_shard_size="100GB") first)')
  with open(config_path) as f:
    config_dict = json.load(f)
  if config_dict.get('model_type', 'clip') != 'clip':
    raise ValueError(f'{config_path}: model_type={config_dict["model_type"]!r}; only transformers CLIPModel '
                     "('clip') directories convert here")
  return from_hf_clip(io.load(weights[0]), config_dict, scan_layers=scan_layers)
