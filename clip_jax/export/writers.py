"""Writing a run's checkpoint as open_clip / Hugging Face / raw safetensors files.

`export()` reads the checkpoint (latest, or `step`), writes every file into a
temporary sibling of `out` and renames it into place only when all are
written, so a failure never leaves partial output. `write()` does the
format-specific part for a (model config, variables) pair already in memory.
"""

import json
import os
import shutil
import tempfile
from typing import Optional

import jax
import ml_collections

from clip_jax.convert import io, raw
from clip_jax.data import transforms

FORMATS = ('open_clip', 'hf', 'safetensors')
OPEN_CLIP_WEIGHTS = 'open_clip_model.safetensors'
OPEN_CLIP_CONFIG = 'open_clip_config.json'   # open_clip's 'local-dir:' / HF-hub layout: {'model_cfg', 'preprocess_cfg'}
OPEN_CLIP_NAME = 'clip_jax_export'          # DIR/clip_jax_export.json: the bare model_cfg, for add_model_config
RAW_WEIGHTS = 'clip_jax_model.safetensors'


class ExportError(ValueError):
  """Bad export arguments or a model the format cannot hold; the message names the fix."""


def _open_clip(directory: str, config: ml_collections.ConfigDict, variables) -> None:
  from clip_jax.convert import open_clip  # pylint: disable=g-import-not-at-top
  if config.get('name') != 'clip':
    raise ExportError(f'--format open_clip: the run is a {config.get("name")!r} model; open_clip holds CLIP '
                      '(ViT or ModifiedResNet) models only: use --format safetensors'
                      + (' or --format hf' if config.get('name') == 'groupvit' else ''))
  try:
    model_cfg = open_clip.open_clip_model_cfg(config)
  except ValueError as e:
    raise ExportError(f'--format open_clip: {e}') from None
  io.save_safetensors(open_clip.to_open_clip(config, variables), os.path.join(directory, OPEN_CLIP_WEIGHTS))
  preprocess = dict(mean=list(transforms.MEAN), std=list(transforms.STD), interpolation='bicubic',
                    resize_mode='shortest')
  with open(os.path.join(directory, OPEN_CLIP_CONFIG), 'w') as f:
    json.dump(dict(model_cfg=model_cfg, preprocess_cfg=preprocess), f, indent=2)
  with open(os.path.join(directory, OPEN_CLIP_NAME + '.json'), 'w') as f:
    json.dump(model_cfg, f, indent=2)


def _hf(directory: str, config: ml_collections.ConfigDict, variables) -> None:
  from clip_jax import convert  # pylint: disable=g-import-not-at-top
  from clip_jax.export import hf_files  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  name = config.get('name')
  if name == 'clip':
    if config.vision.kind != 'vit':
      raise ExportError(f'--format hf: model.vision.kind={config.vision.kind!r}, but transformers\' CLIPModel has only '
                        'ViT image towers: export this ModifiedResNet run with --format open_clip (or safetensors)')
    hf_config = transformers.CLIPConfig(**convert.hf_config(config), architectures=['CLIPModel'])
    state_dict = convert.to_hf_clip(config, variables)
  elif name == 'groupvit':
    hf_config = transformers.GroupViTConfig(**convert.hf_groupvit_config(config), architectures=['GroupViTModel'])
    state_dict = convert.to_hf_groupvit(config, variables)
  else:
    raise ExportError(f'--format hf: a {name!r} model has no transformers equivalent; use --format safetensors')
  hf_config.save_pretrained(directory)
  io.save_safetensors(state_dict, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
  if config.text.vocab_size == hf_files.tokenizer.VOCAB_SIZE:
    hf_files.write_processor(directory, config.vision.image_size, config.text.context_length)
  else:  # CLIP's BPE tokenizer files would not fit the model's vocabulary
    print(f'note: model.text.vocab_size={config.text.vocab_size} is not CLIP\'s BPE vocabulary '
          f'({hf_files.tokenizer.VOCAB_SIZE}); no tokenizer/processor files written')


def _safetensors(directory: str, config: ml_collections.ConfigDict, variables) -> None:
  raw.save(os.path.join(directory, RAW_WEIGHTS), config, variables)


_WRITERS = {'open_clip': _open_clip, 'hf': _hf, 'safetensors': _safetensors}


def write(fmt: str, directory: str, config: ml_collections.ConfigDict, variables) -> None:
  """Writes (model config, variables) in format `fmt` into the existing directory `directory`."""
  if fmt not in _WRITERS:
    raise ExportError(f'--format {fmt!r} is unknown; choose one of {", ".join(FORMATS)}')
  _WRITERS[fmt](directory, config, variables)


def _check_out(out: str, force: bool) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise ExportError(f'--out {out!r} is a file; pass a directory path')
  if os.path.isdir(out) and os.listdir(out) and not force:
    raise ExportError(f'--out {out!r} exists and is not empty; pass --force to replace it, or choose another --out')


def export(workdir: str, fmt: str, out: str, step: Optional[int] = None, force: bool = False) -> list[str]:
  """Writes the run in `workdir` (checkpoint `step`, default the latest) as `fmt` into directory `out`.

  Returns the names of the files written. Every process reads the variables
  (orbax restores each leaf's shards and they are copied to the host leaf by
  leaf); only process 0 writes.
  """
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ExportError(f'--format {fmt!r} is unknown; choose one of {", ".join(FORMATS)}')
  if not workdir:
    raise ExportError('--workdir is required: the training run directory to export')
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)) and '://' not in workdir:
    raise ExportError(f'--workdir {workdir!r} has no checkpoints/ directory: pass a training run\'s workdir')
  out = os.path.abspath(out)
  _check_out(out, force)
  try:
    run_config, variables = checkpoint.load(workdir, step)
  except FileNotFoundError as e:
    raise ExportError(f'{e} (--workdir / --step)') from None
  if jax.process_index() != 0:
    return []
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.partial-', dir=parent)
  try:
    write(fmt, tmp, run_config.model, variables)
    names = sorted(os.listdir(tmp))
    _check_out(out, force)  # again: something may have appeared while we converted
    if os.path.isdir(out):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.old-', dir=parent)
      os.rename(out, os.path.join(old, 'out'))
      os.rename(tmp, out)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return names
