"""CLIP architectures: every OpenAI zoo variant and a tiny one.

  --config configs/clip.py:ViT-B/32     (or RN50, RN101, RN50x4, RN50x16, RN50x64,
                                          ViT-B/16, ViT-L/14, ViT-L/14-336, tiny, tiny-rn)

The argument picks `config.model` from clip_jax.models.zoo (open_clip's
spelling, 'ViT-B-32', works too). These are the architectures only; a
pretrained checkpoint converts with clip_jax.convert.from_open_clip, which
infers the same config from the weights. Converted OpenAI ViT-L/14@336
reaches 76.2% ImageNet zero-shot top-1 (the paper's figure).
"""

import ml_collections

from clip_jax.models import zoo


def get_config(arg: str = 'ViT-B/32') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = zoo.get(arg or 'ViT-B/32')
  return config
