"""ViLD training: the detector losses, ViLD-text / ViLD-image, the frozen teacher, sharding, AP and its CLI.

Tolerances: losses within 1e-5 (relative) of references written with torch / torchvision's BoxCoder
in float64; sharded (2 x 4 mesh) training within 1e-4 of the same steps on one device; the teacher
compared bitwise; pycocotools' AP to 1e-6 of the value worked out by hand (101-point interpolation).
"""

import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from torchvision.models.detection import _utils as tv_utils

from clip_jax import checkpoint, models, sharding
from clip_jax.data import pipeline
from clip_jax.evaluate import __main__ as evaluate_cli
from clip_jax.evaluate import detection
from clip_jax.losses import detection as det_losses
from clip_jax.models import boxes as box_ops
from clip_jax.models import vild
from clip_jax.tasks import classes
from clip_jax.tasks import detection as det_tasks
from clip_jax.train import trainer
from conftest import load_config
from trainer_helpers import losses

STEPS = 3


# ------------------------------------------------------------------ losses against references


def _boxes(rng, n, size=64.0):
  xy = rng.uniform(0, size * 0.7, (n, 2))
  wh = rng.uniform(6, size * 0.3, (n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def test_rpn_losses_match_torch_reference():
  rng = np.random.default_rng(0)
  anchors = box_ops.make_anchors(6, 6, 8.0, (12.0, 20.0), (0.5, 1.0, 2.0))
  n = len(anchors)
  gt = np.stack([_boxes(rng, 3), _boxes(rng, 3)])
  gt_valid = np.array([[True, True, False], [True, False, False]])
  objectness = rng.standard_normal((2, n)).astype(np.float32)
  deltas = (rng.standard_normal((2, n, 4)) * 0.3).astype(np.float32)
  obj, box, _ = det_losses.rpn_losses(jnp.asarray(objectness), jnp.asarray(deltas), jnp.asarray(anchors),
                                      jnp.asarray(gt), jnp.asarray(gt_valid))

  coder = tv_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
  pos_terms, neg_terms, box_terms = [], [], []
  for b in range(2):
    g = torch.tensor(gt[b][gt_valid[b]], dtype=torch.float64)
    a = torch.tensor(anchors, dtype=torch.float64)
    iou = torch.stack([torch.tensor([float(_iou(x, y)) for y in g.numpy()]) for x in a.numpy()])  # [N, M]
    best, idx = iou.max(1)
    labels = torch.where(best >= 0.7, 1, torch.where(best < 0.3, 0, -1))
    for j in range(len(g)):  # every box's best anchors (ties too) are positive
      labels[iou[:, j] == iou[:, j].max()] = 1
    logits = torch.tensor(objectness[b], dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, (labels == 1).double(), reduction='none')
    pos_terms.append(bce[labels == 1])
    neg_terms.append(bce[labels == 0])
    targets = coder.encode_single(g[idx], a)
    d = torch.tensor(deltas[b], dtype=torch.float64)
    box_terms.append(torch.nn.functional.smooth_l1_loss(d[labels == 1], targets[labels == 1], beta=1 / 9,
                                                        reduction='none').sum(-1))
  pos, neg = torch.cat(pos_terms), torch.cat(neg_terms)
  np.testing.assert_allclose(float(obj), 0.5 * (pos.mean() + neg.mean()).item(), rtol=1e-5)
  np.testing.assert_allclose(float(box), torch.cat(box_terms).mean().item(), rtol=1e-5)


def _iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_roi_losses_and_distillation_match_torch_reference():
  rng = np.random.default_rng(1)
  gt = _boxes(rng, 3)[None]
  gt_valid = np.array([[True, True, True]])
  gt_cls = np.array([[2, 0, 1]])
  near = gt[0] + rng.uniform(-2, 2, (3, 4)).astype(np.float32)  # foreground RoIs
  rois = np.concatenate([near, _boxes(rng, 5), gt[0]])[None].astype(np.float32)
  roi_valid = np.ones((1, 11), bool)
  roi_valid[0, 7] = False
  classes_emb = rng.standard_normal((3, 16)).astype(np.float32)
  region = rng.standard_normal((1, 11, 16)).astype(np.float32)
  bg = rng.standard_normal(16).astype(np.float32)
  deltas = (rng.standard_normal((1, 11, 4)) * 0.5).astype(np.float32)

  roi_classes, matched = jax.vmap(det_losses.match_rois)(jnp.asarray(rois), jnp.asarray(roi_valid),
                                                          jnp.asarray(gt), jnp.asarray(gt_valid), jnp.asarray(gt_cls))
  logits = vild.vild_text_logits(jnp.asarray(region), jnp.asarray(classes_emb), jnp.asarray(bg))
  text_loss, _ = det_losses.text_classification_loss(logits, roi_classes)
  box_loss = det_losses.box_regression_loss(jnp.asarray(deltas), jnp.asarray(rois), matched, roi_classes)

  ious = np.array([[_iou(r, g) for g in gt[0]] for r in rois[0]])
  want_cls = np.where(ious.max(1) >= 0.5, 1 + gt_cls[0][ious.argmax(1)], 0)
  np.testing.assert_array_equal(np.asarray(roi_classes)[0], np.where(roi_valid[0], want_cls, -1))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  w = np.concatenate([unit(bg)[None], unit(classes_emb)])
  ref_logits = torch.tensor(unit(region[0]) @ w.T / 0.01, dtype=torch.float64)
  keep = roi_valid[0]
  want_text = torch.nn.functional.cross_entropy(ref_logits[keep], torch.tensor(want_cls[keep]))
  np.testing.assert_allclose(float(text_loss), want_text.item(), rtol=1e-5)
  fg = keep & (want_cls > 0)
  coder = tv_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
  targets = coder.encode_single(torch.tensor(gt[0][ious.argmax(1)][fg], dtype=torch.float64),
                                torch.tensor(rois[0][fg], dtype=torch.float64))
  want_box = torch.nn.functional.smooth_l1_loss(torch.tensor(deltas[0][fg], dtype=torch.float64), targets, beta=1.0,
                                                reduction='sum') / fg.sum()
  np.testing.assert_allclose(float(box_loss), want_box.item(), rtol=1e-5)

  teacher = unit(rng.standard_normal((1, 11, 16))).astype(np.float32)
  distill = det_losses.distillation_loss(jnp.asarray(unit(region)), jnp.asarray(teacher), jnp.asarray(roi_valid))
  want = torch.nn.functional.l1_loss(torch.tensor(unit(region)[0][keep]), torch.tensor(teacher[0][keep]),
                                     reduction='none').sum(-1).mean()
  np.testing.assert_allclose(float(distill), want.item(), rtol=1e-5)


def test_bad_boxes_are_clipped_or_dropped_and_counted():
  vocab = classes.from_config(ml_collections.ConfigDict(dict(classes=classes.digits_config(range(5)))))
  boxes = np.array([[[4, 4, 20, 30], [50, 50, 70, 60], [30, 10, 20, 40], [5, 5, 15, 15], [8, 8, 16, 16]]],
                   np.float32)
  labels = np.array([[1, 2, 3, 12, 7]], np.int32)  # 12 is not a class id, 7 is novel
  clipped, cls, valid, counts = det_tasks.sanitize_boxes(jnp.asarray(boxes), jnp.asarray(labels),
                                                         jnp.asarray([5]), 64, vocab.train_lookup())
  np.testing.assert_array_equal(np.asarray(clipped)[0, 1], [50, 50, 64, 60])   # clipped to the 64 px image
  np.testing.assert_array_equal(np.asarray(valid)[0], [True, True, False, False, False])
  np.testing.assert_array_equal(np.asarray(cls)[0, :2], [1, 2])
  assert {k: int(v) for k, v in counts.items()} == dict(clipped_boxes=1, dropped_boxes=1, invalid_labels=1,
                                                         held_out_boxes=1)


# ------------------------------------------------------------------ AP with pycocotools


def test_coco_ap_matches_a_hand_computed_case():
  truth = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32), np.array([0, 0, 5]))]
  # A hit at IoU 1 (0.9), a false positive (0.8), a hit at IoU 0.62 (0.7); nothing for the novel box.
  dets = [(np.array([[0, 0, 10, 10], [0, 30, 8, 40], [20, 20, 30, 26.2]], np.float32), np.array([0, 0, 0]),
           np.array([0.9, 0.8, 0.7], np.float32))]
  base = detection.coco_ap(truth, dets, [0, 1, 2, 3, 4], 10)
  # Ranked TP, FP, TP: recall 1/2, 1/2, 1; precision 1, 1/2, 2/3. Interpolated at the 101 recall points:
  # 1 up to recall 0.50 (51 points), then 2/3 (50 points). Above IoU 0.62 the third is a miss: 51 points of 1.
  ap50 = (51 + 50 * 2 / 3) / 101
  assert base['AP50'] == pytest.approx(ap50, abs=1e-6)
  assert base['AP'] == pytest.approx((3 * ap50 + 7 * 51 / 101) / 10, abs=1e-6)  # IoU .50, .55, .60 hit; .65-.95 not
  assert detection.coco_ap(truth, dets, [5, 6, 7, 8, 9], 10) == {'AP': 0.0, 'AP50': 0.0}
  assert np.isnan(detection.coco_ap(truth, dets, [7], 10)['AP'])  # no ground truth of that class
  with pytest.raises(ValueError, match=r'box \[5.0, 0.0, 1.0, 4.0\] has x2 < x1 or y2 < y1'):
    detection.coco_ap([(np.array([[5., 0, 1, 4]]), np.array([0]))], dets, [0], 10)
  with pytest.raises(ValueError, match=r'class id 10 is outside \[0, 10\)'):
    detection.coco_ap([(np.array([[0, 0, 1, 4]]), np.array([10]))], dets, [0], 10)


