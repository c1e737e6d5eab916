"""LSeg training: the pixel loss, the frozen text tower, CLIP initialisation, sharding, mIoU and its CLI.

Tolerances: the pixel cross-entropy and its gradient within 1e-6 / 1e-6 of torch's
`cross_entropy(ignore_index=...)` in float64; sharded (2 x 4 mesh) training within 1e-4 of the same
steps on one device; frozen and initialised parameters compared bitwise; mIoU to 1e-12 of IoU
recomputed pixel by pixel from the written PNG masks.
"""

import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from clip_jax import checkpoint, models, sharding
from clip_jax.convert import open_clip as convert_open_clip
from clip_jax.data import pipeline
from clip_jax.evaluate import __main__ as evaluate_cli
from clip_jax.evaluate import lseg as lseg_eval
from clip_jax.losses import dense
from clip_jax.models import lseg
from clip_jax.tasks import classes, segmentation
from clip_jax.train import frozen, trainer
from conftest import load_config
from trainer_helpers import losses

STEPS = 3


# ------------------------------------------------------------------ the loss


def test_pixel_cross_entropy_matches_torch():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 6, 4)).astype(np.float32) * 3
  labels = rng.integers(0, 4, (2, 5, 6)).astype(np.int32)
  labels[0, :2] = classes.HELD_OUT
  labels[1, 3, :4] = classes.INVALID
  (got, count), grad = jax.value_and_grad(lambda x: dense.pixel_cross_entropy(x, jnp.asarray(labels)),
                                          has_aux=True)(jnp.asarray(logits))
  t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  target = torch.tensor(np.where(labels < 0, -100, labels), dtype=torch.long)
  want = torch.nn.functional.cross_entropy(t.permute(0, 3, 1, 2), target, ignore_index=-100)
  want.backward()
  np.testing.assert_allclose(float(got), want.item(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), t.grad.numpy(), atol=1e-6)
  assert int(count) == (labels >= 0).sum()
  with pytest.raises(ValueError, match='must agree except for the class axis'):
    dense.pixel_cross_entropy(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 5), jnp.int32))


def _vocab():
  c = ml_collections.ConfigDict(dict(classes=classes.digits_config(range(8), background='black background')))
  return classes.from_config(c)


def test_pixel_task_ignores_unseen_and_counts_invalid_ids():
  vocab = _vocab()
  task = segmentation.PixelCETask(lookup=tuple(vocab.train_lookup().tolist()))
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
  mask = rng.integers(0, 11, (2, 8, 8)).astype(np.uint8)  # 0 background, 1-7 digits 0-6, 8-10 digits 7-9
  mask[0, 0, :3] = 200  # not a class id
  loss, metrics = task.loss({'logits': jnp.asarray(logits)}, {'mask': jnp.asarray(mask)})
  seen = mask <= 7
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, np.minimum(mask, 7)[..., None].astype(np.int64), -1)[..., 0][seen].mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert int(metrics['invalid_pixels']) == 3
  np.testing.assert_allclose(float(metrics['held_out_fraction']), ((mask >= 8) & (mask <= 10)).mean())
  with pytest.raises(ValueError, match=r'masks are \(8, 9\) but the images are \(8, 8\); the mask must have the '
                                       r"image's size"):
    task.loss({'logits': jnp.asarray(logits)}, {'mask': jnp.zeros((2, 8, 9), jnp.uint8)})


def test_vocabulary_errors_are_named():
  bad = lambda **kw: ml_collections.ConfigDict(dict(classes=dict(classes.digits_config((), background='black background').to_dict(), **kw)))
  with pytest.raises(ValueError, match=r'train_ids=\(3, 11\): give distinct label ids in \[0, 11\)'):
    classes.from_config(bad(train_ids=(3, 11)))
  with pytest.raises(ValueError, match=r"template='a photo' must contain exactly one"):
    classes.from_config(bad(template='a photo'))
  with pytest.raises(ValueError, match='config.classes.names is empty'):
    classes.from_config(ml_collections.ConfigDict())
  assert _vocab().held_out_ids == (8, 9, 10)


