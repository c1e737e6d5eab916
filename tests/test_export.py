"""python -m clip_jax.export: open_clip / Hugging Face / raw safetensors exports of a run, and back.

Tiny random clip_jax runs (a ViT with QuickGELU, a ModifiedResNet with GELU
whose attention pool's head width differs from the text tower's), perturbed so
no tensor is trivially zero or one, are exported and loaded by the reference
libraries. Tolerances: normalised image and text features within 1e-4 max
abs difference of clip_jax's (float32; in practice ~1e-7); importing back,
by the converters and by config.init, gives the variables bitwise.
"""

import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import open_clip
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

import clip_jax
from clip_jax import checkpoint, convert, export, models, sharding
from clip_jax.convert import raw
from clip_jax.export import __main__ as export_main
from clip_jax.models import zoo
from clip_jax.train import pretrained, trainer
from parity_helpers import nhwc, random_inputs
from trainer_helpers import tiny_config

TOL = 1e-4
ARCHS = {
    'vit': lambda: zoo.clip_config(48, zoo.vit_vision(32, 8, 64, 2, heads=4), zoo.text_tower(64, 2, heads=4),
                                   act='quick_gelu'),
    'rn': lambda: zoo.clip_config(48, zoo.resnet_vision(64, (1, 1, 1, 1), 16, heads=4),
                                  zoo.text_tower(64, 1, heads=4), act='gelu'),
}


def _perturbed(variables, seed=0):
  """Noise on every parameter; BatchNorm statistics away from 0 / 1."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(variables)
  out = {}
  for path, x in flat.items():
    x = np.asarray(x)
    if path[0] == 'batch_stats':
      x = (rng.uniform(0.5, 1.5, x.shape) if path[-1] == 'var' else rng.normal(0, 0.1, x.shape)).astype(x.dtype)
    else:
      x = (x + rng.normal(0, 0.02, x.shape)).astype(x.dtype)
    out[path] = x
  return flax.traverse_util.unflatten_dict(out)


def _save_run(workdir, model_config, variables, step=3):
  """A run directory checkpoint.load reads: variables + the config, as the trainer writes them."""
  mngr = checkpoint.manager(workdir, async_save=False)
  config = {'model': json.loads(model_config.to_json_best_effort())}
  mngr.save(step, args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                          config=ocp.args.JsonSave(config)))
  mngr.wait_until_finished()
  mngr.close()


@pytest.fixture(scope='module', params=list(ARCHS))
def run(request, tmp_path_factory):
  """A saved run of one architecture, its variables, clip_jax's features on fixed inputs, and the
  trainer's setup + random step-0 state (for config.init): one compile of each per architecture."""
  config = tiny_config(model=ARCHS[request.param]())
  setup = trainer.setup(config)
  with sharding.use(setup.mesh, setup.rules):
    random_state = setup.init_state(jax.random.PRNGKey(0))
  variables = _perturbed(jax.device_get({'params': random_state.params, **random_state.model_state}))
  workdir = str(tmp_path_factory.mktemp(f'run_{request.param}'))
  _save_run(workdir, config.model, variables)
  images, tokens = random_inputs(config.model.vision.image_size, config.model.text.context_length,
                                 config.model.text.vocab_size)
  img, txt, _ = models.build(config.model).apply(variables, jnp.asarray(nhwc(images)), jnp.asarray(tokens, jnp.int32))
  return dict(name=request.param, workdir=workdir, config=config.model, variables=variables, images=images,
              tokens=tokens, features=(np.asarray(img), np.asarray(txt)), setup=setup, random_state=random_state)


def _export(run, fmt, tmp_path):
  out = str(tmp_path / f'{run["name"]}_{fmt}')
  assert export_main.main(['--workdir', run['workdir'], '--format', fmt, '--out', out]) == 0
  return out


def _assert_bitwise(got, want):
  got, want = flax.traverse_util.flatten_dict(got, sep='/'), flax.traverse_util.flatten_dict(want, sep='/')
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def _assert_features(run, img, txt):
  want_img, want_txt = run['features']
  assert np.abs(np.asarray(img) - want_img).max() < TOL
  assert np.abs(np.asarray(txt) - want_txt).max() < TOL


def _init_state(run, **init):
  """The trainer's step-0 state (sharded on 8 devices) for a run of `run`'s model started from config.init."""
  setup = run['setup']
  config = ml_collections.ConfigDict(setup.config.to_dict())
  config.init.update(init)
  pretrained.check_init(config)
  with sharding.use(setup.mesh, setup.rules):
    return jax.device_get(pretrained.apply(run['random_state'], config, config.model, setup.state_shardings))


def _assert_started_from(state, run):
  _assert_bitwise({'params': state.params, **state.model_state}, run['variables'])


