"""ViLD's detector pieces: box utilities vs torchvision, forward outputs, text logits, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from clip_jax import models, sharding
from clip_jax.models import boxes as box_ops
from clip_jax.models import vild
from dense_helpers import random_variables


def _random_boxes(rng, n, size=64.0, min_wh=1.0):
  xy = rng.uniform(0, size * 0.8, (n, 2))
  wh = rng.uniform(min_wh, size * 0.5, (n, 2))
  return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


@pytest.mark.parametrize('weights', [box_ops.RPN_WEIGHTS, box_ops.HEAD_WEIGHTS])
def test_encode_decode_match_torchvision_and_round_trip(weights):
  rng = np.random.default_rng(0)
  anchors, targets = _random_boxes(rng, 50), _random_boxes(rng, 50)
  coder = BoxCoder(weights)
  want = coder.encode_single(torch.tensor(targets), torch.tensor(anchors)).numpy()
  deltas = box_ops.encode_boxes(jnp.asarray(targets), jnp.asarray(anchors), weights)
  np.testing.assert_allclose(np.asarray(deltas), want, atol=1e-5, rtol=1e-5)

  decoded = box_ops.decode_boxes(deltas, jnp.asarray(anchors), weights)
  np.testing.assert_allclose(np.asarray(decoded), targets, atol=1e-4, rtol=0)  # pixels up to 96
  noisy = jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)
  want = coder.decode_single(torch.tensor(np.asarray(noisy)), torch.tensor(anchors)).numpy()
  np.testing.assert_allclose(np.asarray(box_ops.decode_boxes(noisy, jnp.asarray(anchors), weights)), want,
                             atol=1e-4, rtol=1e-5)
  huge = box_ops.decode_boxes(jnp.full((1, 4), 100.0), jnp.asarray(anchors[:1]), weights)
  assert np.isfinite(np.asarray(huge)).all()  # dw, dh clamped at log(1000 / 16)


def test_iou_and_nms_match_torchvision():
  rng = np.random.default_rng(1)
  a, b = _random_boxes(rng, 30), _random_boxes(rng, 20)
  want = torchvision.ops.box_iou(torch.tensor(a), torch.tensor(b)).numpy()
  np.testing.assert_allclose(np.asarray(box_ops.box_iou(jnp.asarray(a), jnp.asarray(b))), want, atol=1e-6)

  nms = jax.jit(box_ops.nms, static_argnames=('iou_threshold', 'max_outputs'))
  for threshold in (0.3, 0.5, 0.7):
    boxes = _random_boxes(rng, 60, min_wh=8.0)
    scores = rng.permutation(60).astype(np.float32) / 60  # distinct: the order is unambiguous
    keep = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), threshold).numpy()
    idx, valid = nms(jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=threshold, max_outputs=80)
    idx, valid = np.asarray(idx), np.asarray(valid)
    assert valid.sum() == len(keep) and not valid[len(keep):].any()
    np.testing.assert_array_equal(idx[:len(keep)], keep)
  # -inf scores (filtered candidates) are never kept; fewer slots than survivors truncate.
  scores[:30] = -np.inf
  idx, valid = nms(jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=0.7, max_outputs=5)
  assert np.asarray(valid).all() and (np.asarray(idx) >= 30).all()


def test_anchors_are_centred_on_cells():
  anchors = box_ops.make_anchors(2, 3, 8.0, sizes=(8.0,), aspect_ratios=(0.25, 1.0))
  assert anchors.shape == (2 * 3 * 2, 4)
  np.testing.assert_allclose(anchors[0], [4 - 8, 4 - 2, 4 + 8, 4 + 2])  # ratio h/w = 1/4, area 64
  np.testing.assert_allclose(anchors[1], [0, 0, 8, 8])
  np.testing.assert_allclose(anchors[-1], [16, 8, 24, 16])  # row 1, column 2


def test_text_logits_and_ensemble_scores():
  rng = np.random.default_rng(2)
  region, text, bg = rng.standard_normal((2, 3, 8)), rng.standard_normal((5, 8)), rng.standard_normal(8)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = vild.vild_text_logits(jnp.asarray(region), jnp.asarray(text), jnp.asarray(bg))
  want = np.concatenate([unit(region) @ unit(bg)[:, None], unit(region) @ unit(text).T], axis=-1) / 0.01
  assert logits.shape == (2, 3, 6)
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-4)

  image_logits = rng.standard_normal((2, 3, 6)) * 10
  is_base = np.array([True, True, False, True, False])
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1,
                                                                                                        keepdims=True)
  p_t, p_i = softmax(want)[..., 1:], softmax(image_logits)[..., 1:]
  expected = np.where(is_base, p_t ** (2 / 3) * p_i ** (1 / 3), p_t ** (1 / 3) * p_i ** (2 / 3))
  got = vild.vild_ensemble_scores(logits, jnp.asarray(image_logits, jnp.float32), is_base)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-7)


def _tiny(batch=2, **head):
  config = vild.get('tiny')
  config.head.update(head)
  model = models.build(config)
  images = jnp.asarray(np.random.default_rng(3).standard_normal((batch, 64, 64, 3)), jnp.float32)
  return config, model, images


@pytest.fixture(scope='module')
def tiny_outputs():
  config, model, images = _tiny(batch=8, image_head=True)
  extra = jnp.asarray(np.stack([_random_boxes(np.random.default_rng(i), 3) for i in range(8)]))
  variables = random_variables(model, images, extra)
  outputs = jax.jit(model.apply)(variables, images, extra)
  return dict(config=config, model=model, images=images, extra=extra, variables=variables, outputs=outputs)


def test_forward_shapes_and_unit_embeddings(tiny_outputs):
  config, model, out, extra = (tiny_outputs[k] for k in ('config', 'model', 'outputs', 'extra'))
  n = 8 * 8 * 6  # 8x8 cells at stride 8, 2 sizes x 3 ratios
  p, r, d = config.rpn.post_nms_topk, config.rpn.post_nms_topk + 3, config.embed_dim
  shapes = dict(objectness=(8, n), rpn_deltas=(8, n, 4), proposals=(8, p, 4), proposal_scores=(8, p),
                proposal_valid=(8, p), rois=(8, r, 4), roi_valid=(8, r), region_embeddings=(8, r, d),
                image_embeddings=(8, r, d), box_deltas=(8, r, 4), boxes=(8, r, 4), background_embedding=(d,))
  assert {k: tuple(v.shape) for k, v in out.items()} == shapes
  for key in ('region_embeddings', 'image_embeddings'):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out[key]), axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out['background_embedding'])), 1.0, atol=1e-6)
  assert not np.allclose(np.asarray(out['region_embeddings']), np.asarray(out['image_embeddings']))

  # Proposals: valid ones inside the image, best first; the extra rois follow them unchanged.
  props, valid, scores = (np.asarray(out[k]) for k in ('proposals', 'proposal_valid', 'proposal_scores'))
  assert valid.sum() > 8 and (props >= 0).all() and (props <= 64).all()
  assert (np.diff(np.where(valid, scores, -1e9), axis=1) <= 0).all()
  np.testing.assert_array_equal(np.asarray(out['rois'][:, p:]), np.asarray(extra))
  assert np.asarray(out['roi_valid'][:, p:]).all()
  refined = box_ops.clip_boxes(box_ops.decode_boxes(out['box_deltas'], out['rois'], box_ops.HEAD_WEIGHTS), 64, 64)
  np.testing.assert_allclose(np.asarray(out['boxes']), np.asarray(refined), atol=1e-5)
  np.testing.assert_array_equal(model.anchors().shape, (n, 4))


def test_region_loss_trains_backbone_not_rpn():
  """Proposals and RoIAlign boxes carry no gradient: the box head's loss never reaches the RPN layers."""
  _, model, images = _tiny()
  variables = random_variables(model, images)
  loss = lambda params: jnp.sum(model.apply({'params': params}, images)['region_embeddings'][..., 0])
  grads = jax.jit(jax.grad(loss))(variables['params'])
  for name in ('rpn_conv', 'rpn_logits', 'rpn_bbox'):
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[name])), name
  assert np.abs(np.asarray(grads['vision']['conv1']['kernel'])).max() > 0
  assert np.abs(np.asarray(grads['neck_conv']['kernel'])).max() > 0