# ------------------------------------------------------------------ frozen subtrees


def test_split_merge_round_trip_and_bad_paths():
  params = {'text': {'a': 1, 'b': {'c': 2}}, 'vision': {'d': 3, 'e': 4}, 'head': 5}
  trainable, fixed = frozen.split(params, (('text',), ('vision', 'd')))
  assert trainable == {'vision': {'e': 4}, 'head': 5} and fixed == {'text': {'a': 1, 'b': {'c': 2}}, 'vision': {'d': 3}}
  assert frozen.merge(trainable, fixed) == params
  assert frozen.unmerge(params, trainable, fixed) == (trainable, fixed)
  assert params['vision'] == {'d': 3, 'e': 4}  # split copies, never mutates
  with pytest.raises(ValueError, match=r"names 'vision/x', which is not in the model's parameters \(vision has "
                                       r"\['d', 'e'\]\)"):
    frozen.split(params, (('vision', 'x'),))
  c = ml_collections.ConfigDict(dict(frozen=dict(params=('text', 'text/b'))))
  with pytest.raises(ValueError, match="'text' and 'text/b' overlap"):
    frozen.paths_of(c)


# ------------------------------------------------------------------ training


def _tiny(**overrides):
  config = load_config('lseg', 'tiny')
  config.model.vision.image_size = 32  # grid 4: the smallest DPT pyramid, the fastest compile
  config.total_steps = STEPS
  config.checkpoint.every_steps = STEPS
  config.checkpoint['async'] = False
  config.eval.at_end = False
  config.tensorboard = False
  config.mesh.data, config.mesh.fsdp = 2, 4
  for key, value in overrides.items():
    node = config
    for part in key.split('.')[:-1]:
      node = node[part]
    node[key.split('.')[-1]] = value
  return config


@pytest.fixture(scope='module')
def clip_source(tmp_path_factory):
  """A random CLIP with the tiny LSeg's towers, written as an open_clip state dict (torch .pt)."""
  config = lseg.clip_config_of(_tiny().model)
  model = models.build(config)
  inputs = [jnp.zeros(x.shape, x.dtype) for x in models.example_inputs(config)]
  variables = jax.tree.map(np.asarray, flax.linen.unbox(jax.jit(model.init)(jax.random.PRNGKey(7), *inputs)))
  path = str(tmp_path_factory.mktemp('clip') / 'tiny.pt')
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in convert_open_clip.to_open_clip(config, variables).items()},
             path)
  return path, variables


@pytest.fixture(scope='module')
def run(tmp_path_factory, clip_source):
  workdir = str(tmp_path_factory.mktemp('lseg_tiny'))
  config = _tiny(**{'init.open_clip': clip_source[0]})
  trainer.train(config, workdir, progress=False)
  return dict(config=config, workdir=workdir, losses=losses(workdir))


@pytest.fixture(scope='module')
def start(run):
  """The run's setup and its step-0 state (host arrays): compiled once for the tests below."""
  s = trainer.setup(run['config'])
  with sharding.use(s.mesh, s.rules):
    state = jax.device_get(s.init_state(jax.random.PRNGKey(run['config'].seed)))
  return s, state


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep='/')


def test_towers_start_from_clip_and_text_stays_bitwise_frozen(run, start, clip_source):
  start = start[1]
  clip = _flat(clip_source[1]['params'])
  text = _flat(start.frozen['params']['text'])
  assert text and all(np.array_equal(v, clip[f'text/{k}']) for k, v in text.items())  # copied bitwise
  vision = _flat(start.params['vision'])
  assert all(np.array_equal(v, clip[f'vision/{k}']) for k, v in vision.items())
  assert 'text' not in start.params
  # No optimizer state for the frozen tower: the AdamW moments cover the trainable parameters only.
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(start.opt_state)]
  assert any("['vision']" in p for p in paths) and not any("['text']" in p for p in paths)

  _, trained = checkpoint.load(run['workdir'])
  after = _flat(trained['params'])
  assert all(np.array_equal(after[f'text/{k}'], v) for k, v in text.items())  # bitwise unchanged by 3 steps
  assert any(not np.array_equal(after[f'vision/{k}'], v) for k, v in vision.items())  # the encoder trained


