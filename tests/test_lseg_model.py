"""LSeg: align_corners resampling vs torch, decoder pieces, logits, CLIP initialisation, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_jax import models, sharding
from clip_jax.layers.norms import LayerNorm
from clip_jax.layers.resample import PatchUpsample, resize_bilinear_align_corners
from clip_jax.models import lseg
from clip_jax.models.dpt import DPTDecoder
from dense_helpers import random_variables

CLASSES = 5


@pytest.mark.parametrize('in_hw,out_hw', [((5, 7), (11, 16)), ((8, 8), (3, 5)), ((1, 4), (3, 9)), ((6, 5), (1, 1)),
                                          ((12, 12), (24, 24))])
def test_resize_matches_torch_align_corners(in_hw, out_hw):
  """Values and gradients equal torch's F.interpolate(bilinear, align_corners=True) within 1e-5."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *in_hw, 3)).astype(np.float32)
  cotangent = rng.standard_normal((2, *out_hw, 3)).astype(np.float32)
  xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_(True)
  yt = F.interpolate(xt, size=out_hw, mode='bilinear', align_corners=True).permute(0, 2, 3, 1)
  (yt * torch.tensor(cotangent)).sum().backward()

  y, vjp = jax.vjp(lambda v: resize_bilinear_align_corners(v, out_hw), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(cotangent))[0]),
                             xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def test_patch_upsample_is_torch_conv_transpose_with_kernel_equal_stride():
  """DPT's ConvTranspose2d(k=s, stride=s) with kernel[a, b, i, o] = weight[i, o, a, b]."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
  reference = torch.nn.ConvTranspose2d(6, 5, kernel_size=4, stride=4)
  with torch.no_grad():
    want = reference(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  params = {'kernel': jnp.asarray(reference.weight.detach().numpy().transpose(2, 3, 0, 1)),
            'bias': jnp.asarray(reference.bias.detach().numpy())}
  got = PatchUpsample(5, 4).apply({'params': params}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize('kind', ['depthwise', 'bottleneck'])
def test_spatial_regularizer_matches_lang_seg_blocks(kind):
  """One shared 1->1 3x3 conv per class channel, (+ the class max), ReLU except after the last block."""
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((2, 6, 7, CLASSES)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 1, 1)).astype(np.float32) * 0.5
  bias = np.float32(0.1)
  params = {'depthwise': {'kernel': jnp.asarray(kernel), 'bias': jnp.asarray([bias])}}
  got = lseg.SpatialRegularizer(kind, 3).apply({'params': params}, jnp.asarray(logits))

  weight = torch.tensor(kernel.transpose(3, 2, 0, 1))
  x = torch.tensor(logits).permute(0, 3, 1, 2)
  for i in range(3):  # lang-seg: depthwise_conv reshapes [B, C, H, W] -> [B * C, 1, H, W]
    y = F.conv2d(x.reshape(-1, 1, 6, 7), weight, torch.tensor([bias]), padding=1).view(2, CLASSES, 6, 7)
    if kind == 'bottleneck':
      y = y + x.max(dim=1, keepdim=True)[0]
    x = torch.relu(y) if i < 2 else y
  np.testing.assert_allclose(np.asarray(got), x.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def _tiny(batch: int = 2, **decoder):
  config = lseg.get('tiny')
  config.decoder.update(decoder)
  model = models.build(config)
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
  classes = jnp.asarray(rng.standard_normal((CLASSES, config.embed_dim)), jnp.float32)
  return config, model, images, classes


@pytest.fixture(scope='module')
def tiny_outputs():
  """The tiny model on a batch of 8, its logits and pixel embeddings from one single-device jit."""
  config, model, images, classes = _tiny(batch=8)
  variables = random_variables(model, images, classes)
  forward = jax.jit(lambda v: (model.apply(v, images, classes),
                               model.apply(v, images, method='pixel_embeddings')))
  logits, pixels = forward(variables)
  return dict(config=config, model=model, images=images, classes=classes, variables=variables, logits=logits,
              pixels=pixels)


def test_logits_are_the_scaled_cosine_upsampled(tiny_outputs):
  config, classes, logits, pixels = (tiny_outputs[k] for k in ('config', 'classes', 'logits', 'pixels'))
  assert logits.shape == (8, 32, 32, CLASSES) and logits.dtype == jnp.float32
  assert pixels.shape == (8, 16, 16, config.embed_dim)  # stride 2: refinenet1's output
  np.testing.assert_allclose(np.linalg.norm(np.asarray(pixels), axis=-1), 1.0, atol=1e-5)

  t = np.asarray(classes) / np.linalg.norm(np.asarray(classes), axis=-1, keepdims=True)
  coarse = (1 / 0.07) * np.einsum('bhwd,cd->bhwc', np.asarray(pixels), t)
  upsampled = F.interpolate(torch.tensor(coarse).permute(0, 3, 1, 2), size=(32, 32), mode='bilinear',
                            align_corners=True).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(logits), upsampled, atol=1e-4, rtol=1e-5)  # |logits| <= 14.3
  assert np.abs(coarse).max() > 1.0  # not a degenerate all-zero map


def test_decoder_readouts_and_batch_norm_modes():
  """'ignore' / 'add' readouts have no projection; with BN, train mode normalises by batch statistics."""
  rng = np.random.default_rng(6)
  hidden = tuple(jnp.asarray(rng.standard_normal((4, 17, 64)), jnp.float32) for _ in range(4))  # grid 4x4 + cls
  for readout in ('ignore', 'add'):
    decoder = DPTDecoder(patch_size=8, readout=readout, dims=(8, 16, 32, 64), features=32, use_bn=False)
    variables = nn.unbox(jax.eval_shape(lambda: decoder.init(jax.random.PRNGKey(0), hidden, (4, 4))))
    assert 'readout' not in variables['params']['reassemble_1'] and 'batch_stats' not in variables
  decoder = DPTDecoder(patch_size=8, dims=(8, 16, 32, 64), features=32, use_bn=True)
  variables = random_variables(decoder, hidden, (4, 4))
  eval_out, (train_out, updates) = jax.jit(lambda v: (
      decoder.apply(v, hidden, (4, 4)),
      decoder.apply(v, hidden, (4, 4), train=True, mutable=['batch_stats'])))(variables)
  assert eval_out.shape == (4, 16, 16, 32)  # stride-4 level (8x8 for a 32x32 image) x 2
  assert not np.allclose(np.asarray(train_out), np.asarray(eval_out))
  old = variables['batch_stats']['refinenet1']['res_conv_unit2']['bn1']['mean']
  new = updates['batch_stats']['refinenet1']['res_conv_unit2']['bn1']['mean']
  assert not np.allclose(np.asarray(old), np.asarray(new))


def test_init_from_clip_copies_both_towers_bitwise():
  config, model, images, classes = _tiny()
  clip_config = lseg.clip_config_of(config)
  clip_model = models.build(clip_config)
  tokens = jnp.asarray(np.r_[np.random.default_rng(4).integers(1, 1000, (3, 12)).T, [[49407] * 3]].T, jnp.int32)
  clip_variables = random_variables(clip_model, images, tokens, seed=1)
  variables = random_variables(model, images, classes, seed=2)

  loaded = lseg.init_from_clip(variables, clip_variables)
  for tower in ('vision', 'text'):
    leaves = jax.tree_util.tree_leaves_with_path(loaded['params'][tower])
    assert len(leaves) > 10
    for path, leaf in leaves:
      source = clip_variables['params'][tower]
      for key in path:
        source = source[key.key]
      assert leaf.dtype == source.dtype and np.array_equal(np.asarray(leaf), np.asarray(source)), path
  assert 'ln_post' not in loaded['params']['vision'] and 'proj' not in loaded['params']['vision']
  assert loaded['params']['decoder'] is variables['params']['decoder']  # the rest untouched
  assert jax.tree.leaves(variables['params']['vision'])[0] is not jax.tree.leaves(loaded['params']['vision'])[0]

  # The text tower is CLIP's: encode_text gives CLIP's normalised text features.
  want, got = jax.jit(lambda c, l: (clip_model.apply(c, tokens, normalize=True, method='encode_text'),
                                    model.apply(l, tokens, method='encode_text')))(clip_variables, loaded)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)

  wider = models.build(models.zoo.clip_config(64, models.zoo.vit_vision(32, 16, 64, 4, heads=4),
                                              models.zoo.text_tower(64, 2, heads=4)))
  with pytest.raises(ValueError, match=r'params/vision/conv1/kernel: shape \(8, 8, 3, 64\) in LSeg but '
                                       r'\(16, 16, 3, 64\) in CLIP'):
    lseg.init_from_clip(variables, random_variables(wider, images, tokens))
  with pytest.raises(ValueError, match='params/text is missing from the CLIP variables'):
    lseg.init_from_clip(variables, {'params': {'vision': clip_variables['params']['vision']}})


@pytest.mark.parametrize('scan_layers', [False, True])
def test_vit_hooks_are_block_outputs_before_ln_post(scan_layers):
  """hooks=(..., last) returns what ln_post normalises into return_tokens' tokens, in both layouts."""
  config = models.zoo.get('tiny')
  vit = models.build(config).vision
  images = jnp.asarray(np.random.default_rng(5).standard_normal((2, 32, 32, 3)), jnp.float32)
  params = random_variables(vit, images)['params']
  _, tokens = vit.apply({'params': params}, images, return_tokens=True)
  if scan_layers:
    config.scan_layers = True
    vit = models.build(config).vision
    blocks = [params['transformer'].pop(f'resblocks_{i}') for i in range(config.vision.layers)]
    params['transformer']['resblocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  hidden = vit.apply({'params': params}, images, hooks=(0, 1))
  assert len(hidden) == 2 and hidden[1].shape == tokens.shape
  assert not np.allclose(np.asarray(hidden[0]), np.asarray(hidden[1]))
  normed = LayerNorm().apply({'params': params['ln_post']}, hidden[1])
  np.testing.assert_allclose(np.asarray(normed), np.asarray(tokens), atol=1e-5)


def test_sharded_forward_equals_single_device(tiny_outputs):
  model, images, classes, variables = (tiny_outputs[k] for k in ('model', 'images', 'classes', 'variables'))
  mesh = sharding.make_mesh(2, 2, 2)
  shardings = sharding.variables_sharding(model, mesh, images, classes)
  assert any(any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings)), 'nothing was sharded'
  with sharding.use(mesh):
    got = jax.jit(model.apply)(jax.device_put(variables, shardings),
                               jax.device_put(images, sharding.batch_sharding(mesh, 4)), classes)
  assert got.sharding.spec[0] == sharding.BATCH_AXES
  np.testing.assert_allclose(np.asarray(got), np.asarray(tiny_outputs['logits']), atol=1e-5, rtol=0)