def test_sharded_forward_equals_single_device(tiny_outputs):
  model, images, extra, variables = (tiny_outputs[k] for k in ('model', 'images', 'extra', 'variables'))
  mesh = sharding.make_mesh(2, 2, 2)
  shardings = sharding.variables_sharding(model, mesh, images, extra)
  assert any(any(a is not None for a in s.spec) for s in jax.tree.leaves(shardings)), 'nothing was sharded'
  with sharding.use(mesh):
    got = jax.jit(model.apply)(jax.device_put(variables, shardings),
                               jax.device_put(images, sharding.batch_sharding(mesh, 4)),
                               jax.device_put(extra, sharding.batch_sharding(mesh, 3)))
  want = tiny_outputs['outputs']
  for key in want:
    if want[key].dtype == jnp.bool_:
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    else:  # 1e-5, and for box coordinates (pixels up to 64, float32 ulp 4e-6) also 1e-6 relative
      rtol = 1e-6 if key in ('proposals', 'rois', 'boxes') else 0
      np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=1e-5, rtol=rtol, err_msg=key)


def test_init_from_clip_copies_the_backbone():
  config, model, images = _tiny()
  clip_config = models.zoo.clip_config(64, config.vision.to_dict(), models.zoo.text_tower(64, 2, heads=4))
  clip_model = models.build(clip_config)
  clip_variables = random_variables(clip_model, images, jnp.ones((2, 77), jnp.int32), seed=1)
  variables = random_variables(model, images)
  loaded = vild.init_from_clip(variables, clip_variables)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  copied = jax.tree_util.tree_leaves_with_path(loaded['params']['vision'])
  assert len(copied) > 10 and 'ln_post' not in loaded['params']['vision']
  for path, leaf in copied:
    ref = clip_variables['params']['vision']
    for key in path:
      ref = ref[key.key]
    assert np.array_equal(np.asarray(leaf), np.asarray(ref)), path


