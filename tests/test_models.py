"""CLIP model construction: zoo shapes, sharded forward, bf16, input validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import torch

from clip_jax import models, sharding
from clip_jax.convert import StateDictError, from_open_clip
from clip_jax.convert.open_clip import infer_config
from conftest import load_config
from parity_helpers import perturb_

ZOO_TO_OPEN_CLIP = {'RN50': 'RN50', 'RN101': 'RN101', 'RN50x4': 'RN50x4', 'RN50x16': 'RN50x16',
                    'RN50x64': 'RN50x64', 'ViT-B/32': 'ViT-B-32', 'ViT-B/16': 'ViT-B-16', 'ViT-L/14': 'ViT-L-14',
                    'ViT-L/14-336': 'ViT-L-14-336'}


@pytest.mark.parametrize('name', sorted(ZOO_TO_OPEN_CLIP))
def test_zoo_variant_matches_open_clip_architecture(name):
  """Every zoo config equals what open_clip's model of that name infers to, parameter for parameter."""
  reference = open_clip.create_model(ZOO_TO_OPEN_CLIP[name], device='meta')  # shapes only, no memory
  config = load_config('clip', name).model
  assert infer_config(reference.state_dict()).to_dict() == config.to_dict()
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models.abstract_variables(config)['params']))
  assert ours == sum(p.numel() for p in reference.parameters())


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match=r"unknown CLIP variant 'ViT-X/99'.*ViT-B/32"):
    load_config('clip', 'ViT-X/99')


def _tiny(kind='tiny'):
  config = models.zoo.get(kind)
  model = models.build(config)
  s, ctx = config.vision.image_size, config.text.context_length
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((8, s, s, 3)), jnp.float32)
  tokens = rng.integers(1, 1000, (8, ctx)).astype(np.int32)
  tokens[:, 9] = 49407
  return config, model, images, jnp.asarray(tokens)


@pytest.mark.parametrize('kind', ['tiny', 'tiny-rn'])
@pytest.mark.parametrize('mesh_shape', [(1, 8, 1), (2, 1, 4)], ids=['fsdp8', 'data2xtensor4'])
def test_sharded_forward_equals_unsharded(kind, mesh_shape):
  config, model, images, tokens = _tiny(kind)
  variables = model.init(jax.random.PRNGKey(0), images, tokens)
  want = model.apply(variables, images, tokens)

  mesh = sharding.make_mesh(*mesh_shape)
  shardings = sharding.variables_sharding(model, mesh, images, tokens)
  placed = jax.device_put(nn.unbox(variables), shardings)
  specs = {tuple(s.spec) for s in jax.tree.leaves(shardings)}
  assert any(any(a is not None for a in spec) for spec in specs), 'nothing was sharded'

  forward = jax.jit(model.apply)
  with sharding.use(mesh):
    got = forward(placed, jax.device_put(images, sharding.batch_sharding(mesh, 4)),
                  jax.device_put(tokens, sharding.batch_sharding(mesh, 2)))
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_bf16_compute_stays_close_to_fp32():
  torch.manual_seed(3)
  reference = perturb_(open_clip.CLIP(
      embed_dim=96, vision_cfg=open_clip.CLIPVisionCfg(layers=3, width=192, patch_size=8, image_size=48),
      text_cfg=open_clip.CLIPTextCfg(context_length=32, vocab_size=1000, width=128, heads=2, layers=2)))
  config, variables = from_open_clip(reference.state_dict(), act='gelu')
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((4, 48, 48, 3)), jnp.float32)
  tokens = jnp.asarray(np.r_[rng.integers(1, 998, (4, 31)).T, np.full((1, 4), 999)].T, jnp.int32)
  fp32 = models.build(config).apply(variables, images, tokens)
  config.dtype = 'bfloat16'
  bf16 = models.build(config).apply(variables, images, tokens)
  for a, b in zip(fp32[:2], bf16[:2]):
    cosine = np.sum(np.asarray(a) * np.asarray(b, np.float32), axis=-1)
    assert cosine.min() > 0.99, cosine


