"""Tokenizer throughput: clip_jax.tokenize beside open_clip's, same corpus, same run.

The corpus mimics web alt-text: mostly short English captions, with a share
of accents, CJK, emoji, HTML entities, odd whitespace and over-long strings,
since those take the slow (ftfy) path in both implementations. Rounds
alternate the two tokenizers so that machine noise hits both alike; the
first, cold round uses fresh tokenizers (empty caches) and is reported apart
from the warm rounds, whose median is the headline.
"""

import gc
import random
import statistics
import time

import numpy as np

from clip_jax.data import tokenizer as clip_tokenizer

_WORDS = (
    'a an the photo picture image of on in with and at by for two three small large red blue green '
    'black white old new cat dog man woman child people car bus train street beach mountain city '
    'house table chair plate food pizza sandwich kitchen room window tree flower field sky snow '
    'water river boat plane bird horse sheep cow elephant giraffe zebra bear playing sitting '
    'standing walking riding holding looking eating wearing next top front behind near during '
    'vintage sale free shipping stock vector illustration isolated background closeup portrait').split()
_ODD = ('café', 'naïve', 'Zürich', 'São Paulo', 'crème brûlée', '東京', '猫の写真', '北京烤鸭', '서울',
        'Москва', 'ελληνικά', '🙂', '🐶🐱', '❤️', '&amp;', '&lt;3', '&#39;', '&amp;quot;', '—', '“quoted”')
_PUNCT = ('.', ',', '!', '?', ':', ';', ' -', '...', "'s", "'t", "'re", ' (2019)', ' #tag', ' @user')


def make_corpus(n: int, seed: int = 0) -> list:
  """n deterministic caption-like strings."""
  rng = random.Random(seed)
  corpus = []
  for _ in range(n):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 18))]
    if rng.random() < 0.3:
      words[0] = words[0].capitalize()
    if rng.random() < 0.2:
      words.insert(rng.randrange(len(words)), str(rng.randint(0, 5000)))
    if rng.random() < 0.15:
      words.insert(rng.randrange(len(words)), rng.choice(_ODD))
    text = ' '.join(words) + rng.choice(_PUNCT)
    if rng.random() < 0.05:
      text = text.replace(' ', rng.choice(('  ', '\t', '\n')))
    if rng.random() < 0.03:
      text = ' '.join([text] * 6)  # longer than the context: exercises truncation
    corpus.append(text)
  return corpus


def _time(fn, corpus):
  gc.collect()  # start each timing from a clean heap so a collection lands on neither side by chance
  start = time.perf_counter()
  out = fn(corpus)
  return time.perf_counter() - start, out


def run(n: int = 5000, rounds: int = 5, seed: int = 0, context_length: int = 77) -> dict:
  """Times both tokenizers; returns strings/s per round and the warm medians."""
  import open_clip  # pylint: disable=g-import-not-at-top  # optional reference
  from open_clip import tokenizer as oc_tokenizer  # pylint: disable=g-import-not-at-top

  corpus = make_corpus(n, seed)
  ours_cold = clip_tokenizer.Tokenizer()
  theirs_cold = oc_tokenizer.SimpleTokenizer()
  t_ours_cold, ours_ids = _time(lambda c: ours_cold(c, context_length), corpus)
  t_theirs_cold, theirs_ids = _time(lambda c: theirs_cold(c, context_length), corpus)
  if not np.array_equal(ours_ids, theirs_ids.numpy()):
    raise AssertionError('clip_jax and open_clip token ids differ on the benchmark corpus')
  tokens = int((ours_ids != 0).sum())
  slow = sum(clip_tokenizer._NEEDS_FIXING.search(t) is not None for t in corpus)  # pylint: disable=protected-access

  ours_warm, theirs_warm = [], []
  for _ in range(rounds):
    ours_warm.append(_time(lambda c: clip_tokenizer.tokenize(c, context_length), corpus)[0])
    theirs_warm.append(_time(lambda c: open_clip.tokenize(c, context_length), corpus)[0])
  return {
      'n': n, 'tokens': tokens, 'rounds': rounds, 'slow_path': slow / n,
      'cold': (n / t_ours_cold, n / t_theirs_cold),
      'warm': [(n / a, n / b) for a, b in zip(ours_warm, theirs_warm)],
      'median': (n / statistics.median(ours_warm), n / statistics.median(theirs_warm)),
  }


def main(args) -> None:
  result = run(n=args.n, rounds=args.rounds, seed=args.seed)
  n, tokens = result['n'], result['tokens']
  print(f'corpus: {n} strings, {tokens} tokens (incl. SOT/EOT), ids identical to open_clip; '
        f'{result["slow_path"]:.0%} need ftfy (non-ASCII or \'&\')')
  print(f'{"":14s}{"clip_jax str/s":>16s}{"open_clip str/s":>17s}{"ratio":>8s}')

  def row(label, ours, theirs):
    print(f'{label:14s}{ours:16,.0f}{theirs:17,.0f}{ours / theirs:8.2f}x')

  row('cold (1st)', *result['cold'])
  for i, (ours, theirs) in enumerate(result['warm']):
    row(f'warm round {i + 1}', ours, theirs)
  ours, theirs = result['median']
  row('warm median', ours, theirs)
  print(f'tokens/s (warm median): clip_jax {ours * tokens / n:,.0f}, open_clip {theirs * tokens / n:,.0f}')


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser('tokenizer', help='clip_jax.tokenize vs open_clip.tokenize throughput')
  parser.add_argument('--n', type=int, default=5000, help='corpus size (strings)')
  parser.add_argument('--rounds', type=int, default=5, help='warm rounds, alternating the two')
  parser.add_argument('--seed', type=int, default=0, help='corpus seed')
  parser.set_defaults(func=main)
