"""Weights a run starts from: CLIP towers copied into the model, and a frozen CLIP teacher.

  config.init      copy towers of a trained CLIP into the fresh model (fine-tuning; LSeg's
                   encoders, ViLD's backbone). At most one source may be set; none: nothing copied.
    workdir        a clip_jax CLIP run (its latest checkpoint, or `step`)
    open_clip      or an OpenAI / open_clip state-dict file (.pt, .bin, .safetensors), converted;
                   or a `python -m clip_jax.export --format open_clip` directory (its
                   open_clip_config.json must then agree with the model's activation)
    hf             or a transformers CLIPModel directory (config.json + model.safetensors /
                   pytorch_model.bin), e.g. an `--format hf` export
    safetensors    or a clip_jax `--format safetensors` export (the file, or its directory)
    step           checkpoint step of `workdir` (None: the latest)
    towers         the towers to copy, ('vision', 'text'); the model must have each under the
                   same name with CLIP's shapes (clip_jax.models.transfer checks every leaf).
                   Their BatchNorm statistics come too; a CLIP model taking both towers also
                   takes logit_scale (and logit_bias where both have one)
  config.teacher   a frozen CLIP the objective reads (ViLD: class text embeddings, crop embeddings)
    model          its CLIP model config, so the state's shapes and shardings are known before any
                   weights load; empty with `workdir` set: the model config saved in that run
    workdir / open_clip / hf / safetensors / step   where its weights come from, as for
                   config.init. All empty: random weights, which only tests and smoke runs want.

On the trainer's command line: --config.init.hf=DIR (likewise .open_clip, .safetensors, .workdir).

Weights are read once, on the host, when a run starts from step 0; a resumed
run restores both from its own checkpoint. They land on the shardings the
state was born with (`apply`), so a teacher is laid out by the same logical
rules as the model.
"""

import functools
import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from clip_jax.train import frozen as frozen_lib

CLIP_TOWERS = ('vision', 'text')


SOURCES = ('workdir', 'open_clip', 'hf', 'safetensors')


def default_init_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(workdir='', open_clip='', hf='', safetensors='', step=None,
                                        towers=CLIP_TOWERS))


def _source(section, field: str) -> Optional[tuple[str, str]]:
  """(one of SOURCES, path) of config.<field>, or None when it names no weights."""
  if not section:
    return None
  given = [(k, section.get(k)) for k in SOURCES if section.get(k)]
  if len(given) > 1:
    shown = ', '.join(f'{k}={v!r}' for k, v in given)
    raise ValueError(f'config.{field}: set one weights source of {SOURCES}, not several ({shown}); empty the others')
  return given[0] if given else None


@functools.lru_cache(maxsize=8)
def _saved_model_config(workdir: str, step: Optional[int]) -> ml_collections.ConfigDict:
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load_config(workdir, step).model


def teacher_config(config) -> Optional[ml_collections.ConfigDict]:
  """The teacher's model config (validated), or None when the run has no teacher."""
  t = config.get('teacher')
  if not t:
    return None
  model = t.get('model')
  if not model and t.get('workdir'):
    model = _saved_model_config(t.workdir, t.get('step'))
  if not model or model.get('name') != 'clip':
    raise ValueError('config.teacher.model must be a CLIP model config (name=\'clip\'), e.g. '
                     "zoo.get('ViT-B/16') or the model config of the CLIP run in config.teacher.workdir")
  _source(t, 'teacher')
  return model


def required_teacher_config(config, needs: str) -> ml_collections.ConfigDict:
  """teacher_config(config), or a ValueError: `needs` (who needs config.teacher, and for what) + where to read."""
  model = teacher_config(config)
  if model is None:
    raise ValueError(f'{needs}; see clip_jax.train.pretrained')
  return model


def check_init(config) -> None:
  """Config checks before anything loads (called by the trainer's setup)."""
  init = config.get('init')
  if _source(init, 'init') is not None:
    towers = tuple(init.get('towers', CLIP_TOWERS))
    if not towers or any(t not in CLIP_TOWERS for t in towers):
      raise ValueError(f'config.init.towers={towers!r}: choose from {CLIP_TOWERS}')
  teacher_config(config)


def _head_width(model_config) -> int:
  """Per-head width of the towers, which a state dict's shapes do not show (OpenAI's is 64)."""
  tower = model_config.get('text') or model_config.vision
  return int(tower.width // tower.heads)


def _vision_head_width(model_config) -> Optional[int]:
  """The image tower's per-head width where it differs from the text tower's (a ModifiedResNet's attention
  pool is width * 32 wide)."""
  v = model_config.get('vision')
  if not v or not v.get('heads') or not v.get('width'):
    return None
  return int(v.width * 32 // v.heads) if v.get('kind') == 'resnet' else int(v.width // v.heads)


def load_clip(section, field: str, model_config):
  """(model config, host variables) of the CLIP that config.<field> names; `model_config` (the model
  the weights go into) gives a converted state dict's activation and head width."""
  kind, path = _source(section, field)
  if kind == 'workdir':
    from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
    clip_config, variables = checkpoint.load(path, section.get('step'))
    if clip_config.model.get('name') != 'clip':
      raise ValueError(f'config.{field}.workdir={path!r} is a {clip_config.model.get("name")!r} run; it must be '
                       'a CLIP run (e.g. configs/clip_digits.py:vit)')
    return clip_config.model, variables
  if kind == 'safetensors':
    from clip_jax.convert import raw  # pylint: disable=g-import-not-at-top
    if os.path.isdir(path):
      path = os.path.join(path, 'clip_jax_model.safetensors')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'config.{field}.safetensors: {path!r} does not exist; pass the file or directory '
                              'that python -m clip_jax.export --format safetensors wrote')
    clip_config, variables = raw.load(path)
    if clip_config.get('name') != 'clip':
      raise ValueError(f'config.{field}.safetensors={path!r} holds a {clip_config.get("name")!r} model; it must be '
                       'a CLIP export')
    return clip_config, variables
  from clip_jax import convert  # pylint: disable=g-import-not-at-top
  if kind == 'hf':
    return convert.load_hf_clip(path)
  return convert.from_open_clip(convert.load(_open_clip_file(path, field, model_config)),
                                act=model_config.get('act', 'quick_gelu'), head_width=_head_width(model_config),
                                vision_head_width=_vision_head_width(model_config))


# open_clip's preference among a directory's weight files (open_clip.factory._find_checkpoint_in_dir).
_OPEN_CLIP_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors', 'open_clip_pytorch_model.bin',
                    'open_clip_pytorch_model.pth', 'model.safetensors', 'pytorch_model.bin')