def test_checkpoint_restores_the_frozen_split(run, start):
  s = start[0]
  mngr = checkpoint.manager(run['workdir'], read_only=True)
  with sharding.use(s.mesh, s.rules):
    state, _ = checkpoint.restore(mngr, STEPS, s.abstract_state)
  assert set(state.frozen) == {'params'} and set(state.frozen['params']) == {'text'}
  assert 'text' not in state.params
  _, loaded = checkpoint.load(run['workdir'])
  for k, v in _flat(state.frozen['params']['text']).items():
    np.testing.assert_array_equal(v, _flat(loaded['params'])[f'text/{k}'])


def test_sharded_training_equals_single_device(run, start):
  config = run['config']
  s, state = start
  device = jax.devices()[0]
  state = jax.device_put(state, device)
  frozen_before = jax.device_get(state.frozen)
  step = jax.jit(trainer.make_step(s.model, s.objective, s.optimizer, s.schedule))
  data = pipeline.make_iterator(config.data, batch_size=config.batch_size, image_size=32,
                                context_length=config.model.text.context_length, seed=config.seed)
  single = []
  for _ in range(STEPS):
    state, metrics = step(state, jax.device_put(s.objective.select(next(data)), device))
    single.append(float(metrics['loss']))
  data.close()
  np.testing.assert_allclose([run['losses'][i] for i in range(1, STEPS + 1)], single, atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen_before)
  assert s.objective.batch_keys == ('image', 'mask')


def test_frozen_text_is_required_and_bad_frozen_paths_are_named(clip_source):
  config = _tiny()
  config.frozen.params = ()
  with pytest.raises(ValueError, match="LSeg's text tower must be frozen; add 'text' to config.frozen.params"):
    trainer.setup(config)
  config = _tiny()
  config.frozen.params = ('text', 'txt')
  with pytest.raises(ValueError, match=r"names 'txt', which is not in the model's parameters \(params has "):
    trainer.setup(config)


# ------------------------------------------------------------------ pixel_distill


def test_distill_windows_pool_ink_weighted_pixel_embeddings():
  windows, member = segmentation.distill_windows(32, 16, 8)
  assert windows.shape == (9, 4) and member.shape == (9, 16 * 16)
  assert (windows[:, :2] >= 0).all() and (windows[:, 2:] <= 32).all()
  np.testing.assert_array_equal(member.sum(-1), 8 * 8)  # 16 px = 8 stride-2 cells a side
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((2, 16, 16, 5)).astype(np.float32)
  images = np.zeros((2, 32, 32, 3), np.float32)
  images[0, 4:12, 6:10, 1] = 200.0  # ink in window 0 only (and its neighbours' overlap)
  images[1, 20:30, 20:28, 0] = 255.0
  pooled, ink = segmentation.pool_windows(jnp.asarray(pixels), jnp.asarray(images), member, 0.2)
  cells = (images.max(-1) > 51).reshape(2, 16, 2, 16, 2).mean((2, 4)).reshape(2, -1)
  for b in range(2):
    for r in range(9):
      w = (cells[b] + 1e-3) * member[r]
      want = (w[:, None] * pixels[b].reshape(-1, 5)).sum(0)
      np.testing.assert_allclose(np.asarray(pooled)[b, r], want / np.linalg.norm(want), atol=1e-5)
      np.testing.assert_allclose(np.asarray(ink)[b, r], (cells[b] * member[r]).sum() / 64, atol=1e-6)
  assert np.asarray(ink)[0, 0] > 0 and np.asarray(ink)[0, 8] == 0  # no ink: masked out of the loss