def test_postprocess_keeps_per_class_nms():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [30, 30, 40, 40]], np.float32)
  probs = np.array([[0.9, 0.1], [0.8, 0.7], [0.05, 0.6]], np.float32)
  b, l, s = detection.postprocess(boxes, probs, np.ones(3, bool), 0.5, 0.5, 10)
  np.testing.assert_allclose(s, [0.9, 0.7, 0.6])  # box 1 suppressed for class 0, kept for class 1
  np.testing.assert_array_equal(l, [0, 1, 1])


# ------------------------------------------------------------------ training


@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
  """A random tiny CLIP saved as a clip_jax run (variables + config): the teacher's source."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  config = ml_collections.ConfigDict(dict(model=load_config('vild', 'tiny').teacher.model))
  model = models.build(config.model)
  inputs = [jnp.zeros(x.shape, x.dtype) for x in models.example_inputs(config.model)]
  variables = jax.tree.map(np.asarray, flax.linen.unbox(jax.jit(model.init)(jax.random.PRNGKey(3), *inputs)))
  mngr = checkpoint.manager(workdir, async_save=False)
  mngr.save(1, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                       config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))
  mngr.wait_until_finished()
  mngr.close()
  return workdir, variables


def _tiny(teacher_workdir):
  config = load_config('vild', 'tiny')
  config.total_steps = STEPS
  config.checkpoint.every_steps = STEPS
  config.checkpoint['async'] = False
  config.eval.at_end = False
  config.tensorboard = False
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.teacher.model = None  # read from the teacher run's checkpoint
  config.teacher.workdir = teacher_workdir
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory, teacher_run):
  workdir = str(tmp_path_factory.mktemp('vild_tiny'))
  config = _tiny(teacher_run[0])
  trainer.train(config, workdir, progress=False)
  return dict(config=config, workdir=workdir, losses=losses(workdir))


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep='/')


def test_teacher_is_loaded_frozen_and_checkpointed_once(run, teacher_run):
  source = _flat(teacher_run[1])
  teacher_config, saved = checkpoint.load_teacher(run['workdir'])
  assert teacher_config.vision.image_size == 32  # resolved from the source run and saved with the config
  saved = _flat(saved)
  assert saved.keys() == source.keys() and all(np.array_equal(saved[k], source[k]) for k in source)  # bitwise
  _, variables = checkpoint.load(run['workdir'])
  assert 'teacher' not in variables and 'text' not in variables['params']  # the student's variables only
  s = trainer.setup(run['config'])
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(s.abstract_state.opt_state)]
  assert paths and not any('teacher' in p for p in paths)
  items = sorted(os.listdir(os.path.join(run['workdir'], 'checkpoints', str(STEPS))))
  assert 'teacher' in items and items.count('teacher') == 1


def test_sharded_training_equals_single_device(run, teacher_run):
  config = run['config']
  s = trainer.setup(config)
  with sharding.use(s.mesh, s.rules):
    state = s.init_state(jax.random.PRNGKey(config.seed))
  device = jax.devices()[0]
  state = jax.device_put(jax.device_get(state), device)
  teacher_before = jax.device_get(state.frozen['teacher'])
  step = jax.jit(trainer.make_step(s.model, s.objective, s.optimizer, s.schedule))
  data = pipeline.make_iterator(config.data, batch_size=config.batch_size, image_size=64, context_length=77,
                                seed=config.seed)
  single = []
  for _ in range(STEPS):
    state, metrics = step(state, jax.device_put(s.objective.select(next(data)), device))
    single.append(float(metrics['loss']))
  data.close()
  np.testing.assert_allclose([run['losses'][i] for i in range(1, STEPS + 1)], single, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen['teacher']), teacher_before)
  assert float(metrics['vild_image/loss']) > 0 and float(metrics['vild_text/loss']) > 0
  assert s.objective.batch_keys == ('image', 'boxes', 'labels', 'num_objects')
  assert sorted(t.name for _, t in s.objective.tasks) == ['box_regression', 'rpn', 'vild_image', 'vild_text']


def test_detect_cli_end_to_end(run, tmp_path, capsys):
  out = str(tmp_path / 'det')
  assert evaluate_cli.main(['detect', '--workdir', run['workdir'], '--baseline', run['workdir'], '--num_images', '8',
                            '--batch_size', '8', '--num_png', '2', '--draw_threshold', '0', '--out', out]) == 0
  printed = capsys.readouterr().out
  scores = json.load(open(os.path.join(out, 'scores.json')))
  rows = [k for k in scores if k != 'settings']
  assert len(rows) == 2 and scores[rows[0]]['score'] == 'ensemble'
  for key in ('base/AP', 'base/AP50', 'novel/AP', 'novel/AP50'):
    assert scores[rows[0]][key] == scores[rows[1]][key] and 0 <= scores[rows[0]][key] <= 1
  assert 'novel (no boxes in training): five, six, seven, eight, nine' in printed
  assert sorted(os.listdir(os.path.join(out, 'panels'))) == ['000.png', '001.png']


def test_config_errors_are_named(teacher_run):
  config = _tiny(teacher_run[0])
  config.teacher.workdir = ''
  config.teacher.model = None
  with pytest.raises(ValueError, match="config.teacher.model must be a CLIP model config"):
    trainer.setup(config)
  config = _tiny(teacher_run[0])
  config.tasks.vild_image.crop_scales = (0.0,)
  with pytest.raises(ValueError, match=r'crop_scales=\(0.0,\): give positive multiples'):
    trainer.setup(config)


# ------------------------------------------------------------------ feature distillation (the CLIP ViT LSeg / ViLD start from)


def test_feature_distillation_learns_the_teacher_with_its_text_tower_frozen(teacher_run):
  config = load_config('clip_digits', 'tiny')
  config.model.vision.image_size = 32
  config.model.text.context_length = 16  # the teacher's text tower, copied
  config.tasks = ml_collections.ConfigDict(dict(feature_distill=dict(weight=1.0)))
  config.teacher = ml_collections.ConfigDict(dict(model=None, workdir=teacher_run[0], open_clip='', step=None))
  config.init = ml_collections.ConfigDict(dict(workdir=teacher_run[0], open_clip='', step=None, towers=('text',)))
  config.frozen = ml_collections.ConfigDict(dict(params=('text', 'logit_scale')))
  config.total_steps, config.optim.lr = 6, 3e-3
  config.mesh.data, config.mesh.fsdp = 2, 4
  s = trainer.setup(config)
  with sharding.use(s.mesh, s.rules):
    state = s.init_state(jax.random.PRNGKey(0))
    step = trainer.jit_step(s)
    data = pipeline.make_iterator(config.data, batch_size=config.batch_size, image_size=32, context_length=16, seed=0)
    fixed = [s.objective.select(next(data)) for _ in range(1)] * 6  # one batch, six steps: the loss must fall
    data.close()
    found = []
    for batch in fixed:
      state, metrics = step(state, trainer.global_batch(s.mesh, batch))
      found.append(float(metrics['loss']))
  assert found[-1] < found[0]
  text = _flat(jax.device_get(state.frozen['params']['text']))
  source = _flat(teacher_run[1]['params']['text'])
  assert text.keys() == source.keys() and all(np.array_equal(text[k], source[k]) for k in source)
  assert 'text' not in state.params and 'logit_scale' not in state.params
