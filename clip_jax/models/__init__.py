"""Model construction: `build(model_config)` returns the Flax module."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clip_jax.models import zoo
from clip_jax.models.clip import CLIP
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer


def _build_clip(config: ml_collections.ConfigDict) -> CLIP:
  zoo.validate(config)
  kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
  v, t = config.vision, config.text
  if v.kind == 'vit':
    vision = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                               num_heads=v.heads, mlp_dim=v.mlp_dim, output_dim=config.embed_dim, act=config.act,
                               attn_implementation=config.attn_implementation, **kw)
  else:
    vision = ModifiedResNet(image_size=v.image_size, layers=tuple(v.layers), width=v.width,
                            output_dim=config.embed_dim, num_heads=v.heads, **kw)
  text = TextTransformer(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, layers=t.layers,
                         num_heads=t.heads, mlp_dim=t.mlp_dim, output_dim=config.embed_dim, act=config.act,
                         eot_token_id=t.get('eot_token_id'), attn_implementation=config.attn_implementation, **kw)
  return CLIP(vision=vision, text=text, image_size=v.image_size, init_logit_scale=config.init_logit_scale,
              init_logit_bias=config.init_logit_bias)


_BUILDERS = {'clip': _build_clip}


def build(model_config: ml_collections.ConfigDict):
  """The module for `model_config` (see clip_jax.models.zoo for the fields)."""
  name = model_config.get('name')
  if name not in _BUILDERS:
    raise ValueError(f'model.name={name!r} is not a known model; choose one of {sorted(_BUILDERS)}')
  return _BUILDERS[name](model_config)


def example_inputs(model_config: ml_collections.ConfigDict, batch: int = 1) -> tuple:
  """Abstract (images, tokens) of the shapes the model takes: for init and shape inference."""
  s = model_config.vision.image_size
  return (jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch, model_config.text.context_length), jnp.int32))


def abstract_variables(model_config: ml_collections.ConfigDict) -> dict:
  """Shapes and dtypes of the model's variables, without allocating them."""
  model = build(model_config)
  return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_inputs(model_config)))


__all__ = ['build', 'abstract_variables', 'example_inputs', 'zoo', 'CLIP', 'VisionTransformer', 'ModifiedResNet', 'TextTransformer']
