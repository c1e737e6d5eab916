"""CLIP's byte-level BPE tokenizer: strings -> int32 [N, context_length] ids.

Behaves id-for-id like `open_clip.tokenize` (itself OpenAI's CLIP tokenizer):

  1. clean: ftfy.fix_text, html.unescape twice, collapse whitespace runs to
     one space (and strip), lowercase;
  2. pre-tokenise with CLIP's regex (special tokens, the 's 't 're 've 'm 'll
     'd contractions, letter runs, single digits, runs of anything else;
     whitespace is dropped);
  3. map each pre-token's UTF-8 bytes to printable stand-in characters and
     apply the BPE merges (lowest rank first, all occurrences per pass);
  4. row = [SOT] + ids + [EOT], zero padded; an over-long row is cut to
     context_length with EOT forced into the last slot.

The vocabulary (49408 ids): the 256 byte symbols, the same 256 with the
end-of-word marker '</w>', the first 48894 merges, then SOT=49406, EOT=49407.
Pad is 0, which is also the id of '!': the text tower finds the end of a row
by argmax (EOT is the largest id), never by looking for padding.

The special tokens are spelled as open_clip spells them ('<start_of_text>',
'<end_of_text>'): text containing exactly that string gets the special id,
as it does in open_clip. (OpenAI's original spells them '<|startoftext|>';
its regex then splits on the '|', so the two references already disagree on
text containing '<', '>', 'startoftext' or 'endoftext'; we follow open_clip.)

Speed: the tokenizer sits in input pipelines, so the hot path is a dict
lookup per whitespace-delimited chunk. That is exact because no pre-token
spans a space (no regex alternative matches whitespace), so a chunk's ids do
not depend on its neighbours. Chunks seen before cost one lookup; new chunks
run the regex, and each new pre-token runs BPE once (a second cache). Plain
printable ASCII without '&' skips ftfy and html.unescape, which are the
identity on such text (tests/test_tokenizer.py fuzzes that claim against
open_clip) and dominate the cost otherwise.
"""

import functools
import gzip
import html
import importlib.resources
import re
import threading
from typing import Iterable, Optional, Sequence, Union

import ftfy
import numpy as np
import regex

VOCAB_FILE = 'bpe_simple_vocab_16e6.txt.gz'
NUM_MERGES = 48894
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
SOT = VOCAB_SIZE - 2  # 49406
EOT = VOCAB_SIZE - 1  # 49407
DEFAULT_CONTEXT_LENGTH = 77
SPECIAL_TOKENS = ('<start_of_text>', '<end_of_text>')
_END_OF_WORD = '</w>'

# CLIP's pre-tokeniser. IGNORECASE is kept for parity even though the text is
# already lowercased: it still makes e.g. "'ſ" (long s) match the 's branch.
_PRETOKEN = regex.compile(
    '|'.join(regex.escape(t) for t in SPECIAL_TOKENS)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)

# Anything outside printable ASCII + \t\n\r, or an '&': text that ftfy or
# html.unescape could change. Text without any of these skips both.
_NEEDS_FIXING = re.compile(r'[^\t\n\r\x20-\x25\x27-\x7e]')

# Entries per cache. Caches are cleared when full: simple, and the hot words
# of a caption corpus refill them within a batch or two. 65k entries are a
# few MB to ~20 MB per tokenizer, i.e. per input-pipeline worker process.
_MAX_CACHE = 1 << 16


def _is_printable(b: int) -> bool:
  """Bytes whose Latin-1 character is visible (not space, control, soft hyphen)."""
  return 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255


def _byte_order() -> list:
  """The 256 byte values in vocabulary order: printable ones first."""
  return [b for b in range(256) if _is_printable(b)] + [b for b in range(256) if not _is_printable(b)]


def _byte_symbols() -> dict:
  """byte -> the one printable character that stands for it inside BPE.

  Printable bytes stand for their Latin-1 character; the rest are moved, in
  byte order, to code points 256, 257, ... so that no symbol is whitespace
  or a control character.
  """
  moved = [b for b in range(256) if not _is_printable(b)]
  symbols = {b: chr(b) for b in range(256) if _is_printable(b)}
  symbols.update({b: chr(256 + i) for i, b in enumerate(moved)})
  return symbols


