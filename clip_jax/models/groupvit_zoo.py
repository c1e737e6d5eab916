"""GroupViT model configurations, validation and construction.

A GroupViT model config is an `ml_collections.ConfigDict`:

  name                'groupvit'
  embed_dim           joint embedding width (HF projection_dim)
  projection_mlp_dim  hidden width of both projection heads (HF projection_intermediate_dim)
  init_logit_scale    log of the initial temperature's inverse
  init_multi_label_logit_scale   the same for the multi-label loss's own temperature
  dtype, param_dtype, attn_implementation   as CLIP's (see clip_jax.models.zoo)
  vision   image_size, patch_size, width, heads, mlp_dim, act ('gelu'),
           depths, num_group_tokens, num_output_groups (one entry per stage),
           assign_eps, assign_mlp_ratio (token-mixer and channel-MLP widths / width),
           gumbel (True: training samples Gumbel noise before the hard assignment, as
           NVlabs and HF; False: the noise-free argmax, a training choice only)
  text     context_length, vocab_size, width, layers, heads, mlp_dim, act ('quick_gelu'),
           eot_token_id (None: the largest id ends the text)

Stages follow Hugging Face's GroupViTVisionConfig: a stage with
num_group_tokens > 0 groups its input into num_output_groups segments; a
stage with none is a plain transformer stage (the paper's last one), whose
num_output_groups is only read by the next stage's group projector.
"""

from typing import Optional, Sequence

import jax.numpy as jnp
import ml_collections

from clip_jax.layers import activations
from clip_jax.models import zoo
from clip_jax.models.groupvit import GroupViT, GroupViTText, GroupViTVision, ProjectionHead


def groupvit_vision(image_size: int, patch_size: int, width: int, heads: int, depths: Sequence[int],
                    num_group_tokens: Sequence[int], num_output_groups: Sequence[int],
                    mlp_dim: Optional[int] = None, assign_eps: float = 1.0,
                    assign_mlp_ratio: Sequence[float] = (0.5, 4.0), act: str = 'gelu',
                    gumbel: bool = True) -> dict:
  return dict(image_size=image_size, patch_size=patch_size, width=width, heads=heads, mlp_dim=mlp_dim or 4 * width,
              act=act, depths=tuple(depths), num_group_tokens=tuple(num_group_tokens),
              num_output_groups=tuple(num_output_groups), assign_eps=float(assign_eps),
              assign_mlp_ratio=tuple(float(r) for r in assign_mlp_ratio), gumbel=bool(gumbel))


def groupvit_text(width: int, layers: int, heads: int, mlp_dim: Optional[int] = None, act: str = 'quick_gelu',
                  **kwargs) -> dict:
  """CLIP's text tower fields (zoo.text_tower's keyword arguments) plus the activation."""
  return dict(zoo.text_tower(width, layers, heads, mlp_dim, **kwargs), act=act)


def groupvit_config(embed_dim: int, vision: dict, text: dict, projection_mlp_dim: int = 4096,
                    init_logit_scale: float = 2.6592,
                    init_multi_label_logit_scale: Optional[float] = None) -> ml_collections.ConfigDict:
  # 2.6592: HF's logit_scale_init_value, log(1 / 0.07) rounded, so converted configs equal the zoo's.
  # The multi-label temperature starts where the image-text one does (NVlabs: one contrast_temperature).
  if init_multi_label_logit_scale is None:
    init_multi_label_logit_scale = init_logit_scale
  return ml_collections.ConfigDict(dict(
      name='groupvit', embed_dim=embed_dim, projection_mlp_dim=projection_mlp_dim,
      init_logit_scale=init_logit_scale, init_multi_label_logit_scale=float(init_multi_label_logit_scale),
      dtype='float32', param_dtype='float32', attn_implementation=None, vision=vision, text=text))


ZOO = {
    # NVlabs' GCC+YFCC model (HF nvidia/groupvit-gcc-yfcc): 196 patches -> 64 -> 8 segments.
    'groupvit-gcc-yfcc': lambda: groupvit_config(
        256, groupvit_vision(224, 16, 384, 6, depths=(6, 3, 3), num_group_tokens=(64, 8, 0),
                             num_output_groups=(64, 8, 8)),
        groupvit_text(256, 12, 4)),
    # Tests and CPU runs: 64 patches -> 8 -> 4 segments, seconds to compile.
    'tiny': lambda: groupvit_config(
        64, groupvit_vision(32, 4, 64, 4, depths=(1, 1, 1), num_group_tokens=(8, 4, 0), num_output_groups=(8, 4, 4)),
        groupvit_text(64, 2, 4), projection_mlp_dim=128),
}


