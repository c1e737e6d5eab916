"""Hugging Face transformers `GroupViTModel` state dicts <-> clip_jax GroupViT variables.

The architecture comes from the HF config dict (`GroupViTConfig.to_dict()`).
Transformer layers are named as in HF's CLIPModel (hf_clip's rules); the
grouping blocks map one Linear/LayerNorm to one Flax module, and the
projection heads' `nn.Sequential` indices 0/1/3 are fc1/bn/fc2.

`multi_label_logit_scale` (the multi-label loss's temperature) has no HF
counterpart: `from_hf_groupvit` sets it to the config's
`init_multi_label_logit_scale` (HF's logit_scale_init_value, as NVlabs
initialises both temperatures alike) and `to_hf_groupvit` leaves it out.
"""

import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from clip_jax import models
from clip_jax.convert import mapping as m
from clip_jax.convert.hf_clip import _tower_rules
from clip_jax.models import groupvit_zoo

# position_ids: a buffer older transformers saved; num_batches_tracked: unused with a fixed BN momentum.
_IGNORED = re.compile(r'position_ids$|num_batches_tracked$')


def _heads_linear(path: tuple, prefix: str, heads: int) -> list:
  """torch Linear [d, d] (+ [d]) <-> Flax kernel [d, heads, hd] (+ bias [heads, hd])."""
  return [m.Rule(path + ('kernel',), (prefix + '.weight',), lambda w: w.T.reshape(w.shape[1], heads, -1),
                 lambda k: (k.reshape(k.shape[0], -1).T,)),
          m.Rule(path + ('bias',), (prefix + '.bias',), lambda b: b.reshape(heads, -1), lambda b: (b.reshape(-1),))]


def _unbatched(path: tuple, key: str) -> m.Rule:
  """torch [1, n, d] parameter <-> Flax [n, d]."""
  return m.Rule(path, (key,), lambda w: w[0], lambda x: (x[None],))


def _grouping_rules(p: tuple, k: str, heads: int) -> list:
  out = m.layer_norm(p + ('norm_tokens',), k + '.norm_tokens') + m.layer_norm(p + ('norm_x',), k + '.norm_x')
  out += m.dense(p + ('mlp_inter', 'c_fc'), k + '.mlp_inter.fc1')
  out += m.dense(p + ('mlp_inter', 'c_proj'), k + '.mlp_inter.fc2')
  out += m.layer_norm(p + ('norm_post_tokens',), k + '.norm_post_tokens')
  a = k + '.pre_assign_attn'
  for n in 'qkv':
    out += _heads_linear(p + ('cross_attn', n), f'{a}.attn.{n}_proj', heads)
  out += m.attn_out(p + ('cross_attn', 'out'), a + '.attn.out_proj', heads)
  out += m.layer_norm(p + ('cross_ln',), a + '.norm2') + m.layer_norm(p + ('cross_ln_post',), a + '.norm_post')
  out += m.dense(p + ('cross_mlp', 'c_fc'), a + '.mlp.fc1') + m.dense(p + ('cross_mlp', 'c_proj'), a + '.mlp.fc2')
  for ours, theirs in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj'), ('proj', 'proj')):
    out += m.dense(p + ('assign', ours), f'{k}.assign.{theirs}')
  out += m.layer_norm(p + ('norm_new_x',), k + '.norm_new_x')
  out += m.dense(p + ('mlp_channels', 'c_fc'), k + '.mlp_channels.fc1')
  out += m.dense(p + ('mlp_channels', 'c_proj'), k + '.mlp_channels.fc2')
  return out


def _head_rules(name: str) -> list:
  p = ('params', name)
  return (m.dense(p + ('fc1',), name + '.0') + m.batch_norm(p + ('bn',), name + '.1')
          + m.dense(p + ('fc2',), name + '.3'))


def rules(config: ml_collections.ConfigDict) -> list:
  v, t = config.vision, config.text
  V, T = ('params', 'vision'), ('params', 'text')
  e = 'vision_model.embeddings'
  out = [m.conv_weight(V + ('conv1', 'kernel'), e + '.patch_embeddings.projection.weight'),
         m.copy(V + ('conv1', 'bias'), e + '.patch_embeddings.projection.bias'),
         _unbatched(V + ('positional_embedding',), e + '.position_embeddings')]
  out += m.layer_norm(V + ('ln_pre',), e + '.layernorm') + m.layer_norm(V + ('ln_post',), 'vision_model.layernorm')
  for i, (depth, tokens) in enumerate(zip(v.depths, v.num_group_tokens)):
    p, k = V + (f'stages_{i}',), f'vision_model.encoder.stages.{i}'
    out += _tower_rules(p + ('transformer',), k, depth, v.heads)
    if tokens:
      out += [_unbatched(p + ('group_token',), k + '.group_token')]
      out += _grouping_rules(p + ('grouping',), k + '.downsample', v.heads)
      if i and v.num_output_groups[i - 1]:
        out += m.layer_norm(p + ('projector_norm',), k + '.group_projector.0')
        out += m.dense(p + ('group_projector', 'c_fc'), k + '.group_projector.1.fc1')
        out += m.dense(p + ('group_projector', 'c_proj'), k + '.group_projector.1.fc2')
  out += [m.copy(T + ('token_embedding',), 'text_model.embeddings.token_embedding.weight'),
          m.copy(T + ('positional_embedding',), 'text_model.embeddings.position_embedding.weight')]
  out += m.layer_norm(T + ('ln_final',), 'text_model.final_layer_norm')
  out += _tower_rules(T + ('transformer',), 'text_model.encoder', t.layers, t.heads)
  out += _head_rules('visual_projection') + _head_rules('text_projection')
  return out + [m.copy(('params', 'logit_scale'), 'logit_scale')]


