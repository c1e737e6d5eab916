"""Model construction: `build(model_config)` returns the Flax module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clip_jax.models import groupvit_zoo, lseg, vild, zoo
from clip_jax.models.clip import CLIP
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer


def _build_clip(config: ml_collections.ConfigDict) -> CLIP:
  zoo.validate(config)
  kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
            remat=config.get('remat', 'none'))
  stack = dict(scan_layers=config.get('scan_layers', False))  # the transformer towers only
  v, t = config.vision, config.text
  if v.kind == 'vit':
    vision = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                               num_heads=v.heads, mlp_dim=v.mlp_dim, output_dim=config.embed_dim, act=config.act,
                               attn_implementation=config.attn_implementation, **stack, **kw)
  else:
    vision = ModifiedResNet(image_size=v.image_size, layers=tuple(v.layers), width=v.width,
                            output_dim=config.embed_dim, num_heads=v.heads, **kw)
  text = TextTransformer(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, layers=t.layers,
                         num_heads=t.heads, mlp_dim=t.mlp_dim, output_dim=config.embed_dim, act=config.act,
                         eot_token_id=t.get('eot_token_id'), attn_implementation=config.attn_implementation,
                         **stack, **kw)
  return CLIP(vision=vision, text=text, image_size=v.image_size, init_logit_scale=config.init_logit_scale,
              init_logit_bias=config.init_logit_bias)


_BUILDERS = {'clip': _build_clip, 'groupvit': groupvit_zoo.build, 'lseg': lseg.build, 'vild': vild.build}


def build(model_config: ml_collections.ConfigDict):
  """The module for `model_config` (see clip_jax.models.zoo for the fields)."""
  name = model_config.get('name')
  if name not in _BUILDERS:
    raise ValueError(f'model.name={name!r} is not a known model; choose one of {sorted(_BUILDERS)}')
  return _BUILDERS[name](model_config)


def example_inputs(model_config: ml_collections.ConfigDict, batch: int = 1) -> tuple:
  """Abstract inputs of the shapes the model's `init` takes: (images, tokens) for the two-tower
  models, (images, class embeddings [1, embed_dim]) for LSeg, (images,) for ViLD."""
  s = model_config.vision.image_size
  images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
  if model_config.name == 'lseg':
    return images, jax.ShapeDtypeStruct((1, model_config.embed_dim), jnp.float32)
  if model_config.name == 'vild':
    return (images,)
  return images, jax.ShapeDtypeStruct((batch, model_config.text.context_length), jnp.int32)


def context_length(model_config: ml_collections.ConfigDict) -> int:
  """Token row length of the model's text tower; CLIP's 77 for a model without one (ViLD)."""
  text = model_config.get('text')
  return int(text.context_length) if text else zoo.CONTEXT_LENGTH


def abstract_variables(model_config: ml_collections.ConfigDict) -> dict:
  """Shapes and dtypes of the model's variables, without allocating them."""
  model = build(model_config)
  # Unboxed inside the trace: unboxing applies the logical sharding constraints, which under an active
  # mesh (the trainer loading a teacher) need traced values, not ShapeDtypeStructs.
  return jax.eval_shape(lambda *xs: nn.unbox(model.init(jax.random.PRNGKey(0), *xs)), *example_inputs(model_config))


__all__ = ['build', 'abstract_variables', 'example_inputs', 'zoo', 'groupvit_zoo', 'CLIP', 'VisionTransformer', 'ModifiedResNet', 'TextTransformer']
