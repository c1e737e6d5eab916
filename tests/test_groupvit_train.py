"""GroupViT training: the multi-label loss, caption nouns as prompts, the trainer, zero-shot segmentation.

Tolerances: the multi-label loss and its gradients within 1e-5 of a float64 torch reference written
row by row; sharded (8-device) training within 1e-4 of the same steps on one device for the first 10
losses; mIoU exactly the confusion-matrix value recomputed from the written PNG masks.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from clip_jax import checkpoint, models, sharding, tasks
from clip_jax.data import digits, pipeline, prompts, tokenizer, transforms
from clip_jax.evaluate import __main__ as evaluate_cli
from clip_jax.evaluate import segmentation
from clip_jax.losses import grouping as grouping_loss
from clip_jax.losses import multilabel
from clip_jax.models import zoo
from clip_jax.train import frozen as frozen_lib
from clip_jax.train import trainer
from conftest import load_config
from trainer_helpers import losses

STEPS = 10


# ------------------------------------------------------------------ the loss


def _torch_reference(image, prompt, valid, scale):
  """The loss written row by row in float64: each image against every valid prompt (its own share
  1/k_i of the target), each valid prompt against every image."""
  b, k, _ = prompt.shape
  flat, owner = prompt.reshape(b * k, -1), np.repeat(np.arange(b), k)
  cols = [j for j in range(b * k) if valid.reshape(-1)[j]]
  i2p = []
  for i in range(b):
    own = [c for c, j in enumerate(cols) if owner[j] == i]
    if own:
      log_p = torch.log_softmax(scale * image[i] @ flat[cols].T, dim=0)
      i2p.append(-sum(log_p[c] for c in own) / len(own))
  p2i = [-torch.log_softmax(scale * flat[j] @ image.T, dim=0)[owner[j]] for j in cols]
  mean = lambda xs: sum(xs) / len(xs) if xs else torch.zeros((), dtype=torch.float64)
  return 0.5 * (mean(i2p) + mean(p2i))


def _features(b=6, k=3, d=8, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  image = unit(rng.standard_normal((b, d))).astype(np.float32)
  prompt = unit(rng.standard_normal((b, k, d))).astype(np.float32)
  return image, prompt


@pytest.mark.parametrize('pattern', ['mixed', 'all_valid'])
def test_multi_label_loss_and_gradients_match_reference(pattern):
  image, prompt = _features()
  valid = np.ones((6, 3), bool)
  if pattern == 'mixed':  # 3, 2, 1 prompts, none (no part in the loss), 1, 2
    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]], bool)
  scale = 7.5
  got, grads = jax.value_and_grad(multilabel.multi_label_loss, argnums=(0, 1, 3))(
      jnp.asarray(image), jnp.asarray(prompt), jnp.asarray(valid), jnp.float32(scale))

  t = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (image, prompt, np.float64(scale))]
  want = _torch_reference(t[0], t[1], valid, t[2])
  want.backward()
  np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)
  for g, ref in zip(grads, t):
    np.testing.assert_allclose(np.asarray(g), ref.grad.numpy(), atol=1e-5)
  assert not np.asarray(grads[1])[~valid].any()  # a padding slot gets no gradient


def test_all_valid_equals_nvlabs_label_construction():
  """NVlabs' formula: soft CE against eye(B) (x) 1/K one way and the one-hot owner the other."""
  image, prompt = _features(b=4, k=2, seed=1)
  scale = 20.0
  flat = prompt.reshape(8, -1)
  logits = scale * image @ flat.T
  labels_img = np.kron(np.eye(4), np.full((1, 2), 0.5))        # [B, B*K]
  labels_txt = np.kron(np.eye(4), np.ones((2, 1)))             # [B*K, B]
  log_softmax = lambda x: x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
  want = 0.5 * ((-labels_img * log_softmax(logits)).sum(1).mean() + (-labels_txt * log_softmax(logits.T)).sum(1).mean())
  got = multilabel.multi_label_loss(jnp.asarray(image), jnp.asarray(prompt), jnp.ones((4, 2), bool), scale)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_loss_shape_errors_are_named():
  image, prompt = _features()
  with pytest.raises(ValueError, match=r'must be \[B, D\], \[B, K, D\] and \[B, K\]'):
    multilabel.multi_label_loss(image, prompt, np.ones((6, 2), bool), 1.0)


# ------------------------------------------------------------------ nouns -> prompts


