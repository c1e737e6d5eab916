"""clip_jax.tokenize vs open_clip.tokenize: identical ids (tolerance: none)."""

import pickle
import random

import numpy as np
import pytest

import clip_jax
from clip_jax.data import tokenizer as tok_lib

open_clip = pytest.importorskip('open_clip')

_WORDS = tuple('a photo of the dog cat Dog CAT running Running mountain bike 2024 3.14 '
          'hello world test caption image picture big small red blue'.split())
_PIECES = (
    # Contractions, in both cases, plus a stray apostrophe and quote runs.
    "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "DON'T", "o'clock", "''s", "'",
    "it'ſ",  # long s: matches the 's branch only because CLIP's regex ignores case
    # Accents (precomposed and combining), ligatures, fullwidth, curly quotes.
    'café', 'naïve', 'Zürich', 'résumé', 'e\u0301', 'ﬁsh', 'ＡＢＣ１２３', '“quoted”', '‘single’', 'ß', 'İstanbul',
    # Scripts: CJK, kana, Hangul, Cyrillic, Greek (final sigma), Arabic, Hebrew, Thai, Devanagari.
    '東京', '日本語のテキスト', '猫', '서울', '한국어', 'Москва', 'ΟΔΟΣ', 'ελληνικά', 'مرحبا', 'שלום', 'ภาษาไทย', 'हिन्दी',
    # Emoji: single, ZWJ family, skin tone, flag, keycap, with variation selector.
    '🙂', '🐶🐱', '👨‍👩‍👧', '👍🏽', '🇫🇷', '1️⃣', '❤️',
    # HTML entities, single and double escaped, numeric, and with '<' (ftfy leaves those alone).
    '&amp;', '&lt;', '&gt;', '&#39;', '&quot;', '&amp;amp;', '&amp;lt;b&amp;gt;', '&#x27;', '&nbsp;', '&copy;',
    '<b>bold</b>', 'a &lt; b', '&amp;#39;', '&unknown;',
    # Mojibake that ftfy repairs.
    'cafÃ©', 'donâ€™t', 'Ã¼ber',
    # Numbers and digit-like characters.
    '1234567890', '3.14159', '1,000,000', '２０２４', '²', '٣', 'Ⅻ', '½',
    # Punctuation runs and symbols.
    '...', '!?', '--', '@user', '#hashtag', 'http://example.com/a?b=c&d=e', 'a/b\\c', '(x)', '[y]', '{z}', '$5', '100%',
    '~^`|', '©®™',
    # Strings that look like special tokens or the end-of-word marker.
    '<start_of_text>', '<end_of_text>', '<|startoftext|>', '<|endoftext|>', '</w>', 'startoftext',
    # Control characters and odd whitespace.
    '\x00', '\x1b[31mred\x1b[0m', '\x7f', '\xad', '\u200b', '\u200d', '\ufeff', '\x0b', '\x0c', '\x1c', '\x85',
)
_SPACES = (' ', ' ', ' ', '  ', '\t', '\n', '\r\n', ' \t \n ', '\xa0', '\u3000', '\u2028', '')


def _varied_strings(n, seed=0):
  """n deterministic strings covering the cases that break tokenizers."""
  rng = random.Random(seed)
  out = ['', ' ', '\t\n ', 'a', 'A', '!', 'hello world', 'Hello, World!']
  while len(out) < n:
    kind = rng.random()
    if kind < 0.6:  # words, pieces and whitespace mixed
      parts = [rng.choice(_WORDS + _PIECES) for _ in range(rng.randint(1, 12))]
      text = ''.join(p + rng.choice(_SPACES) for p in parts)
      if rng.random() < 0.1:
        text = rng.choice(_SPACES) + text.upper()
    elif kind < 0.75:  # random ASCII, all 128 code points: checks the no-ftfy fast path
      text = ''.join(chr(rng.randrange(128)) for _ in range(rng.randint(0, 40)))
    elif kind < 0.8:  # printable ASCII weighted to letters, spaces and apostrophes
      text = ''.join(rng.choice("abcdeSTRVMLD' &;#0123456789.,!-") for _ in range(rng.randint(1, 60)))
    elif kind < 0.9:  # random code points (no surrogates)
      text = ''.join(chr(rng.choice((rng.randrange(0x20, 0x3000), rng.randrange(0x1F300, 0x1FAFF))))
                     for _ in range(rng.randint(1, 20)))
    else:  # long: well over 77 tokens, so truncation applies
      text = ' '.join(rng.choice(_WORDS + _PIECES) for _ in range(rng.randint(60, 200)))
    out.append(text)
  return out


STRINGS = _varied_strings(1500)


