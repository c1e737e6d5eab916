"""Caption nouns -> prompts, for GroupViT's multi-label contrastive loss.

GroupViT pairs each image with prompts made from the nouns of its caption
("a photo of a red seven and a two." -> "a photo of a seven.", "a photo of
a two."). NVlabs tags nouns with NLTK's part-of-speech tagger; that needs
model downloads, so this module extracts nouns from a fixed vocabulary
instead, deterministically and offline:

  * the caption is cleaned as the tokenizer cleans it (lowercase, whitespace
    collapsed) and split into words (letter runs, apostrophes kept inside);
  * at each word, the longest vocabulary entry (one or more words) that
    matches there is taken; a final word also matches in a regular plural
    ("sevens", "boxes", "ponies" -> "seven", "box", "pony");
  * nouns are kept in order of first mention, each once, at most
    `max_prompts` of them (the first ones; NVlabs samples among them).

For an arbitrary caption this finds exactly the vocabulary's nouns it names
and nothing else: words outside the vocabulary (including real nouns) are
ignored, and a caption naming none gets no prompts (its image then takes
no part in the multi-label loss). With `vocabulary='digits'` the vocabulary is
the ten digit words, which reads every digits caption, with or without its
colours, as the objects it names (tests/test_groupvit_train.py checks it
against `digits.parse_caption`).

A batch carries the prompts as two fields (`prompt_fields`; both loaders):

  prompt_tokens  int32 [b, K, context_length]  tokenized prompts; an unused
                 slot holds the caption's own tokens (as NVlabs pads), so
                 the text tower's BatchNorm never sees a blank row
  prompt_valid   bool  [b, K]                  which slots are real prompts
"""

import functools
import os
import re
from typing import Iterable, Optional, Sequence, Union

import ml_collections
import numpy as np

from clip_jax.data import digits
from clip_jax.data import tokenizer

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
DEFAULT_TEMPLATE = 'a photo of a {}.'


def default_config() -> ml_collections.ConfigDict:
  """`config.data.prompts`: max_prompts=0 leaves the prompt fields out of the batch."""
  return ml_collections.ConfigDict(dict(
      max_prompts=0,               # K slots per example; 0 = no prompts
      template=DEFAULT_TEMPLATE,   # one '{}' for the noun
      # 'digits' (the ten digit words), a text file (a path; one noun or
      # phrase per line, '#' comments), or a comma-separated list ('dog,cat,traffic light').
      vocabulary='digits',
  ))


def _singular(word: str) -> Optional[str]:
  """The regular singular of a plural-looking word, else None."""
  if word.endswith('ies') and len(word) > 4:
    return word[:-3] + 'y'
  if word.endswith(('ses', 'xes', 'zes', 'ches', 'shes')):
    return word[:-2]
  if word.endswith('s') and not word.endswith('ss') and len(word) > 2:
    return word[:-1]
  return None


class NounExtractor:
  """Vocabulary nouns named by a caption, in order of first mention."""

  def __init__(self, vocabulary: Iterable[str]):
    entries = {}
    for entry in vocabulary:
      words = tuple(_WORD.findall(tokenizer.clean(entry)))
      if words:
        entries.setdefault(words, ' '.join(words))
    if not entries:
      raise ValueError('the noun vocabulary is empty: give at least one noun (config.data.prompts.vocabulary)')
    self._entries = entries
    self._longest = max(len(w) for w in entries)
    self.vocabulary = tuple(entries.values())

  def __call__(self, caption: str, limit: Optional[int] = None) -> list:
    words = _WORD.findall(tokenizer.clean(caption))
    found, i = [], 0
    while i < len(words):
      match = None
      for n in range(min(self._longest, len(words) - i), 0, -1):
        span = words[i:i + n]
        noun = self._entries.get(tuple(span))
        if noun is None:
          singular = _singular(span[-1])
          noun = self._entries.get(tuple(span[:-1]) + (singular,)) if singular else None
        if noun is not None:
          match = (noun, n)
          break
      if match is None:
        i += 1
        continue
      if match[0] not in found:
        found.append(match[0])
        if limit is not None and len(found) == limit:
          break
      i += match[1]
    return found


def _read_vocabulary(spec: str) -> tuple:
  if spec == 'digits':
    return digits.DIGIT_NAMES
  path = os.path.expanduser(spec)
  if os.sep in spec or spec.endswith('.txt'):  # a file, not a list of nouns
    if not os.path.isfile(path):
      raise ValueError(f'config.data.prompts.vocabulary={spec!r}: no such file; give a text file with one noun '
                       "per line, a comma-separated list of nouns, or 'digits'")
    with open(path, encoding='utf-8') as f:
      return tuple(line.strip() for line in f if line.strip() and not line.startswith('#'))
  return tuple(w.strip() for w in spec.split(',') if w.strip())


@functools.lru_cache(maxsize=8)
def extractor(vocabulary: Union[str, Sequence[str]]) -> NounExtractor:
  """The NounExtractor of a `config.data.prompts.vocabulary` value (cached: loaders build it per example)."""
  if isinstance(vocabulary, str):
    words = _read_vocabulary(vocabulary)
    if not words:
      raise ValueError(f"config.data.prompts.vocabulary={vocabulary!r} names no nouns: use 'digits', a text file "
                       "with one noun per line, or a comma-separated list such as 'dog,cat,traffic light'")
    return NounExtractor(words)
  return NounExtractor(tuple(vocabulary))


def validate(c) -> None:
  """`config.data.prompts` checks (a ValueError naming the field and the fix)."""
  k = c.max_prompts
  if isinstance(k, bool) or not isinstance(k, int) or k < 0:
    raise ValueError(f'config.data.prompts.max_prompts={k!r} must be an int >= 0 (0 = no prompts)')
  if k:
    from clip_jax.evaluate import zeroshot  # pylint: disable=g-import-not-at-top
    try:
      zeroshot.check_templates([c.template])
    except (ValueError, TypeError) as e:
      raise ValueError(f'config.data.prompts.template: {e}') from None
    extractor(c.vocabulary)


def settings(c) -> Optional[tuple]:
  """(max_prompts, template, vocabulary) of a `config.data` (None when it makes no prompts): plain values that
  pickle into grain worker processes."""
  p = c.get('prompts')
  if not p or not p.max_prompts:
    return None
  return int(p.max_prompts), str(p.template), str(p.vocabulary)


def prompt_fields(captions: Sequence[str], max_prompts: int, template: str, vocabulary: str,
                  context_length: int) -> dict:
  """{'prompt_tokens' [n, K, L] int32, 'prompt_valid' [n, K] bool} for n captions (see the module doc)."""
  extract = extractor(vocabulary)
  texts, valid = [], np.zeros((len(captions), max_prompts), bool)
  for i, caption in enumerate(captions):
    nouns = extract(caption, limit=max_prompts)
    valid[i, :len(nouns)] = True
    texts += [template.format(noun) for noun in nouns] + [caption] * (max_prompts - len(nouns))
  tokens = tokenizer.tokenize(texts, context_length) if texts else np.zeros((0, context_length), np.int32)
  return {'prompt_tokens': tokens.reshape(len(captions), max_prompts, context_length), 'prompt_valid': valid}