def test_bad_input_and_configs_are_named():
  _, model, images = _tiny()
  variables = random_variables(model, images)
  with pytest.raises(ValueError, match=r'images must be float NHWC \[batch, 64, 64, 3\]'):
    model.apply(variables, jnp.zeros((2, 32, 32, 3)))
  with pytest.raises(ValueError, match=r'extra_rois must be \[batch=2, num_rois, 4\]'):
    model.apply(variables, images, jnp.zeros((2, 5)))
  for section, field, value, match in [
      ('rpn', 'post_nms_topk', 100, r'post_nms_topk \(100\) <= pre_nms_topk \(64\)'),
      ('rpn', 'nms_threshold', 0.0, 'nms_threshold=0.0'),
      ('rpn', 'aspect_ratios', (1.0, -2.0), 'aspect_ratios'),
      ('head', 'sampling_ratio', -1, 'adaptive -1 of torchvision cannot be jitted'),
      ('neck', 'upsample', 3, 'upsample=3 a power of two'),
  ]:
    config = vild.get('tiny')
    config[section][field] = value
    with pytest.raises(ValueError, match=match):
      models.build(config)
  with pytest.raises(ValueError, match="kind='vit'"):
    models.build(vild.vild_config('RN50'))


def test_neck_upsampling_doubles_the_anchor_grid():
  config = vild.get('tiny')
  config.neck.upsample = 2
  model = models.build(config)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  out = jax.eval_shape(model.apply, variables, images)
  assert out['objectness'].shape == (2, 16 * 16 * 6) and model.stride == 4.0
  assert model.anchors().shape == (16 * 16 * 6, 4)