@functools.lru_cache(maxsize=None)
def _load_vocab():
  """(symbol -> id, merge ranks, id -> bytes for decoding, byte -> symbol); read once."""
  data = importlib.resources.files('clip_jax').joinpath('assets', VOCAB_FILE).read_bytes()
  lines = gzip.decompress(data).decode('utf-8').split('\n')
  # Line 0 is a version header; the vocabulary uses only the first merges.
  merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f'{VOCAB_FILE}: expected {NUM_MERGES} merge lines of two symbols each')
  byte_symbols = _byte_symbols()
  base = [byte_symbols[b] for b in _byte_order()]
  vocab = base + [s + _END_OF_WORD for s in base] + [a + b for a, b in merges] + list(SPECIAL_TOKENS)
  assert len(vocab) == VOCAB_SIZE
  encoder = {s: i for i, s in enumerate(vocab)}
  ranks = {pair: r for r, pair in enumerate(merges)}

  # Decoding table: each id's bytes, with the end-of-word marker as a space.
  symbol_bytes = {s: bytes([b]) for b, s in byte_symbols.items()}
  decoded = []
  for s in vocab[:-2]:
    word_end = s.endswith(_END_OF_WORD)
    core = s[:-len(_END_OF_WORD)] if word_end else s
    decoded.append(b''.join(symbol_bytes[c] for c in core) + (b' ' if word_end else b''))
  decoded += [t.encode('utf-8') for t in SPECIAL_TOKENS]
  # byte_symbols doubles as the str.translate table that maps a UTF-8 byte
  # (seen as a Latin-1 code point) to its symbol.
  return encoder, ranks, decoded, byte_symbols


def clean(text: str) -> str:
  """CLIP's text normalisation (ftfy, html unescape x2, whitespace, lowercase)."""
  if _NEEDS_FIXING.search(text) is not None:
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return ' '.join(text.split()).lower()


def _clean_chunks(text: str) -> list:
  """clean(text).split(' '), the whitespace-free chunks that BPE sees."""
  if _NEEDS_FIXING.search(text) is None:
    # Plain ASCII: ftfy and unescape are the identity, and lowercasing
    # commutes with collapsing whitespace, so one split does it.
    return text.lower().split()
  return clean(text).split(' ')


def _merge(symbols: list, ranks: dict) -> list:
  """Applies BPE merges to one pre-token's symbols until none applies."""
  while len(symbols) > 1:
    best = None
    best_rank = NUM_MERGES  # ranks run 0 .. NUM_MERGES - 1; this means 'no merge'
    for pair in zip(symbols, symbols[1:]):
      rank = ranks.get(pair, NUM_MERGES)
      if rank < best_rank:
        best, best_rank = pair, rank
    if best is None:
      break
    first, second = best
    merged = []
    i, n = 0, len(symbols)
    while i < n:
      # Left to right, non-overlapping: 'a a a' + (a, a) -> 'aa a'.
      if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
        merged.append(first + second)
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return symbols


