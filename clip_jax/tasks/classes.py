"""The class vocabulary of the supervised objectives (LSeg, ViLD): `config.classes`.

  names       class names; label id i (a mask value, a box label) is names[i]
  template    the prompt each name is put in before the frozen CLIP text tower embeds it
  train_ids   the ids annotated in training (LSeg's seen classes, ViLD's base classes); the others
              are held out: their names are not in the training classifier and their pixels /
              boxes are ignored, so they can only be recognised zero-shot, by name. Empty: all.

A training label maps to its position in train_ids (`train_lookup`); a held-
out label maps to HELD_OUT and a label outside [0, len(names)) to INVALID,
which the tasks ignore and count (metrics `held_out_*`, `invalid_*`).
"""

import dataclasses

import ml_collections
import numpy as np

from clip_jax.data import digits as digits_data
from clip_jax.data import tokenizer

HELD_OUT = -1
INVALID = -2


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(names=(), template='a photo of a {}.', train_ids=()))


# The background's name in the digits masks' vocabulary. With the digits CLIP's text tower, the
# prompt 'a photo of a background.' lands at cosine 0.93 of 'a photo of a two.' (the word never
# occurs in a caption), which a frozen-text LSeg cannot tell apart; 'black background' stays at
# <= 0.29 of every digit (digit prompts are <= 0.74 of each other).
DIGITS_BACKGROUND = 'black background'


def digits_config(train_ids, background: str = '') -> ml_collections.ConfigDict:
  """The digits vocabulary: (background, 'zero', ..., 'nine') with a background name (the mask
  encoding: 0 = background, 1 + d = digit d), else the ten digit names (the box labels)."""
  names = ((background,) if background else ()) + digits_data.DIGIT_NAMES
  return ml_collections.ConfigDict(dict(names=names, template='a photo of a {}.', train_ids=tuple(train_ids)))


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  names: tuple
  template: str
  train_ids: tuple

  @property
  def held_out_ids(self) -> tuple:
    return tuple(i for i in range(len(self.names)) if i not in self.train_ids)

  def prompts(self, ids=None) -> list:
    ids = range(len(self.names)) if ids is None else ids
    return [self.template.format(self.names[i]) for i in ids]

  def tokens(self, ids, context_length: int) -> np.ndarray:
    """[len(ids), context_length] int32 prompt tokens of the classes `ids`."""
    return tokenizer.tokenize(self.prompts(ids), context_length)

  def train_lookup(self, size: int = 256) -> np.ndarray:
    """int32 [size]: label id -> index among train_ids, HELD_OUT, or INVALID (beyond the names)."""
    lut = np.full((size,), INVALID, np.int32)
    lut[:len(self.names)] = HELD_OUT
    for k, i in enumerate(self.train_ids):
      lut[i] = k
    return lut


def from_config(config) -> Vocabulary:
  """The validated vocabulary of `config.classes`."""
  c = config.get('classes')
  if not c or not c.get('names'):
    raise ValueError('config.classes.names is empty: name the classes (label id i = names[i]), e.g. '
                     "clip_jax.tasks.classes.digits_config(range(8), background='black background')")
  names = tuple(c.names)
  if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
    raise ValueError(f'config.classes.names={names!r}: give distinct non-empty strings')
  template = c.get('template', 'a photo of a {}.')
  if template.count('{}') != 1:
    raise ValueError(f"config.classes.template={template!r} must contain exactly one '{{}}' for the class name")
  train_ids = tuple(int(i) for i in c.get('train_ids', ())) or tuple(range(len(names)))
  if len(set(train_ids)) != len(train_ids) or not all(0 <= i < len(names) for i in train_ids):
    raise ValueError(f'config.classes.train_ids={train_ids}: give distinct label ids in [0, {len(names)}) '
                     f'(the classes are {names})')
  if len(names) > 255:
    raise ValueError(f'config.classes.names has {len(names)} names; masks are uint8, so at most 255 classes')
  return Vocabulary(names, template, train_ids)