def test_pixel_distill_trains_and_leaves_teacher_and_text_bitwise_frozen():
  config = _tiny(**{'tasks.pixel_distill': dict(weight=0.5, window=16, stride=8, crop_scale=2.0)})
  config.teacher = load_config('vild', 'tiny').teacher  # a random tiny CLIP: the plumbing
  s = trainer.setup(config)
  with sharding.use(s.mesh, s.rules):
    state = s.init_state(jax.random.PRNGKey(config.seed))
  device = jax.devices()[0]
  state = jax.device_put(jax.device_get(state), device)
  assert set(state.frozen) == {'params', 'teacher'}
  frozen_before, params_before = jax.device_get(state.frozen), jax.device_get(state.params)
  step = jax.jit(trainer.make_step(s.model, s.objective, s.optimizer, s.schedule))
  data = pipeline.make_iterator(config.data, batch_size=config.batch_size, image_size=32,
                                context_length=config.model.text.context_length, seed=config.seed)
  for _ in range(STEPS):
    state, metrics = step(state, jax.device_put(s.objective.select(next(data)), device))
  data.close()
  assert np.isfinite(float(metrics['loss'])) and float(metrics['pixel_distill/loss']) > 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen_before)  # teacher + text
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params),
                                         params_before))
  assert any(changed)  # the student trained
  with pytest.raises(ValueError, match='pixel_distill needs config.teacher'):
    trainer.setup(_tiny(**{'tasks.pixel_distill': dict(weight=1.0)}))
  with pytest.raises(ValueError, match=r"unknown options \['windw'\]"):
    trainer.setup(_tiny(**{'tasks.pixel_distill': dict(windw=16)}))


# ------------------------------------------------------------------ evaluation


def _read(folder):
  return np.stack([np.asarray(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))])


def test_lseg_cli_scores_match_the_written_masks(run, tmp_path, capsys):
  out = str(tmp_path / 'eval')
  assert evaluate_cli.main(['lseg', '--workdir', run['workdir'], '--num_images', '6', '--batch_size', '6',
                            '--num_png', '2', '--out', out]) == 0
  printed = capsys.readouterr().out
  scores = json.load(open(os.path.join(out, 'scores.json')))
  truth, pred = _read(os.path.join(out, 'masks', 'truth')), _read(os.path.join(out, 'masks', 'lseg'))
  assert truth.shape == pred.shape == (6, 32, 32) and pred.max() <= 10
  iou = {}
  for c in range(11):
    t, p = truth == c, pred == c
    if (t | p).any():
      iou[c] = (t & p).sum() / (t | p).sum()
  mean = lambda ids: np.mean([iou[c] for c in ids if c in iou]) if any(c in iou for c in ids) else 0.0
  assert scores['lseg']['miou_seen'] == pytest.approx(mean(range(1, 8)), abs=1e-12)
  assert scores['lseg']['miou_unseen'] == pytest.approx(mean(range(8, 11)), abs=1e-12)
  assert scores['lseg']['miou'] == pytest.approx(np.mean(list(iou.values())), abs=1e-12)
  bg = scores['all-background']
  assert bg['miou_seen'] == bg['miou_unseen'] == 0 and bg['iou_background'] == pytest.approx((truth == 0).mean())
  assert 'unseen in training: seven, eight, nine' in printed
  assert sorted(os.listdir(os.path.join(out, 'panels'))) == ['000.png', '001.png']


def test_eval_rejects_masks_beyond_the_vocabulary(run, capsys):
  with pytest.raises(ValueError, match=r'2 mask pixels have class ids >= 11 \(config.classes.names has 11 names\)'):
    lseg_eval.check_masks(np.array([[0, 11], [12, 3]], np.uint8), 11)
  assert evaluate_cli.main(['detect', '--workdir', run['workdir']]) == 2
  assert "is a 'lseg' run; `detect` evaluates ViLD runs" in capsys.readouterr().err
