"""The optimizer recipe: which parameters decay, the schedule, validation."""

import jax
import numpy as np
import pytest

from clip_jax import models
from clip_jax.data import digits
from clip_jax.evaluate import digits as digits_eval
from clip_jax.train import optim


def test_weight_decay_skips_biases_norms_embeddings_and_temperature():
  params = models.abstract_variables(models.zoo.get('tiny-rn'))['params']
  mask = optim.decay_mask(params)
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat['vision/conv1/kernel'] and flat['vision/layer1_0/conv2/kernel']
  assert flat['text/transformer/resblocks_0/mlp/c_fc/kernel'] and flat['text/text_projection']
  assert flat['vision/attnpool/attn/qkv/kernel']
  for name in ('logit_scale', 'text/token_embedding', 'text/positional_embedding',
               'vision/attnpool/positional_embedding', 'text/ln_final/scale', 'text/ln_final/bias',
               'vision/bn1/scale', 'text/transformer/resblocks_0/mlp/c_fc/bias',
               'vision/attnpool/attn/qkv/bias'):
    assert not flat[name], name


def test_schedule_warms_up_then_decays_to_the_floor():
  config = optim.default_config()
  config.lr, config.warmup_steps, config.final_lr_fraction = 1e-3, 10, 0.1
  schedule = optim.schedule(config, 100)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(100)], [0, 5e-4, 1e-3, 1e-4],
                             rtol=1e-6, atol=1e-12)
  config.warmup_steps = 100
  with pytest.raises(ValueError, match='warmup_steps=100 must be below total_steps=100'):
    optim.schedule(config, 100)


def test_digits_templates_are_the_training_caption_grammar():
  for template, color in zip(digits_eval.TEMPLATES, digits.COLOR_NAMES):
    for d, word in enumerate(digits.DIGIT_NAMES):
      assert template.format(word) == digits.caption_for([(color, d)])
