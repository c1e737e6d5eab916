"""Every config file and variant loads, validates and builds its model and objective."""

import pytest

from clip_jax import models, tasks
from clip_jax.train import trainer
from conftest import load_config


@pytest.mark.parametrize('variant', ['', 'tiny', 'siglip'])
def test_clip_digits_variants(variant):
  config = load_config('clip_digits', variant)
  models.build(config.model)
  objective = tasks.build_objective(config)
  assert [t.name for _, t in objective.tasks] == ['contrastive']
  config.mesh.data = 8
  assert trainer.validate(config) == (8, 1, 1)
  if variant == 'siglip':
    assert config.tasks.contrastive.loss == 'sigmoid' and config.model.init_logit_bias == -10.0


def test_unknown_variant():
  with pytest.raises(ValueError, match="configs/clip_digits.py:big: unknown variant"):
    load_config('clip_digits', 'big')