def test_digit_nouns_are_the_caption_objects():
  extract = prompts.extractor('digits')
  source = digits.DigitsSource('train', 200, seed=3)
  for i in range(200):
    ex = source[i]
    objects = digits.parse_caption(ex['caption'])
    want = list(dict.fromkeys(digits.DIGIT_NAMES[d] for _, d in objects))
    assert extract(ex['caption']) == want, ex['caption']
    plain = digits.caption_for([(None, d) for _, d in objects], include_colors=False)
    assert extract(plain) == want, plain
    assert extract(ex['caption'], limit=1) == want[:1]


def test_extractor_on_free_text():
  extract = prompts.extractor('dog, traffic light,pony,box')
  assert extract('Two DOGS under traffic lights; a pony, ponies and boxes. Another dog.') == [
      'dog', 'traffic light', 'pony', 'box']
  assert extract('a cat on a mat') == []          # nouns outside the vocabulary are not found
  assert extract('the traffic was light') == []   # a phrase matches only as a phrase


def test_prompt_fields_pad_with_the_caption():
  caption = 'a photo of a red seven and a blue seven.'
  out = prompts.prompt_fields([caption], 3, 'a photo of a {}.', 'digits', 24)
  assert out['prompt_valid'].tolist() == [[True, False, False]]
  decoded = [tokenizer.decode(t) for t in out['prompt_tokens'][0]]
  assert decoded[0] == 'a photo of a seven .'
  assert decoded[1] == decoded[2] == tokenizer.decode(tokenizer.tokenize([caption], 24)[0])


def test_grain_batches_carry_the_prompts():
  c = pipeline.default_data_config()
  c.digits.num_train = 64
  c.digits.drop_color_prob = 0.5
  c.prompts.max_prompts = 3
  batch = next(pipeline.make_iterator(c, batch_size=8, image_size=32, context_length=24, seed=0, train=True,
                                      process_index=0, process_count=1))
  assert batch['prompt_tokens'].shape == (8, 3, 24) and batch['prompt_valid'].shape == (8, 3)
  for tokens, prompt_tokens, valid in zip(batch['tokens'], batch['prompt_tokens'], batch['prompt_valid']):
    nouns = prompts.extractor('digits')(tokenizer.decode(tokens))
    assert valid.sum() == len(nouns) >= 1
    assert [tokenizer.decode(t) for t in prompt_tokens[:len(nouns)]] == [f'a photo of a {n} .' for n in nouns]


@pytest.mark.parametrize('field,value,match', [
    ('max_prompts', -1, r'config.data.prompts.max_prompts=-1 must be an int >= 0'),
    ('template', 'a photo of a thing.', r"config.data.prompts.template: .*exactly one '\{\}'"),
    ('vocabulary', ' , ', r"config.data.prompts.vocabulary=' , ' names no nouns"),
    ('vocabulary', '/no/such/nouns.txt', r"vocabulary='/no/such/nouns.txt': no such file"),
])
def test_bad_prompt_config_is_named(field, value, match):
  c = pipeline.default_data_config()
  c.prompts.max_prompts = 3
  c.prompts[field] = value
  with pytest.raises(ValueError, match=match):
    pipeline.validate(c)


def test_multi_label_task_needs_prompts():
  config = load_config('groupvit', 'tiny')
  config.data.prompts.max_prompts = 0
  with pytest.raises(ValueError, match=r'tasks.multi_label needs .* set config.data.prompts.max_prompts'):
    tasks.build_objective(config)
  config = load_config('groupvit', 'tiny')
  config.tasks.multi_label.temperature = 0.1
  with pytest.raises(ValueError, match=r"multi_label: unknown options \['temperature'\]"):
    tasks.build_objective(config)


def _with_teacher(weight=0.5):
  """The tiny GroupViT run guided by a random tiny CLIP teacher (the digits variant's third term)."""
  config = _tiny()
  config.tasks.feature_distill = dict(weight=weight, text=True)
  teacher = zoo.get('tiny')  # 32 px ViT, as the student's input: no resize
  teacher.text.context_length = config.model.text.context_length
  config.teacher = ml_collections.ConfigDict(dict(model=teacher, workdir='', open_clip='', step=None))
  return config