def get(name: str) -> ml_collections.ConfigDict:
  if name not in ZOO:
    raise ValueError(f'unknown GroupViT variant {name!r}; choose one of {sorted(ZOO)}')
  return ZOO[name]()


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the fix for an inconsistent config."""
  v, t = config.vision, config.text
  if v.image_size % v.patch_size:
    raise ValueError(f'model.vision.image_size={v.image_size} is not divisible by '
                     f'model.vision.patch_size={v.patch_size}; pick a patch size that tiles the image')
  for tower, c in (('vision', v), ('text', t)):
    if c.width % c.heads:
      raise ValueError(f'model.{tower}.width={c.width} is not divisible by model.{tower}.heads={c.heads}')
    if c.act not in activations.ACTIVATIONS:
      raise ValueError(f'model.{tower}.act={c.act!r}: choose one of {sorted(activations.ACTIVATIONS)}')
  depths, tokens, groups = tuple(v.depths), tuple(v.num_group_tokens), tuple(v.num_output_groups)
  if not depths or len(tokens) != len(depths) or len(groups) != len(depths):
    raise ValueError(f'model.vision.depths={depths}, num_group_tokens={tokens} and num_output_groups={groups} '
                     'need one entry per stage (the same non-zero length)')
  if len(v.assign_mlp_ratio) != 2:
    raise ValueError(f'model.vision.assign_mlp_ratio={tuple(v.assign_mlp_ratio)}: give two ratios '
                     '(token-mixer width, channel-MLP width), e.g. (0.5, 4.0)')
  for i, (d, s, g) in enumerate(zip(depths, tokens, groups)):
    if min(d, s, g) < 0:
      raise ValueError(f'model.vision stage {i}: depths, num_group_tokens and num_output_groups must be >= 0')
    if s and not g:
      raise ValueError(f'model.vision.num_output_groups[{i}]=0 but stage {i} has {s} group tokens; '
                       'a grouping stage needs at least one output group')
    # Stage i+1's group projector mixes stage i's s group tokens, sized (as HF) by g: they must agree.
    if i + 1 < len(depths) and tokens[i + 1] and g and s != g:
      raise ValueError(f'model.vision.num_output_groups[{i}]={g} does not chain with num_group_tokens[{i}]={s}: '
                       f"stage {i + 1}'s group projector mixes stage {i}'s {s} group tokens and is sized by "
                       f'num_output_groups[{i}]; set num_output_groups[{i}]={s} (or num_group_tokens[{i + 1}]=0 '
                       'for a plain last stage)')
  for dtype_field in ('dtype', 'param_dtype'):
    if config[dtype_field] not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f"model.{dtype_field}={config[dtype_field]!r}: use 'float32' or 'bfloat16'")


def build(config: ml_collections.ConfigDict) -> GroupViT:
  """The GroupViT module for a validated `config`."""
  validate(config)
  kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
  v, t = config.vision, config.text
  attn = config.get('attn_implementation')
  vision = GroupViTVision(image_size=v.image_size, patch_size=v.patch_size, width=v.width, num_heads=v.heads,
                          mlp_dim=v.mlp_dim, depths=tuple(v.depths), num_group_tokens=tuple(v.num_group_tokens),
                          num_output_groups=tuple(v.num_output_groups), assign_mlp_ratio=tuple(v.assign_mlp_ratio),
                          assign_eps=v.assign_eps, gumbel=bool(v.get('gumbel', True)), act=v.act,
                          attn_implementation=attn, **kw)
  text = GroupViTText(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, layers=t.layers,
                      num_heads=t.heads, mlp_dim=t.mlp_dim, act=t.act, eot_token_id=t.get('eot_token_id'),
                      attn_implementation=attn, **kw)
  head = lambda: ProjectionHead(config.projection_mlp_dim, config.embed_dim, **kw)
  return GroupViT(vision=vision, text=text, visual_projection=head(), text_projection=head(),
                  image_size=v.image_size, init_logit_scale=config.init_logit_scale,
                  init_multi_label_logit_scale=config.get('init_multi_label_logit_scale', config.init_logit_scale))