def test_open_clip(run, tmp_path):
  out = _export(run, 'open_clip', tmp_path)
  assert sorted(os.listdir(out)) == ['clip_jax_export.json', 'open_clip_config.json', 'open_clip_model.safetensors']
  images, tokens = torch.from_numpy(run['images']), torch.from_numpy(run['tokens'])
  # Both documented ways to load: the 'local-dir:' schema, and a registered config + pretrained=PATH.
  local, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{out}')
  open_clip.add_model_config(os.path.join(out, 'clip_jax_export.json'))
  named, _, _ = open_clip.create_model_and_transforms(
      'clip_jax_export', pretrained=os.path.join(out, 'open_clip_model.safetensors'))
  for model in (local.eval(), named.eval()):
    with torch.no_grad():
      _assert_features(run, model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True))
  assert preprocess.transforms[0].size == run['config'].vision.image_size
  texts = ['a photo of a cat.', 'Two handwritten digits: 7 and 3!']
  np.testing.assert_array_equal(open_clip.get_tokenizer(f'local-dir:{out}')(texts).numpy(),
                                clip_jax.tokenize(texts, run['config'].text.context_length))

  v = run['config'].vision
  config, variables = convert.from_open_clip(convert.load(os.path.join(out, 'open_clip_model.safetensors')),
                                             act=run['config'].act, head_width=16,
                                             vision_head_width=v.width * 32 // v.heads if v.kind == 'resnet' else 16)
  _assert_bitwise(variables, run['variables'])
  assert config.to_dict() == run['config'].to_dict()
  _assert_started_from(_init_state(run, open_clip=out), run)
  other = 'gelu' if run['config'].act == 'quick_gelu' else 'quick_gelu'
  with pytest.raises(ValueError, match=rf'set --config.model.act={run["config"].act}'):
    pretrained.load_clip(ml_collections.ConfigDict(dict(open_clip=out)), 'init',
                         ml_collections.ConfigDict(dict(run['config'].to_dict(), act=other)))


def test_hf(run, tmp_path):
  if run['name'] == 'rn':
    out = str(tmp_path / 'rn_hf')
    with pytest.raises(export.ExportError, match=r"only ViT image towers: export this ModifiedResNet run with "
                                                  r"--format open_clip"):
      export.export(run['workdir'], 'hf', out)
    assert os.listdir(tmp_path) == []  # no partial output, no temporary directory left behind
    return
  out = _export(run, 'hf', tmp_path)
  model = transformers.CLIPModel.from_pretrained(out).eval()
  with torch.no_grad():  # image_embeds / text_embeds: the normalised projections
    got = model(input_ids=torch.from_numpy(run['tokens']), pixel_values=torch.from_numpy(run['images']))
  _assert_features(run, got.image_embeds.numpy(), got.text_embeds.numpy())

  processor = transformers.CLIPProcessor.from_pretrained(out, local_files_only=True)
  texts = ['a photo of a cat.', 'Two handwritten digits: 7 and 3!']
  ids = processor(text=texts)['input_ids']
  want = clip_jax.tokenize(texts, run['config'].text.context_length)
  for row, ref in zip(ids, want):
    assert row == ref[:len(row)].tolist() and not ref[len(row):].any()
  size = run['config'].vision.image_size
  image = processor(images=np.zeros((50, 40, 3), np.uint8), return_tensors='np')['pixel_values']
  assert image.shape == (1, 3, size, size)
  np.testing.assert_allclose(processor.image_processor.image_mean, clip_jax.data.transforms.MEAN)

  config, variables = convert.load_hf_clip(out)
  _assert_bitwise(variables, run['variables'])
  assert config.vision.to_dict() == run['config'].vision.to_dict() and config.act == run['config'].act
  _assert_started_from(_init_state(run, hf=out), run)


def test_safetensors(run, tmp_path):
  out = _export(run, 'safetensors', tmp_path)
  config, variables = raw.load(os.path.join(out, 'clip_jax_model.safetensors'))
  _assert_bitwise(variables, run['variables'])
  assert config.to_dict() == run['config'].to_dict()
  _assert_started_from(_init_state(run, safetensors=out), run)


def test_bad_input(run, tmp_path, capsys):
  if run['name'] != 'vit':
    pytest.skip('architecture-independent')
  main = export_main.main
  out = str(tmp_path / 'out')
  assert main(['--workdir', run['workdir'], '--format', 'onnx', '--out', out]) == 2
  assert "--format 'onnx' is unknown; choose one of open_clip, hf, safetensors" in capsys.readouterr().err
  assert main(['--workdir', str(tmp_path / 'nowhere'), '--format', 'hf', '--out', out]) == 2
  assert "has no checkpoints/ directory: pass a training run's workdir" in capsys.readouterr().err
  assert main(['--workdir', run['workdir'], '--step', '7', '--format', 'hf', '--out', out]) == 2
  err = capsys.readouterr().err
  assert 'no checkpoint for step 7' in err and 'available: [3]' in err
  os.makedirs(out)
  (tmp_path / 'out' / 'keep.txt').write_text('x')
  assert main(['--workdir', run['workdir'], '--format', 'safetensors', '--out', out]) == 2
  assert 'exists and is not empty; pass --force' in capsys.readouterr().err
  assert main(['--workdir', run['workdir'], '--format', 'safetensors', '--out', out, '--force']) == 0
  assert os.listdir(out) == ['clip_jax_model.safetensors']
  assert sorted(os.listdir(tmp_path)) == ['out']  # the old directory and the temporary one are gone

  config = ml_collections.ConfigDict(dict(init=dict(pretrained.default_init_config().to_dict(), hf='a',
                                                    safetensors='b')))
  with pytest.raises(ValueError, match=r"config.init: set one weights source .* \(hf='a', safetensors='b'\)"):
    pretrained.check_init(config)