class Tokenizer:
  """CLIP BPE tokenizer with per-chunk and per-word caches.

  Thread-safe for concurrent use (the caches are plain dicts mutated under
  the GIL). Pickles cheaply: the vocabulary is re-read from package data, not
  copied, so it can ride along in multi-process input pipelines.
  """

  def __init__(self, max_cache: int = _MAX_CACHE):
    self._max_cache = max_cache
    self._encoder, self._ranks, self._decoded, self._to_symbols = _load_vocab()
    self._special = {t: (self._encoder[t],) for t in SPECIAL_TOKENS}
    self._chunks = {}  # whitespace-free chunk of cleaned text -> ids
    self._words = {}   # pre-token -> ids

  def __reduce__(self):
    return (Tokenizer, (self._max_cache,))

  def _encode_word(self, word: str) -> tuple:
    ids = self._special.get(word)
    if ids is not None:
      return ids
    # UTF-8 bytes -> stand-in symbols; the last one carries the word end.
    symbols = list(word.encode('utf-8').decode('latin-1').translate(self._to_symbols))
    symbols[-1] += _END_OF_WORD
    encoder = self._encoder
    ids = tuple(encoder[s] for s in _merge(symbols, self._ranks))
    if len(self._words) >= self._max_cache:
      self._words.clear()
    self._words[word] = ids
    return ids

  def _encode_chunk(self, chunk: str) -> tuple:
    ids = []
    words = self._words
    for word in _PRETOKEN.findall(chunk):
      piece = words.get(word)
      ids.extend(piece if piece is not None else self._encode_word(word))
    ids = tuple(ids)
    if len(self._chunks) >= self._max_cache:
      self._chunks.clear()
    self._chunks[chunk] = ids
    return ids

  def encode(self, text: str) -> list:
    """Token ids of one string, without SOT/EOT and without truncation."""
    if not isinstance(text, str):
      raise TypeError(f'encode: expected str, got {type(text).__name__}')
    ids = []
    chunks = self._chunks
    for chunk in _clean_chunks(text):
      piece = chunks.get(chunk)
      ids.extend(piece if piece is not None else self._encode_chunk(chunk))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of token ids: SOT is skipped, decoding stops at the first EOT.

    So a padded row from `__call__` decodes to its text. Word ends become
    spaces (the trailing one is dropped); bytes that are not valid UTF-8 (a
    multi-byte character cut by truncation) become U+FFFD.
    """
    decoded = self._decoded
    pieces = []
    for i in ids:
      i = int(i)
      if i == EOT:
        break
      if i == SOT:
        continue
      if not 0 <= i < VOCAB_SIZE:
        raise ValueError(f'decode: token id {i} is outside the vocabulary [0, {VOCAB_SIZE})')
      pieces.append(decoded[i])
    return b''.join(pieces).decode('utf-8', errors='replace').rstrip(' ')

  def __call__(self, texts: Union[str, Sequence[str]],
               context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """int32 [N, context_length]: [SOT] + ids + [EOT], zero padded.

    A string with more than context_length - 2 ids keeps its first
    context_length - 2 and still ends in EOT (open_clip's truncation).
    """
    if isinstance(texts, str):
      texts = [texts]
    elif not isinstance(texts, (list, tuple)):
      texts = list(texts)  # numpy arrays of str, generators
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
      raise TypeError(f'context_length must be an int, got {type(context_length).__name__}')
    if context_length < 2:
      raise ValueError(f'context_length must be >= 2 (room for SOT and EOT), got {context_length}')
    keep = context_length - 2
    # Ids of all rows go into one flat list and are scattered into the output
    # by a single masked assignment: cheaper than a numpy write per row.
    flat = []
    lengths = []
    chunks, encode_chunk = self._chunks, self._encode_chunk
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        hint = " (decode bytes first, e.g. b.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ''
        raise TypeError(f'tokenize: texts[{i}] is {type(text).__name__}, expected str{hint}')
      ids = [SOT]
      for chunk in _clean_chunks(text):  # inlined encode(): this is the hot loop
        piece = chunks.get(chunk)
        ids.extend(piece if piece is not None else encode_chunk(chunk))
      if len(ids) > keep + 1:
        del ids[keep + 1:]
      ids.append(EOT)
      flat.extend(ids)
      lengths.append(len(ids))
    out = np.zeros((len(texts), context_length), np.int32)
    out[np.arange(context_length) < np.array(lengths)[:, None]] = flat
    return out


_DEFAULT: Optional[Tokenizer] = None
_DEFAULT_LOCK = threading.Lock()


def default_tokenizer() -> Tokenizer:
  """The shared Tokenizer, built on first use (reads the vocabulary once)."""
  global _DEFAULT
  if _DEFAULT is None:
    with _DEFAULT_LOCK:
      if _DEFAULT is None:
        _DEFAULT = Tokenizer()
  return _DEFAULT


def tokenize(texts: Union[str, Sequence[str]],
             context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
  """CLIP token ids, int32 [N, context_length]; see Tokenizer.__call__."""
  return default_tokenizer()(texts, context_length)


def decode(ids: Iterable[int]) -> str:
  """Text of one row of token ids; see Tokenizer.decode."""
  return default_tokenizer().decode(ids)


def vocabulary() -> tuple[list, list]:
  """(the 49408 BPE symbols in id order, the merges as (a, b) pairs in rank order): what
  exporters write as a Hugging Face tokenizer's vocab.json / merges.txt."""
  encoder, ranks, _, _ = _load_vocab()
  return sorted(encoder, key=encoder.get), sorted(ranks, key=ranks.get)
