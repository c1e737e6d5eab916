"""OpenAI / open_clip state dicts <-> clip_jax CLIP variables.

The architecture is read off the tensor shapes, as OpenAI's `build_model`
does. Two things a state dict cannot tell are arguments: the MLP activation
(OpenAI checkpoints and open_clip's `-quickgelu` models use QuickGELU, other
open_clip models GELU) and the head width (64 in every released model).
"""

import re
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np

from clip_jax import models
from clip_jax.convert import mapping as m
from clip_jax.models import layout, zoo

# Metadata entries of OpenAI's TorchScript archives, and torch BN counters.
_IGNORED = re.compile(r'^(input_resolution|context_length|vocab_size)$|num_batches_tracked$|^attn_mask$')


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict:
  """Unwraps {'state_dict': ...} and DistributedDataParallel's 'module.' prefixes."""
  if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], Mapping):
    state_dict = state_dict['state_dict']
  if state_dict and all(k.startswith('module.') for k in state_dict):
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _count(state_dict, pattern) -> int:
  regex = re.compile(pattern)
  return len({regex.match(k).group(1) for k in state_dict if regex.match(k)})


def infer_config(state_dict: Mapping[str, Any], act: str = 'quick_gelu', head_width: int = 64,
                 init_logit_bias: Optional[float] = None,
                 vision_head_width: Optional[int] = None) -> ml_collections.ConfigDict:
  sd = state_dict
  vision_head_width = vision_head_width or head_width
  required = ['text_projection', 'positional_embedding', 'token_embedding.weight', 'ln_final.weight']
  absent = [k for k in required if k not in sd]
  if absent or not ('visual.proj' in sd or 'visual.attnpool.c_proj.weight' in sd):
    raise m.StateDictError(f'not an OpenAI/open_clip CLIP state dict: missing {absent or "the visual tower"} '
                           f'(first keys: {sorted(sd)[:5]})')

  def shape(key):
    if key not in sd:
      raise m.StateDictError(f'cannot infer the architecture: state dict has no {key!r}')
    return tuple(np.shape(sd[key]))

  embed_dim = shape('text_projection')[1]
  text_width = shape('ln_final.weight')[0]
  text = zoo.text_tower(width=text_width, layers=_count(sd, r'^transformer\.resblocks\.(\d+)\.'),
                        heads=text_width // head_width,
                        mlp_dim=shape('transformer.resblocks.0.mlp.c_fc.weight')[0],
                        context_length=shape('positional_embedding')[0],
                        vocab_size=shape('token_embedding.weight')[0])
  if 'visual.proj' in sd:
    width, _, patch, _ = shape('visual.conv1.weight')
    grid = round((shape('visual.positional_embedding')[0] - 1) ** 0.5)
    vision = zoo.vit_vision(image_size=patch * grid, patch_size=patch, width=width,
                            layers=_count(sd, r'^visual\.transformer\.resblocks\.(\d+)\.'),
                            heads=width // vision_head_width,
                            mlp_dim=shape('visual.transformer.resblocks.0.mlp.c_fc.weight')[0])
  else:
    layers = tuple(_count(sd, rf'^visual\.layer{i}\.(\d+)\.') for i in range(1, 5))
    grid = round((shape('visual.attnpool.positional_embedding')[0] - 1) ** 0.5)
    width = shape('visual.conv3.weight')[0]  # the stem's last conv outputs `width` channels
    vision = zoo.resnet_vision(image_size=grid * 32, layers=layers, width=width,
                                heads=width * 32 // vision_head_width)
  if 'logit_bias' in sd and init_logit_bias is None:
    init_logit_bias = float(m.to_numpy(sd['logit_bias']))
  return zoo.clip_config(embed_dim, vision, text, act=act, init_logit_bias=init_logit_bias)


def _tower_rules(prefix: tuple, key: str, layers: int, heads: int):
  rules = []
  for i in range(layers):
    p, k = prefix + (f'resblocks_{i}',), f'{key}.resblocks.{i}'
    rules += m.layer_norm(p + ('ln_1',), k + '.ln_1')
    rules += m.packed_qkv(p + ('attn', 'qkv'), k + '.attn.in_proj_weight', k + '.attn.in_proj_bias', heads)
    rules += m.attn_out(p + ('attn', 'out'), k + '.attn.out_proj', heads)
    rules += m.layer_norm(p + ('ln_2',), k + '.ln_2')
    rules += m.dense(p + ('mlp', 'c_fc'), k + '.mlp.c_fc') + m.dense(p + ('mlp', 'c_proj'), k + '.mlp.c_proj')
  return rules


def _resnet_rules(v) -> list:
  P = ('params', 'vision')
  rules = []
  for i in (1, 2, 3):
    rules += [m.conv_weight(P + (f'conv{i}', 'kernel'), f'visual.conv{i}.weight')]
    rules += m.batch_norm(P + (f'bn{i}',), f'visual.bn{i}')
  for stage, blocks in enumerate(v.layers):
    for j in range(blocks):
      p, k = P + (f'layer{stage + 1}_{j}',), f'visual.layer{stage + 1}.{j}'
      for c in (1, 2, 3):
        rules += [m.conv_weight(p + (f'conv{c}', 'kernel'), f'{k}.conv{c}.weight')]
        rules += m.batch_norm(p + (f'bn{c}',), f'{k}.bn{c}')
      if j == 0:  # the first block of every stage changes stride or width
        rules += [m.conv_weight(p + ('downsample_conv', 'kernel'), f'{k}.downsample.0.weight')]
        rules += m.batch_norm(p + ('downsample_bn',), f'{k}.downsample.1')
  a = P + ('attnpool',)
  rules += [m.copy(a + ('positional_embedding',), 'visual.attnpool.positional_embedding')]
  rules += m.separate_qkv(a + ('attn', 'qkv'), [f'visual.attnpool.{n}_proj' for n in 'qkv'], v.heads)
  rules += m.attn_out(a + ('attn', 'out'), 'visual.attnpool.c_proj', v.heads)
  return rules


def rules(config: ml_collections.ConfigDict) -> list:
  v, t = config.vision, config.text
  V = ('params', 'vision')
  if v.kind == 'vit':
    out = [m.conv_weight(V + ('conv1', 'kernel'), 'visual.conv1.weight'),
           m.copy(V + ('class_embedding',), 'visual.class_embedding'),
           m.copy(V + ('positional_embedding',), 'visual.positional_embedding'),
           m.copy(V + ('proj',), 'visual.proj')]
    out += m.layer_norm(V + ('ln_pre',), 'visual.ln_pre') + m.layer_norm(V + ('ln_post',), 'visual.ln_post')
    out += _tower_rules(V + ('transformer',), 'visual.transformer', v.layers, v.heads)
  else:
    out = _resnet_rules(v)
  T = ('params', 'text')
  out += [m.copy(T + ('token_embedding',), 'token_embedding.weight'),
          m.copy(T + ('positional_embedding',), 'positional_embedding'),
          m.copy(T + ('text_projection',), 'text_projection')]
  out += m.layer_norm(T + ('ln_final',), 'ln_final')
  out += _tower_rules(T + ('transformer',), 'transformer', t.layers, t.heads)
  out += [m.copy(('params', 'logit_scale'), 'logit_scale')]
  if config.init_logit_bias is not None:
    out += [m.copy(('params', 'logit_bias'), 'logit_bias')]
  return out


def from_open_clip(state_dict: Mapping[str, Any], act: str = 'quick_gelu', head_width: int = 64,
                   scan_layers: bool = False, vision_head_width: Optional[int] = None):
  """(model_config, variables) from an OpenAI or open_clip CLIP state dict.

  `head_width` is the per-head width of both towers unless `vision_head_width`
  sets the image tower's apart (open_clip's vision_cfg.head_width). Accepts
  torch tensors or numpy arrays in any float dtype (fp16 checkpoints are upcast
  to the config's param dtype). `scan_layers=True` returns a config with
  model.scan_layers set and the variables in its stacked layout.
  """
  sd = _strip_prefixes(state_dict)
  config = infer_config(sd, act=act, head_width=head_width, vision_head_width=vision_head_width)
  variables = m.from_state_dict(sd, rules(config), models.abstract_variables(config), ignore=_IGNORED.search,
                                what='open_clip state dict')
  config.scan_layers = bool(scan_layers)
  return config, layout.from_loop(variables, config)


def to_open_clip(config: ml_collections.ConfigDict, variables: Mapping) -> dict[str, np.ndarray]:
  """A state dict that open_clip's matching model loads with strict=True."""
  sd = m.to_state_dict(layout.to_loop(variables, config), rules(config))
  for key in [k for k in sd if k.endswith('.running_mean')]:
    sd[key[:-len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return sd


def _mlp_ratio(width: int, mlp_dim: int, where: str) -> float:
  ratio = mlp_dim / width
  if int(width * ratio) != mlp_dim:  # open_clip builds the MLP as int(width * mlp_ratio)
    raise ValueError(f'{where}.mlp_dim={mlp_dim} is not int(width * ratio) for width {width} in float arithmetic; '
                     'open_clip cannot build this MLP')
  return ratio


def open_clip_model_cfg(config: ml_collections.ConfigDict) -> dict:
  """open_clip's `model_cfg` (embed_dim, vision_cfg, text_cfg, quick_gelu, ...) for a clip_jax CLIP config:
  what `open_clip.CLIP(**cfg)` and the 'local-dir:' / add_model_config JSON files take."""
  if config.get('name', 'clip') != 'clip':
    raise ValueError(f'model.name={config.get("name")!r}: only CLIP models have an open_clip equivalent')
  if config.act not in ('gelu', 'quick_gelu'):
    raise ValueError(f'model.act={config.act!r}: open_clip has gelu and quick_gelu only')
  v, t = config.vision, config.text
  if t.get('eot_token_id') is not None:
    raise ValueError(f'model.text.eot_token_id={t.eot_token_id}: open_clip pools at the largest token id '
                     '(argmax); only eot_token_id=None models export to open_clip')
  for name, tower in (('vision', v), ('text', t)):
    if tower.width % tower.heads:
      raise ValueError(f'model.{name}: width {tower.width} is not a multiple of heads {tower.heads}')
  if v.kind == 'vit':
    vision = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                  head_width=v.width // v.heads, mlp_ratio=_mlp_ratio(v.width, v.mlp_dim, 'model.vision'))
  else:
    vision = dict(image_size=v.image_size, layers=list(v.layers), width=v.width, head_width=v.width * 32 // v.heads)
  text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
              layers=t.layers, mlp_ratio=_mlp_ratio(t.width, t.mlp_dim, 'model.text'))
  cfg = dict(embed_dim=config.embed_dim, quick_gelu=config.act == 'quick_gelu', vision_cfg=vision, text_cfg=text)
  if config.get('init_logit_bias') is not None:
    cfg['init_logit_bias'] = float(config.init_logit_bias)
  return cfg