def test_resnet_batch_norm_train_and_eval_modes():
  config, model, images, tokens = _tiny('tiny-rn')
  variables = model.init(jax.random.PRNGKey(0), images, tokens)
  eval_out = model.apply(variables, images, method='encode_image')
  train_out, updates = model.apply(variables, images, train=True, mutable=['batch_stats'], method='encode_image')
  stats = updates['batch_stats']['vision']['bn1']
  assert not np.allclose(np.asarray(train_out), np.asarray(eval_out))
  # Running mean moved 10% of the way (torch momentum 0.1) from 0 toward the batch mean.
  assert np.abs(np.asarray(stats['mean'])).max() > 0
  with pytest.raises(Exception, match='batch_stats'):
    model.apply(variables, images, train=True, method='encode_image')  # not marked mutable


@pytest.mark.parametrize('shape,match', [
    ((2, 3, 32, 32), 'NHWC'),
    ((2, 32, 32, 1), 'NHWC'),
    ((2, 48, 48, 3), 'expects 32x32'),
])
def test_bad_images_are_named(shape, match):
  config, model, images, tokens = _tiny()
  variables = model.init(jax.random.PRNGKey(0), images, tokens)
  with pytest.raises(ValueError, match=match):
    model.apply(variables, jnp.zeros(shape), method='encode_image')


def test_bad_tokens_are_named():
  config, model, images, tokens = _tiny()
  variables = model.init(jax.random.PRNGKey(0), images, tokens)
  with pytest.raises(ValueError, match=r'outside the vocabulary \[0, 49408\) in rows \[1\]'):
    model.apply(variables, tokens.at[1, 3].set(50000), method='encode_text')
  with pytest.raises(ValueError, match='context_length 77'):
    model.apply(variables, jnp.ones((2, 80), jnp.int32), method='encode_text')
  with pytest.raises(ValueError, match='integer'):
    model.apply(variables, jnp.ones((2, 77)), method='encode_text')
  # Under jit the ids cannot be inspected: an out-of-vocabulary id becomes NaN, never a clamped row.
  out = jax.jit(lambda t: model.apply(variables, t, method='encode_text'))(tokens.at[1, 3].set(50000))
  assert np.isnan(np.asarray(out[1])).all() and np.isfinite(np.asarray(out[0])).all()


def test_state_dict_errors_list_the_keys():
  torch.manual_seed(0)
  sd = dict(open_clip.create_model('RN50', device='meta').state_dict())
  sd = {k: torch.zeros(v.shape) for k, v in sd.items()}
  broken = dict(sd)
  del broken['visual.layer1.0.conv1.weight']
  broken['visual.extra.weight'] = torch.zeros(3)
  with pytest.raises(StateDictError) as err:
    from_open_clip(broken)
  message = str(err.value)
  assert 'missing keys (1): visual.layer1.0.conv1.weight' in message
  assert 'unexpected keys (1): visual.extra.weight' in message

  misshaped = dict(sd)
  misshaped['ln_final.bias'] = torch.zeros(7)
  with pytest.raises(StateDictError, match=r'mis-shaped keys \(1\): ln_final.bias: \[\(7,\)\]'):
    from_open_clip(misshaped)
  with pytest.raises(StateDictError, match='not an OpenAI/open_clip CLIP state dict'):
    from_open_clip({'foo': torch.zeros(1)})


@pytest.mark.parametrize('field,value,match', [
    ('vision.patch_size', 7, 'image_size=32 is not divisible by model.vision.patch_size=7'),
    ('vision.heads', 3, 'width=64 is not divisible by model.vision.heads=3'),
    ('text.heads', 5, 'text.width=64 is not divisible by model.text.heads=5'),
    ('act', 'swish', "model.act='swish'"),
    ('dtype', 'float64', "model.dtype='float64'"),
    ('name', 'clap', "model.name='clap'"),
])
def test_bad_configs_are_named(field, value, match):
  config = models.zoo.get('tiny')
  node, _, leaf = field.rpartition('.')
  (config[node] if node else config)[leaf] = value
  with pytest.raises(ValueError, match=match):
    models.build(config)