def test_bad_input_and_configs_are_named():
  config, model, images, classes = _tiny()
  variables = random_variables(model, images, classes)
  with pytest.raises(ValueError, match='expects 32x32'):
    model.apply(variables, jnp.zeros((2, 48, 48, 3)), classes)
  with pytest.raises(ValueError, match='NHWC'):
    model.apply(variables, jnp.zeros((2, 3, 32, 32)), classes)
  with pytest.raises(ValueError, match=r'class_embeddings must be \[num_classes, 64\]'):
    model.apply(variables, images, classes[:, :10])
  for field, value, match in [
      (('decoder', 'hooks'), (0, 1, 2, 4), r'hooks=\(0, 1, 2, 4\): give 4 block indices in \[0, 4\)'),
      (('decoder', 'readout'), 'concat', "readout='concat'"),
      (('spatial_reg', 'kind'), 'conv', "spatial_reg.kind='conv'"),
      (('logit_scale',), 0.0, 'logit_scale=0.0'),
  ]:
    bad = lseg.get('tiny')
    node = bad
    for key in field[:-1]:
      node = node[key]
    node[field[-1]] = value
    with pytest.raises(ValueError, match=match):
      models.build(bad)
  with pytest.raises(ValueError, match='power-of-two patch size'):
    models.build(lseg.lseg_config(models.zoo.clip_config(64, models.zoo.vit_vision(28, 14, 64, 4, heads=4),
                                                         models.zoo.text_tower(64, 2, heads=4))))
  with pytest.raises(ValueError, match='needs a ViT image tower'):
    lseg.lseg_config('RN50')


def test_spatial_regularization_is_wired_into_the_model():
  config = lseg.get('tiny')
  config.spatial_reg.kind = 'bottleneck'
  model = models.build(config)
  images, classes = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((7, 64), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, classes)
  assert nn.unbox(variables)['params']['regularizer']['depthwise']['kernel'].shape == (3, 3, 1, 1)
  assert jax.eval_shape(model.apply, variables, images, classes).shape == (2, 32, 32, 7)