def test_matches_open_clip_on_varied_strings():
  ours = clip_jax.tokenize(STRINGS)
  ref = open_clip.tokenize(STRINGS).numpy()
  assert ours.dtype == np.int32 and ours.shape == (len(STRINGS), 77)
  mismatched = [STRINGS[i] for i in np.flatnonzero((ours != ref).any(axis=1))]
  assert not mismatched, f'{len(mismatched)} strings differ, e.g. {mismatched[:3]!r}'
  # Both branches exercised: strings cut to the context, strings that end early.
  truncated = ours[:, -1] != 0
  assert 50 < truncated.sum() < len(STRINGS) - 500


def test_truncation_keeps_eot_last():
  text = ' '.join(['word'] * 200)
  row = tok_lib.tokenize(text)[0]
  assert row[0] == tok_lib.SOT and row[-1] == tok_lib.EOT
  assert (row[1:-1] == row[1]).all() and row[1] != 0  # 75 copies of 'word', no padding


@pytest.mark.parametrize('context_length', [2, 3, 16, 100])
def test_other_context_lengths(context_length):
  texts = STRINGS[:200]
  ours = tok_lib.tokenize(texts, context_length=context_length)
  ref = open_clip.tokenize(texts, context_length=context_length).numpy()
  assert ours.shape == (200, context_length)
  np.testing.assert_array_equal(ours, ref)


def test_known_ids():
  # Pinned values (from open_clip 3.3), so a broken reference cannot hide a bug.
  np.testing.assert_array_equal(tok_lib.tokenize('a photo of a cat')[0, :7],
                                [49406, 320, 1125, 539, 320, 2368, 49407])
  assert tok_lib.tokenize('')[0, :3].tolist() == [49406, 49407, 0]
  assert tok_lib.tokenize('<start_of_text>')[0, :3].tolist() == [49406, 49406, 49407]


def test_encode_matches_simple_tokenizer():
  ref = open_clip.tokenizer.SimpleTokenizer()
  ours = tok_lib.Tokenizer()
  for text in STRINGS[:300]:
    assert ours.encode(text) == ref.encode(text), repr(text)


def test_small_cache_still_exact():
  tiny = tok_lib.Tokenizer(max_cache=4)  # evicts constantly
  texts = STRINGS[:300]
  np.testing.assert_array_equal(tiny(texts), open_clip.tokenize(texts).numpy())


def test_decode_round_trip():
  for text in ['a photo of a dog', 'hello world', 'café 日本語 🙂', 'x']:
    assert tok_lib.decode(tok_lib.tokenize(text)[0]) == text
  # Pre-tokens are joined by spaces, as in CLIP's own decode.
  assert tok_lib.decode(tok_lib.tokenize("Hello, World! It's")[0]) == "hello , world ! it 's"
  tokenizer = tok_lib.default_tokenizer()
  ids = tokenizer.encode('Two  DOGS\tplaying')
  assert tokenizer.decode(ids) == 'two dogs playing'


def test_decode_matches_open_clip_without_specials():
  ref = open_clip.tokenizer.SimpleTokenizer()
  tokenizer = tok_lib.Tokenizer()
  for text in STRINGS[:300]:
    if '</w>' in text:  # open_clip decodes by replacing the marker in the text
      continue
    ids = [i for i in tokenizer.encode(text) if i < tok_lib.SOT]  # ours skips SOT, stops at EOT
    assert tokenizer.decode(ids) == ref.decode(ids).rstrip(' '), repr(text)


def test_accepts_arrays_tuples_and_pickles():
  texts = np.array(['a dog', 'two cats'])
  expected = open_clip.tokenize(['a dog', 'two cats']).numpy()
  np.testing.assert_array_equal(tok_lib.tokenize(texts), expected)
  np.testing.assert_array_equal(tok_lib.tokenize(('a dog', 'two cats')), expected)
  clone = pickle.loads(pickle.dumps(tok_lib.default_tokenizer()))
  np.testing.assert_array_equal(clone(['a dog', 'two cats']), expected)
  assert tok_lib.tokenize([]).shape == (0, 77)


def test_errors():
  with pytest.raises(TypeError, match=r'texts\[1\] is int'):
    tok_lib.tokenize(['ok', 3])
  with pytest.raises(TypeError, match=r"texts\[0\] is bytes.*decode"):
    tok_lib.tokenize([b'bytes'])
  with pytest.raises(TypeError, match='texts\\[2\\] is NoneType'):
    tok_lib.tokenize(['a', 'b', None])
  with pytest.raises(ValueError, match='context_length must be >= 2'):
    tok_lib.tokenize('a', context_length=1)
  with pytest.raises(TypeError, match='context_length must be an int'):
    tok_lib.tokenize('a', context_length=7.0)
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tok_lib.decode([49408])
  with pytest.raises(ValueError, match='outside the vocabulary'):
    tok_lib.decode([-1])
