"""Model configurations: the OpenAI CLIP zoo, tiny test models, and validation.

A model config is an `ml_collections.ConfigDict`:

  name            'clip'
  embed_dim       joint image-text embedding width
  act             MLP activation of both transformers: 'quick_gelu' (OpenAI) or 'gelu' (open_clip)
  init_logit_scale, init_logit_bias (None, or SigLIP's -10)
  dtype, param_dtype  compute and parameter dtypes ('float32', 'bfloat16', 'float16'). Mixed
                  precision is dtype='bfloat16' with param_dtype='float32': parameters and
                  optimizer state stay float32 and are cast to bfloat16 where used, so the
                  matmuls and convolutions run in bfloat16; LayerNorm statistics, attention
                  softmax, the normalised features and the losses stay float32.
  remat           rematerialisation of each residual block (ViT and text towers) and each
                  ModifiedResNet bottleneck, trading backward-pass compute for activation
                  memory: 'none' (default), 'full' (keep only block inputs), 'dots' (keep
                  matmul outputs), 'dots_no_batch' (keep the weight matmuls, recompute
                  attention's batched products); see clip_jax.layers.remat
  scan_layers     False (default): transformer blocks in a Python loop (resblocks_{i}); True:
                  one nn.scan over the blocks, parameters stacked on a leading 'layers' axis
                  (resblocks), so compile time does not grow with depth. Applies to the
                  transformer towers only (a ModifiedResNet's stages differ in shape).
                  clip_jax.models.layout converts variables between the two layouts.
                  On XLA:CPU, scan_layers=True with remat='dots' is also the fastest
                  ViT-B/32 step (1.75x the loop's: README, Benchmarks)
  attn_implementation None (let JAX choose), 'xla' or 'cudnn'
  vision          kind='vit':    image_size, patch_size, width, layers, heads, mlp_dim
                  kind='resnet': image_size, layers (4 ints), width, heads
  text            context_length, vocab_size, width, layers, heads, mlp_dim,
                  eot_token_id (None: the largest id ends the text, as CLIP's BPE)
"""

import math
from typing import Optional, Sequence

import ml_collections

from clip_jax.layers import remat as remat_lib

VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77