def _random_variables(model_config, seed):
  """Random weights of the right shapes without compiling an init (BatchNorm statistics positive)."""
  rng = np.random.default_rng(seed)
  def draw(path, x):
    if any(getattr(k, 'key', None) == 'batch_stats' for k in path):
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    return (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(draw, models.abstract_variables(model_config))


def test_teacher_term_adds_to_the_groupvit_objective():
  config = _with_teacher(weight=0.5)
  config.tasks.group_balance = dict(weight=0.2)  # the digits variant's four terms
  objective = tasks.build_objective(config)
  model, teacher = models.build(config.model), models.build(config.teacher.model)
  variables = dict(_random_variables(config.model, 0))
  variables[frozen_lib.TEACHER] = _random_variables(config.teacher.model, 1)
  data = pipeline.make_iterator(config.data, batch_size=config.batch_size, image_size=32,
                                context_length=config.model.text.context_length, seed=0)
  batch = {k: jnp.asarray(v) for k, v in objective.select(next(data)).items()}
  data.close()
  outputs = jax.jit(lambda v, b: objective.forward(model, v, b, train=False, rngs={})[0])(variables, batch)
  total, metrics = jax.jit(objective.loss)(outputs, batch)
  embed = jax.jit(lambda x, method: teacher.apply(variables[frozen_lib.TEACHER], x, method=method, normalize=True),
                  static_argnames='method')
  want = embed(transforms.normalize(batch['image']), 'encode_image')
  np.testing.assert_allclose(outputs['teacher_features'], want, atol=1e-6)
  text = lambda t: np.asarray(embed(t, 'encode_text'))
  b, k, length = batch['prompt_tokens'].shape
  want_text = text(batch['tokens'])
  want_prompts = text(batch['prompt_tokens'].reshape(b * k, length)).reshape(b, k, -1)
  np.testing.assert_allclose(outputs['teacher_text_features'], want_text, atol=1e-6)
  np.testing.assert_allclose(outputs['teacher_prompt_features'], want_prompts, atol=1e-6)
  # The loss written out: image rows, then caption rows and valid prompt rows in one mean.
  image_d = 2 - 2 * np.sum(np.asarray(outputs['image_features']) * np.asarray(want), axis=-1)
  caption_d = 2 - 2 * np.sum(np.asarray(outputs['text_features']) * want_text, axis=-1)
  prompt_d = 2 - 2 * np.sum(np.asarray(outputs['prompt_features']) * want_prompts, axis=-1)
  valid = np.asarray(batch['prompt_valid'], bool)
  text_d = np.concatenate([caption_d, prompt_d[valid]])
  assert 0 < valid.sum() < valid.size  # some images have fewer digits than prompt slots
  np.testing.assert_allclose(metrics['feature_distill/loss'], image_d.mean() + text_d.mean(), rtol=1e-5)
  balance = config.tasks.group_balance.weight * metrics['group_balance/loss']
  parts = metrics['contrastive/loss'] + metrics['multi_label/loss'] + 0.5 * metrics['feature_distill/loss'] + balance
  np.testing.assert_allclose(total, parts, rtol=1e-6)
  # The balance term written out: one grouping stage of the tiny model per entry of the maps.
  _, aux = jax.jit(lambda v, x: model.apply(v, x, normalize=True, return_attentions=True, method='encode_image'))(
      {k: variables[k] for k in ('params', 'batch_stats')}, transforms.normalize(batch['image']))
  want_balance = np.mean([grouping_loss.load_balance(s, h) for s, h in zip(aux['soft'], aux['hard'])])
  np.testing.assert_allclose(metrics['group_balance/loss'], want_balance, rtol=1e-6)
  assert metrics['multi_label/loss'] > 0 and metrics['feature_distill/loss'] > 0


def test_teacher_term_needs_the_other_tasks_and_a_teacher():
  config = _with_teacher()
  config.tasks = ml_collections.ConfigDict(dict(feature_distill=dict(weight=1.0)))
  with pytest.raises(ValueError, match='a GroupViT distills beside its own tasks'):
    tasks.build_objective(config)
  config = _with_teacher()
  del config.teacher
  with pytest.raises(ValueError, match='feature_distill needs config.teacher'):
    tasks.build_objective(config)
  config = load_config('clip_digits', 'tiny')
  config.tasks = ml_collections.ConfigDict(dict(feature_distill=dict(weight=1.0, text=True)))
  with pytest.raises(ValueError, match=r'text=True distills a text tower trained beside other tasks'):
    tasks.build_objective(config)


# ------------------------------------------------------------------ the trainer


def _tiny(**overrides):
  config = load_config('groupvit', 'tiny')
  config.total_steps = STEPS
  config.checkpoint.every_steps = STEPS
  config.checkpoint['async'] = False
  config.eval.at_end = False
  config.tensorboard = False
  for key, value in overrides.items():
    node = config
    parts = key.split('.')
    for part in parts[:-1]:
      node = node[part]
    node[parts[-1]] = value
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny GroupViT run on the 8-device mesh: its config, workdir and logged losses."""
  workdir = str(tmp_path_factory.mktemp('groupvit_tiny'))
  # Adam's first steps are sign(g) * lr for every gradient well above eps, and GroupViT has parameters
  # whose true gradient is 0 or nearly so (a bias that LayerNorm or BatchNorm cancels): float rounding
  # sets their sign, so with eps 1e-6 two exact-to-rounding runs take different full-size steps and drift.
  # At init the pooled image features barely differ across images, and the projection head's BatchNorm
  # divides by their tiny spread, so rounding in the sharded batch statistics is amplified (~2e-5 in the
  # first loss). eps 1e-3 and lr 1e-4 keep those from compounding over 10 steps (measured with lr 2e-3:
  # 2e-2 apart by step 8 with eps 1e-6, 7e-3 with eps 1e-3); the comparison is then of the sharding alone.
  config = _tiny(**{'mesh.data': 8, 'optim.eps': 1e-3, 'optim.lr': 1e-4})
  trainer.train(config, workdir, progress=False)
  return dict(config=config, workdir=workdir, losses=losses(workdir))


def test_sharded_training_equals_single_device(run):
  """The same steps, state and batches on one device, no mesh (the trainer's step function, unsharded)."""
  s = trainer.setup(run['config'])
  with sharding.use(s.mesh, s.rules):
    state = s.init_state(jax.random.PRNGKey(run['config'].seed))
  device = jax.devices()[0]
  state = jax.device_put(jax.device_get(state), device)
  step = jax.jit(trainer.make_step(s.model, s.objective, s.optimizer, s.schedule))
  data = pipeline.make_iterator(run['config'].data, batch_size=run['config'].batch_size,
                                image_size=run['config'].model.vision.image_size,
                                context_length=run['config'].model.text.context_length, seed=run['config'].seed)
  single = []
  for _ in range(STEPS):
    state, metrics = step(state, jax.device_put(s.objective.select(next(data)), device))
    single.append(float(metrics['loss']))
  data.close()
  sharded = [run['losses'][i] for i in range(1, STEPS + 1)]
  np.testing.assert_allclose(sharded, single, atol=1e-4)
  assert sharded[-1] < sharded[0]
  assert s.objective.batch_keys == ('image', 'tokens', 'prompt_tokens', 'prompt_valid')


def test_conversion_keeps_the_multi_label_scale_out_of_hf():
  from clip_jax.convert import hf_groupvit  # pylint: disable=g-import-not-at-top
  config = load_config('groupvit', 'tiny').model
  names = {r.path for r in hf_groupvit.rules(config)}
  assert ('params', 'logit_scale') in names and ('params', 'multi_label_logit_scale') not in names
  assert 'multi_label_logit_scale' in models.abstract_variables(config)['params']


# ------------------------------------------------------------------ zero-shot segmentation


def _read_masks(folder):
  files = sorted(os.listdir(folder))
  return np.stack([np.asarray(Image.open(os.path.join(folder, f))) for f in files])


def test_segment_cli_end_to_end(run, tmp_path, capsys):
  out = str(tmp_path / 'seg')
  assert evaluate_cli.main(['segment', '--workdir', run['workdir'], '--num_images', '12', '--num_png', '3',
                            '--out', out, '--batch_size', '8']) == 0
  printed = capsys.readouterr().out
  scores = json.load(open(os.path.join(out, 'scores.json')))
  assert set(scores) == {'groupvit', 'all-background', 'settings'}
  truth, pred = _read_masks(os.path.join(out, 'masks', 'truth')), _read_masks(os.path.join(out, 'masks', 'groupvit'))
  assert truth.shape == pred.shape == (12, 64, 64) and pred.max() <= 10
  np.testing.assert_array_equal(truth, segmentation.test_scenes(12, 4321, 64, (2, 3))[1])
  # mIoU from the PNGs, class by class: TP / (TP + FP + FN) over the classes that occur.
  ious = []
  for c in range(11):
    t, p = truth == c, pred == c
    if (t | p).any():
      ious.append((t & p).sum() / (t | p).sum())
  assert 0.0 <= scores['groupvit']['miou'] <= 1.0
  assert scores['groupvit']['miou'] == pytest.approx(np.mean(ious), abs=1e-12)
  assert f'{scores["groupvit"]["miou"]:.4f}' in printed and 'all-background' in printed
  # All-background: only the background class scores, its IoU the background share of the pixels.
  present = len(np.unique(truth))
  assert scores['all-background']['miou'] == pytest.approx((truth == 0).mean() / present)
  panels = sorted(os.listdir(os.path.join(out, 'panels')))
  assert panels == ['000.png', '001.png', '002.png']
  with Image.open(os.path.join(out, 'panels', '000.png')) as im:
    assert im.mode == 'RGB' and im.width > 4 * 64 * 4  # input, truth, segments, prediction


def test_segmentation_during_training_matches_the_cli(run):
  config, variables = checkpoint.load(run['workdir'])
  model = models.build(config.model)
  config.eval.segmentation.num_images = 12
  config.eval.segmentation.batch_size = 8
  got = segmentation.evaluate(model, variables, config)
  images, masks = segmentation.test_scenes(12, 4321, 64, (2, 3))
  classes = segmentation.class_embeddings(model, variables, digits.DIGIT_NAMES, ('a photo of a {}.',), 24)
  pred, groups = segmentation.segment(model, variables, 'groupvit', images, classes, 32,
                                      segmentation.Settings(batch_size=8))
  assert got['miou'] == pytest.approx(segmentation.miou(segmentation.confusion(masks, pred)), abs=1e-12)
  assert groups.max() < 4  # the tiny model's four final segments


def test_clip_patch_baseline_labels_each_patch():
  config = zoo.get('tiny')  # ViT, 32 px, patch 8: a 4 x 4 grid
  model = models.build(config)
  rng = np.random.default_rng(0)  # random weights without compiling an init: only the geometry is checked
  variables = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype),
                           models.abstract_variables(config))
  images, masks = segmentation.test_scenes(4, 4321, 64, (2, 3))
  classes = np.eye(10, config.embed_dim, dtype=np.float32)
  pred, groups = segmentation.segment(model, variables, 'clip-patch', images, classes, 32,
                                      segmentation.Settings(batch_size=4, top_k=2))
  y, x = np.mgrid[:64, :64]
  np.testing.assert_array_equal(groups, np.broadcast_to((y // 16) * 4 + x // 16, groups.shape))
  assert pred.shape == masks.shape and pred.max() <= 10
  for b in range(4):  # at most top_k digit classes per image
    assert len(set(np.unique(pred[b]).tolist()) - {0}) <= 2


def test_segment_cli_bad_input(run, tmp_path, capsys):
  assert evaluate_cli.main(['segment', '--workdir', str(tmp_path / 'nothing')]) == 2
  assert 'no checkpoint in' in capsys.readouterr().err
  assert evaluate_cli.main(['segment', '--workdir', run['workdir'], '--top_k', '0', '--num_png', '0']) == 2
  assert 'top_k=0 must be an int >= 1' in capsys.readouterr().err
  assert evaluate_cli.main(['segment', '--workdir', run['workdir'], '--num_digits', '2', '5']) == 2
  assert '--num_digits 2 5: need 1 <= MIN <= MAX <= 3' in capsys.readouterr().err
  with pytest.raises(ValueError, match=r"zero-shot segmentation needs a GroupViT or a CLIP ViT"):
    segmentation.method_name(zoo.get('RN50'))


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize('scale', [100.0, 12.5])
def test_label_pixels_is_nvlabs_procedure(scale):
  """NVlabs' GroupViTSegInference written out in numpy on one image, nearest-size maps (no resize):
  argmax segment per pixel; softmax(s g.t) times the top-k-restricted softmax; background below
  min(bg_thresh, the largest group-class affinity)."""
  rng = np.random.default_rng(0)
  b, side, g, c, d, k, thresh = 3, 4, 5, 6, 8, 3, 0.5
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  maps = rng.uniform(size=(b, side, side, g)).astype(np.float32)
  segments = unit(rng.standard_normal((b, g, d))).astype(np.float32)
  image = unit(rng.standard_normal((b, d))).astype(np.float32)
  classes = unit(rng.standard_normal((c, d))).astype(np.float32)
  seg, group = segmentation.label_pixels(maps, segments, image, classes, out_size=side, top_k=k,
                                         bg_thresh=thresh, logit_scale=scale)
  for i in range(b):
    onehot = np.eye(g)[maps[i].argmax(-1)]                          # [S, S, G]
    logits = scale * segments[i] @ classes.T                         # [G, C]
    top = np.argsort(-(image[i] @ classes.T))[:k]
    restricted = np.full_like(logits, -np.inf)
    restricted[:, top] = logits[:, top]
    affinity = _softmax(restricted) * _softmax(logits)
    per_pixel = onehot @ affinity                                    # [S, S, C]
    want = per_pixel.argmax(-1) + 1
    want[per_pixel.max(-1) < min(thresh, affinity.max())] = 0
    np.testing.assert_array_equal(np.asarray(group[i]), maps[i].argmax(-1))
    np.testing.assert_array_equal(np.asarray(seg[i]), want)
  assert (np.asarray(seg) == 0).any() and (np.asarray(seg) > 0).any()  # both branches exercised