def _square(value, field: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f'hf_config.vision_config.{field}={value}: clip_jax GroupViT needs square images/patches')
    value = value[0]
  return int(value)


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  tc, vc = hf_config.get('text_config') or {}, hf_config.get('vision_config') or {}
  if not tc or not vc:
    raise ValueError('hf_config must be GroupViTConfig.to_dict() with text_config and vision_config')
  for name, c in (('text_config', tc), ('vision_config', vc)):
    if abs(c.get('layer_norm_eps', 1e-5) - 1e-5) > 1e-12:
      raise ValueError(f'hf_config.{name}.layer_norm_eps={c["layer_norm_eps"]}: clip_jax GroupViT uses 1e-5')
  if vc.get('num_channels', 3) != 3:
    raise ValueError(f'hf_config.vision_config.num_channels={vc["num_channels"]}: clip_jax takes RGB images')
  vocab = tc.get('vocab_size', 49408)
  eos = tc.get('eos_token_id')
  # HF pools at argmax(ids) for the legacy eos_token_id == 2, else at the first eos token.
  eot_token_id = None if eos in (None, 2, vocab - 1) else eos
  text = groupvit_zoo.groupvit_text(
      tc['hidden_size'], tc['num_hidden_layers'], tc['num_attention_heads'], tc['intermediate_size'],
      act=tc.get('hidden_act', 'quick_gelu'), context_length=tc['max_position_embeddings'], vocab_size=vocab,
      eot_token_id=eot_token_id)
  vision = groupvit_zoo.groupvit_vision(
      _square(vc['image_size'], 'image_size'), _square(vc['patch_size'], 'patch_size'), vc['hidden_size'],
      vc['num_attention_heads'], vc['depths'], vc['num_group_tokens'], vc['num_output_groups'],
      mlp_dim=vc['intermediate_size'], assign_eps=vc.get('assign_eps', 1.0),
      assign_mlp_ratio=vc.get('assign_mlp_ratio', (0.5, 4)), act=vc.get('hidden_act', 'gelu'))
  return groupvit_zoo.groupvit_config(hf_config.get('projection_dim', 256), vision, text,
                                      projection_mlp_dim=hf_config.get('projection_intermediate_dim', 4096),
                                      init_logit_scale=float(hf_config.get('logit_scale_init_value', 2.6592)))


def hf_groupvit_config(config: ml_collections.ConfigDict) -> dict:
  """The `GroupViTConfig(**d)` arguments for a clip_jax GroupViT config."""
  v, t = config.vision, config.text
  eos = t.get('eot_token_id')
  return dict(
      projection_dim=config.embed_dim, projection_intermediate_dim=config.projection_mlp_dim,
      logit_scale_init_value=config.init_logit_scale,
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                       num_hidden_layers=t.layers, num_attention_heads=t.heads,
                       max_position_embeddings=t.context_length, hidden_act=t.act, layer_norm_eps=1e-5,
                       eos_token_id=t.vocab_size - 1 if eos is None else eos, bos_token_id=t.vocab_size - 2,
                       pad_token_id=0 if t.vocab_size != 49408 else 1),
      vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                         intermediate_size=v.mlp_dim, num_hidden_layers=sum(v.depths), depths=list(v.depths),
                         num_group_tokens=list(v.num_group_tokens), num_output_groups=list(v.num_output_groups),
                         num_attention_heads=v.heads, hidden_act=v.act, layer_norm_eps=1e-5, num_channels=3,
                         assign_eps=v.assign_eps, assign_mlp_ratio=list(v.assign_mlp_ratio)))


def from_hf_groupvit(state_dict: Mapping[str, Any], hf_config: Mapping[str, Any]):
  """(model_config, variables) from a transformers GroupViTModel state dict and its config dict.

  The variables hold 'params' and 'batch_stats' (the heads' BN running statistics).
  """
  config = config_from_hf(hf_config)
  groupvit_zoo.validate(config)
  variables = m.from_state_dict(dict(state_dict), rules(config), models.abstract_variables(config),
                                ignore=_IGNORED.search, what='Hugging Face GroupViTModel state dict')
  variables['params']['multi_label_logit_scale'] = np.asarray(config.init_multi_label_logit_scale, np.float32)
  return config, variables


def to_hf_groupvit(config: ml_collections.ConfigDict, variables: Mapping) -> dict[str, np.ndarray]:
  """A state dict that GroupViTModel(GroupViTConfig(**hf_groupvit_config(config))) loads strictly
  (without multi_label_logit_scale, which HF does not have)."""
  sd = m.to_state_dict(variables, rules(config))
  for key in [k for k in sd if k.endswith('.running_mean')]:
    sd[key[:-len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return sd