def vit_vision(image_size: int, patch_size: int, width: int, layers: int, heads: Optional[int] = None,
               mlp_dim: Optional[int] = None) -> dict:
  return dict(kind='vit', image_size=image_size, patch_size=patch_size, width=width, layers=layers,
              heads=heads or width // 64, mlp_dim=mlp_dim or 4 * width)


def resnet_vision(image_size: int, layers: Sequence[int], width: int, heads: Optional[int] = None) -> dict:
  return dict(kind='resnet', image_size=image_size, layers=tuple(layers), width=width,
              heads=heads or width * 32 // 64)


def text_tower(width: int, layers: int, heads: Optional[int] = None, mlp_dim: Optional[int] = None,
               context_length: int = CONTEXT_LENGTH, vocab_size: int = VOCAB_SIZE,
               eot_token_id: Optional[int] = None) -> dict:
  return dict(context_length=context_length, vocab_size=vocab_size, width=width, layers=layers,
              heads=heads or width // 64, mlp_dim=mlp_dim or 4 * width, eot_token_id=eot_token_id)


def clip_config(embed_dim: int, vision: dict, text: dict, act: str = 'quick_gelu',
                init_logit_bias: Optional[float] = None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='clip', embed_dim=embed_dim, act=act, init_logit_scale=math.log(1 / 0.07),
      init_logit_bias=init_logit_bias, dtype='float32', param_dtype='float32', attn_implementation=None,
      remat='none', scan_layers=False, vision=vision, text=text))


def _openai(embed_dim, vision, text_width, text_heads):
  return lambda: clip_config(embed_dim, vision, text_tower(text_width, 12, text_heads))


ZOO = {
    'RN50': _openai(1024, resnet_vision(224, (3, 4, 6, 3), 64), 512, 8),
    'RN101': _openai(512, resnet_vision(224, (3, 4, 23, 3), 64), 512, 8),
    'RN50x4': _openai(640, resnet_vision(288, (4, 6, 10, 6), 80), 640, 10),
    'RN50x16': _openai(768, resnet_vision(384, (6, 8, 18, 8), 96), 768, 12),
    'RN50x64': _openai(1024, resnet_vision(448, (3, 15, 36, 10), 128), 1024, 16),
    'ViT-B/32': _openai(512, vit_vision(224, 32, 768, 12), 512, 8),
    'ViT-B/16': _openai(512, vit_vision(224, 16, 768, 12), 512, 8),
    'ViT-L/14': _openai(768, vit_vision(224, 14, 1024, 24), 768, 12),
    'ViT-L/14-336': _openai(768, vit_vision(336, 14, 1024, 24), 768, 12),
    # Tiny models for tests and CPU runs: same code paths, seconds to compile.
    'tiny': lambda: clip_config(64, vit_vision(32, 8, 64, 2, heads=4), text_tower(64, 2, heads=4)),
    'tiny-rn': lambda: clip_config(64, resnet_vision(64, (1, 1, 1, 1), 16, heads=4), text_tower(64, 2, heads=4)),
    # The digits CLIP with a ViT image tower (configs/clip_digits.py:vit), which LSeg and ViLD start from.
    'digits-ViT': lambda: clip_config(128, vit_vision(64, 8, 128, 4, heads=4),
                                      text_tower(128, 2, heads=4, context_length=24)),
}


def _canonical(name: str) -> str:
  return name.replace('/', '-').lower()


def get(name: str) -> ml_collections.ConfigDict:
  """The named zoo config; accepts open_clip spellings too ('ViT-B-32')."""
  table = {_canonical(k): k for k in ZOO}
  key = table.get(_canonical(name))
  if key is None:
    raise ValueError(f'unknown CLIP variant {name!r}; choose one of {sorted(ZOO)}')
  return ZOO[key]()


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the fix for an inconsistent config."""
  v, t = config.vision, config.text
  if v.kind not in ('vit', 'resnet'):
    raise ValueError(f"model.vision.kind={v.kind!r}: use 'vit' or 'resnet'")
  if config.act not in ('quick_gelu', 'gelu', 'gelu_tanh', 'relu'):
    raise ValueError(f"model.act={config.act!r}: use 'quick_gelu' (OpenAI) or 'gelu' (open_clip)")
  if v.kind == 'vit':
    if v.image_size % v.patch_size:
      raise ValueError(f'model.vision.image_size={v.image_size} is not divisible by '
                       f'model.vision.patch_size={v.patch_size}')
    if v.width % v.heads:
      raise ValueError(f'model.vision.width={v.width} is not divisible by model.vision.heads={v.heads}')
  else:
    if len(v.layers) != 4:
      raise ValueError(f'model.vision.layers={v.layers}: a ModifiedResNet has 4 stages')
    if v.image_size % 32:
      raise ValueError(f'model.vision.image_size={v.image_size}: a ModifiedResNet needs a multiple of 32')
    if (v.width * 32) % v.heads:
      raise ValueError(f'model.vision.heads={v.heads} does not divide the pooled width {v.width * 32}')
  if t.width % t.heads:
    raise ValueError(f'model.text.width={t.width} is not divisible by model.text.heads={t.heads}')
  for dtype_field in ('dtype', 'param_dtype'):
    if config[dtype_field] not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f"model.{dtype_field}={config[dtype_field]!r}: use 'float32' or 'bfloat16'")
  # .get: configs saved before these fields existed keep today's behaviour.
  remat_lib.check(config.get('remat', 'none'))
  scan_layers = config.get('scan_layers', False)
  if not isinstance(scan_layers, bool):
    raise ValueError(f'model.scan_layers={scan_layers!r}: use True (nn.scan over the transformer blocks) or False')