def _open_clip_file(path: str, field: str, model_config) -> str:
  """The state-dict file config.<field>.open_clip names (a file, or an open_clip 'local-dir' directory);
  checks the activation against an open_clip_config.json beside it."""
  if os.path.isdir(path):
    found = [os.path.join(path, n) for n in _OPEN_CLIP_FILES if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise FileNotFoundError(f'config.{field}.open_clip={path!r} is a directory without any of {_OPEN_CLIP_FILES}')
    path = found[0]
  meta = os.path.join(os.path.dirname(path), 'open_clip_config.json')
  if os.path.isfile(meta) and model_config.get('act'):
    with open(meta) as f:
      quick = json.load(f).get('model_cfg', {}).get('quick_gelu', False)
    act = 'quick_gelu' if quick else 'gelu'
    if act != model_config.act:
      raise ValueError(f'config.{field}.open_clip: {meta} says the weights were trained with {act}, but '
                       f'model.act={model_config.act!r}; set --config.model.act={act}')
  return path


def _same_architecture(want, got, field: str):
  keys = ('embed_dim', 'act', 'vision', 'text')
  diff = [k for k in keys if (want.get(k).to_dict() if hasattr(want.get(k), 'to_dict') else want.get(k)) !=
          (got.get(k).to_dict() if hasattr(got.get(k), 'to_dict') else got.get(k))]
  if diff:
    shown = '; '.join(f'{k}: config {want.get(k)!r} vs weights {got.get(k)!r}' for k in diff)
    raise ValueError(f'config.{field}.model does not match the weights it loads ({shown}); set it to the '
                     'model config of that CLIP')


def _place(tree, shardings, what: str):
  """Host arrays onto the state's shardings, with a clear error for a mismatched structure or shape."""
  flat_target, treedef = jax.tree.flatten(shardings)
  try:
    leaves = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f'{what}: the loaded variables do not have the model\'s structure ({e})') from None
  return jax.tree.unflatten(treedef, [jax.device_put(np.asarray(x), s) for x, s in zip(leaves, flat_target)])


def _copy_collections(model_state: dict, clip_variables, towers) -> dict:
  """The towers' non-parameter collections (BatchNorm statistics) taken from the CLIP's, shapes checked."""
  out = dict(model_state)
  for name, collection in model_state.items():
    source = clip_variables.get(name, {})
    for tower in towers:
      if tower not in collection or tower not in source:
        continue
      want = jax.tree.map(np.shape, collection[tower])
      got = jax.tree.map(np.shape, source[tower])
      if want != got:
        raise ValueError(f'config.init: {name}/{tower} of the loaded CLIP does not match the model\'s shapes; '
                         'build the model from the config of the CLIP it starts from')
      out[name] = dict(out[name], **{tower: jax.tree.map(
          lambda s, t: np.asarray(s, np.asarray(t).dtype), source[tower], collection[tower])})
  return out


def apply(state, config, model_config, shardings):
  """`state` (fresh, sharded) with config.init's towers and config.teacher's weights loaded into it."""
  init = config.get('init')
  if _source(init, 'init') is not None:
    from clip_jax.models import transfer  # pylint: disable=g-import-not-at-top
    _, clip_variables = load_clip(init, 'init', model_config)
    paths = frozen_lib.paths_of(config)
    params = frozen_lib.merge(jax.device_get(state.params), jax.device_get(state.frozen.get('params', {})))
    towers = tuple(init.towers)
    copied = transfer.copy_towers({'params': params}, clip_variables, towers, model_config.name,
                                  f'the CLIP config that model {model_config.name!r} was made from')['params']
    if model_config.name == 'clip' and set(towers) == set(CLIP_TOWERS):  # the whole CLIP: its temperature too
      copied = dict(copied, **{k: v for k, v in clip_variables['params'].items()
                               if k in ('logit_scale', 'logit_bias') and k in copied})
    trainable, fixed = frozen_lib.split(copied, paths)
    state = state.replace(params=_place(trainable, shardings.params, 'config.init'))
    if state.model_state:
      state = state.replace(model_state=_place(
          _copy_collections(jax.device_get(state.model_state), clip_variables, towers),
          shardings.model_state, 'config.init'))
    if fixed:
      state = state.replace(frozen=dict(state.frozen, params=_place(fixed, shardings.frozen['params'],
                                                                     'config.init')))
  teacher = config.get('teacher')
  if teacher and _source(teacher, 'teacher') is not None:
    want = teacher_config(config)
    got, variables = load_clip(teacher, 'teacher', want)
    _same_architecture(want, got, 'teacher')
    placed = _place(variables, shardings.frozen[frozen_lib.TEACHER], 'config.teacher')
    state = state.replace(frozen=dict(state.frozen, **{frozen_lib.TEACHER: placed}))
  return state
