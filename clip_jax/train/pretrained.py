"""Weights a run starts from: CLIP towers copied into the model, and a frozen CLIP teacher.

  config.init      copy towers of a trained CLIP into the fresh model (fine-tuning; LSeg's
                   encoders, ViLD's backbone). Empty workdir and open_clip: nothing copied.
    workdir        a clip_jax CLIP run (its latest checkpoint, or `step`)
    open_clip      or an OpenAI / open_clip state-dict file (.pt, .bin, .safetensors), converted
    step           checkpoint step of `workdir` (None: the latest)
    towers         the towers to copy, ('vision', 'text'); the model must have each under the
                   same name with CLIP's shapes (clip_jax.models.transfer checks every leaf)
  config.teacher   a frozen CLIP the objective reads (ViLD: class text embeddings, crop embeddings)
    model          its CLIP model config, so the state's shapes and shardings are known before any
                   weights load; empty with `workdir` set: the model config saved in that run
    workdir / open_clip / step   where its weights come from, as for config.init. Both empty:
                   random weights, which only tests and smoke runs want.

Weights are read once, on the host, when a run starts from step 0; a resumed
run restores both from its own checkpoint. They land on the shardings the
state was born with (`apply`), so a teacher is laid out by the same logical
rules as the model.
"""

import functools
from typing import Optional

import jax
import ml_collections
import numpy as np

from clip_jax.train import frozen as frozen_lib

CLIP_TOWERS = ('vision', 'text')


def default_init_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(workdir='', open_clip='', step=None, towers=CLIP_TOWERS))


def _source(section, field: str) -> Optional[tuple[str, str]]:
  """('workdir' | 'open_clip', path) of config.<field>, or None when it names no weights."""
  if not section:
    return None
  workdir, open_clip = section.get('workdir', ''), section.get('open_clip', '')
  if workdir and open_clip:
    raise ValueError(f'config.{field}: set workdir ({workdir!r}) or open_clip ({open_clip!r}), not both')
  if workdir:
    return 'workdir', workdir
  return ('open_clip', open_clip) if open_clip else None


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
  from clip_jax import convert  # pylint: disable=g-import-not-at-top
  return convert.from_open_clip(convert.load(path), act=model_config.get('act', 'quick_gelu'),
                                head_width=_head_width(model_config))


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


def apply(state, config, model_config, shardings):
  """`state` (fresh, sharded) with config.init's towers and config.teacher's weights loaded into it."""
  init = config.get('init')
  if _source(init, 'init') is not None:
    from clip_jax.models import transfer  # pylint: disable=g-import-not-at-top
    _, clip_variables = load_clip(init, 'init', model_config)
    paths = frozen_lib.paths_of(config)
    params = frozen_lib.merge(jax.device_get(state.params), jax.device_get(state.frozen.get('params', {})))
    copied = transfer.copy_towers({'params': params}, clip_variables, tuple(init.towers), model_config.name,
                                  f'the CLIP config that model {model_config.name!r} was made from')['params']
    trainable, fixed = frozen_lib.split(copied, paths)
    state = state.replace(params=_place(trainable, shardings.params, 'config.init'))
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
