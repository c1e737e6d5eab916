"""ArrayRecord shards of image-caption records, for the grain loader.

    python -m clip_jax.data.shards --from_folder DIR --out OUT_PREFIX --num_shards N
    python -m clip_jax.data.shards --from_tfds coco_captions:train --caption_key captions/text \\
        [--data_dir D] --out OUT_PREFIX --num_shards N
    python -m clip_jax.data.shards --from_digits train --n 20000 --out OUT_PREFIX --num_shards N

writes OUT_PREFIX-00000-of-0000N.array_record ... (consecutive records in
consecutive shards, so reading the shards in name order gives the input
order). Then set config.data.source='arrayrecord', loader='grain' and
arrayrecord_pattern='OUT_PREFIX-*.array_record'.

--from_folder reads the img2dataset layout, searched recursively: `x.jpg`
(or .jpeg, .png, .webp) with its caption in `x.txt`. Images without a
caption and captions without an image are skipped and counted in the report.
Image bytes are stored as found; a corrupt image is the reader's business
(config.data.on_error).

Record format (one ArrayRecord record per example, no protobuf):

  b'CJR1'                         magic, format version 1
  uint32 little-endian            length H of the header
  H bytes                         header, JSON in UTF-8:
      {"key": str,                 the record's origin (file path, tfds_id, ...)
       "captions": [str, ...],     one or more; training picks one at random
       "image": int,               length of the encoded image (JPEG/PNG/... as stored)
       "arrays": [[name, dtype, shape], ...]}   extra arrays, numpy dtype strings
  image bytes, then each array's bytes (C order, the dtype's byte order), in
  header order; the record ends exactly there.

Digits records carry the arrays mask, boxes, labels, colors, scan_ids and
num_objects (see `digits`), which the pipeline transforms with the crop.
"""

import argparse
import io
import json
import os
import struct
import sys
from typing import Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

MAGIC = b'CJR1'
SUFFIX = '.array_record'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
# Records are read one at a time in random order: one record per chunk keeps a
# random read to one decompression (ArrayRecord's advice for random access).
WRITER_OPTIONS = 'group_size:1'


class CorruptRecordError(ValueError):
  """A record that does not follow the format above."""


class Record(NamedTuple):
  image: bytes
  captions: List[str]
  key: str
  arrays: Dict[str, np.ndarray]


def encode_record(image: bytes, captions: Sequence[str], key: str = '',
                  arrays: Optional[Mapping[str, np.ndarray]] = None) -> bytes:
  """One record's bytes (format in the module docstring)."""
  if isinstance(captions, str):
    captions = [captions]
  arrays = {k: np.asarray(v, order='C') for k, v in (arrays or {}).items()}  # keeps 0-d arrays 0-d
  header = {'key': str(key), 'captions': [str(c) for c in captions], 'image': len(image),
            'arrays': [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]}
  head = json.dumps(header, ensure_ascii=False).encode('utf-8')
  return b''.join([MAGIC, struct.pack('<I', len(head)), head, bytes(image)]
                  + [v.tobytes() for v in arrays.values()])


def decode_record(data: bytes) -> Record:
  """Parses `encode_record`'s bytes; CorruptRecordError when they do not parse."""
  data = bytes(data)
  if len(data) < 8 or data[:4] != MAGIC:
    raise CorruptRecordError(f'does not start with {MAGIC!r} (not a clip_jax shard record)')
  (n,) = struct.unpack('<I', data[4:8])
  try:
    header = json.loads(data[8:8 + n].decode('utf-8'))
    pos = 8 + n
    image = data[pos:pos + int(header['image'])]
    pos += len(image)
    arrays = {}
    for name, dtype, shape in header['arrays']:
      dtype = np.dtype(dtype)
      size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
      arrays[name] = np.frombuffer(data, dtype, int(np.prod(shape, dtype=np.int64)),
                                   pos).reshape(shape) if size else np.zeros(shape, dtype)
      pos += size
    captions = header['captions']
  except (ValueError, KeyError, TypeError) as e:
    raise CorruptRecordError(f'unreadable header or payload ({e})') from None
  if pos != len(data) or len(image) != int(header['image']):
    raise CorruptRecordError(f'payload is {len(data)} bytes, header describes {pos}')
  if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
    raise CorruptRecordError('captions must be a list of strings')
  return Record(image, captions, str(header.get('key', '')), arrays)


def shard_paths(out_prefix: str, num_shards: int) -> List[str]:
  return [f'{out_prefix}-{k:05d}-of-{num_shards:05d}{SUFFIX}' for k in range(num_shards)]


def write_shards(records: Iterable[bytes], num_records: int, out_prefix: str,
                 num_shards: int) -> List[str]:
  """Writes num_records encoded records into num_shards files; the paths.

  Shard k holds the k-th contiguous run of records (sizes differ by at most
  one), so the shards in name order read back in input order.
  """
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter
  if num_shards < 1:
    raise ValueError(f'--num_shards must be >= 1, got {num_shards}')
  if num_records < 1:
    raise ValueError('nothing to write: no records')
  num_shards = min(num_shards, num_records)
  paths = shard_paths(out_prefix, num_shards)
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  q, r = divmod(num_records, num_shards)
  it = iter(records)
  written = 0
  for k, path in enumerate(paths):
    writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    try:
      for _ in range(q + (k < r)):
        writer.write(next(it))
        written += 1
    except StopIteration:
      raise ValueError(f'expected {num_records} records, got {written}') from None
    finally:
      writer.close()
  return paths


# --------------------------------------------------------------- the sources


def folder_pairs(folder: str) -> Tuple[List[Tuple[str, str]], Dict[str, List[str]]]:
  """(image path, caption path) pairs under `folder` (recursive, sorted), and
  {'missing_caption': [...], 'missing_image': [...]} for the unpaired files."""
  images, texts = {}, {}
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in files:
      stem, ext = os.path.splitext(os.path.join(root, name))
      if ext.lower() in IMAGE_EXTENSIONS:
        images.setdefault(stem, os.path.join(root, name))
      elif ext.lower() == '.txt':
        texts[stem] = os.path.join(root, name)
  pairs = [(images[s], texts[s]) for s in sorted(images) if s in texts]
  unpaired = {'missing_caption': sorted(images[s] for s in images if s not in texts),
              'missing_image': sorted(texts[s] for s in texts if s not in images)}
  return pairs, unpaired


def folder_records(pairs) -> Iterator[bytes]:
  for image_path, text_path in pairs:
    with open(image_path, 'rb') as f:
      image = f.read()
    with open(text_path, encoding='utf-8', errors='replace') as f:
      caption = f.read().strip()
    yield encode_record(image, [caption], key=image_path)


def digits_records(split: str, n: int, seed: int = 0, canvas_size: int = 64,
                   num_digits=(1, 3)) -> Iterator[bytes]:
  """DigitsSource(split, n, ...)[i] as records: the image as PNG, the object
  fields as arrays."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from clip_jax.data import digits  # pylint: disable=g-import-not-at-top
  src = digits.DigitsSource(split, n, seed, canvas_size, num_digits)
  for i in range(n):
    ex = src[i]
    png = io.BytesIO()
    Image.fromarray(ex['image']).save(png, 'PNG')
    arrays = {k: ex[k] for k in ('mask', 'boxes', 'labels', 'colors', 'scan_ids', 'num_objects')}
    yield encode_record(png.getvalue(), [ex['caption']], f'digits/{split}/{i}', arrays)


def _children(feature):
  """A feature's sub-features by name (through Sequence wrappers), or None."""
  inner = getattr(feature, 'feature', None)  # tfds.features.Sequence wraps a feature
  if inner is not None and not hasattr(feature, 'keys'):
    feature = inner
  return feature if hasattr(feature, 'keys') else None


def feature_keys(features, path: str) -> Optional[List[str]]:
  """The keys that reach `path` in a TFDS FeaturesDict, or None.

  'captions/text' is ['captions', 'text']; a key that itself contains '/'
  (coco's 'image/filename') matches whole, longest first.
  """
  node = _children(features)
  if node is None:
    return None
  parts = path.split('/')
  for cut in range(len(parts), 0, -1):
    head = '/'.join(parts[:cut])
    if head in node.keys():
      if cut == len(parts):
        return [head]
      rest = feature_keys(node[head], '/'.join(parts[cut:]))
      if rest is not None:
        return [head] + rest
  return None


def tfds_feature(features, path: str):
  """The feature at `path` ('a/b' nested, see feature_keys), or None."""
  keys = feature_keys(features, path)
  if keys is None:
    return None
  for k in keys:
    features = _children(features)[k]
  return features


def tfds_feature_paths(features, prefix: str = '') -> List[str]:
  """Every feature path ('captions/text', ...) of a TFDS FeaturesDict."""
  node = _children(features)
  out = []
  for k in (node.keys() if node is not None else ()):
    out.append(prefix + k)
    out.extend(tfds_feature_paths(node[k], prefix + k + '/'))
  return out


def get_path(example, keys):
  """example[k0][k1]... for keys from feature_keys."""
  for k in keys:
    example = example[k]
  return example


def nested_keys(paths, leaf):
  """{'a': {'b': leaf}} from [['a', 'b']]: the shape TFDS decoders want."""
  out = {}
  for keys in paths:
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def tfds_records(name: str, split: str, data_dir: Optional[str], image_key: str,
                 caption_key: str) -> Tuple[Iterator[bytes], int]:
  """A TFDS split's records (image bytes as stored by TFDS) and their count."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  features = builder.info.features
  for field, key in (('--image_key', image_key), ('--caption_key', caption_key)):
    if tfds_feature(features, key) is None:
      raise ValueError(f'{field} {key!r} is not a feature of {name}; it has: '
                       f'{", ".join(tfds_feature_paths(features))}')
  image_path, caption_path = feature_keys(features, image_key), feature_keys(features, caption_key)
  decoders = tfds.decode.PartialDecoding(
      nested_keys([image_path, caption_path], True),
      decoders=nested_keys([image_path], tfds.decode.SkipDecoding()))
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=True, try_autocache=False))
  count = int(ds.cardinality())

  def gen():
    for ex in tfds.as_numpy(ds):
      captions = [c.decode('utf-8', 'replace') if isinstance(c, bytes) else str(c)
                  for c in np.atleast_1d(get_path(ex, caption_path)).tolist()]
      yield encode_record(get_path(ex, image_path), captions, ex['tfds_id'].decode())
  return gen(), count


def main(argv=None):
  p = argparse.ArgumentParser(
      description='Write image-caption data to ArrayRecord shards for the grain loader.')
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--from_tfds', metavar='NAME[:SPLIT]',
                   help='a TFDS dataset (default split train)')
  src.add_argument('--from_folder', metavar='DIR', help='x.jpg|x.png|x.webp with x.txt captions')
  src.add_argument('--from_digits', metavar='SPLIT', help='the embedded digits: train or test')
  p.add_argument('--out', required=True, help='output prefix: OUT-00000-of-0000N.array_record')
  p.add_argument('--num_shards', type=int, default=1)
  p.add_argument('--data_dir', default=None, help='TFDS data dir')
  p.add_argument('--image_key', default='image', help='TFDS image feature')
  p.add_argument('--caption_key', default='caption', help="TFDS caption feature ('a/b' nested)")
  p.add_argument('--n', type=int, default=20_000, help='digits: number of scenes')
  p.add_argument('--seed', type=int, default=0, help='digits: dataset seed')
  p.add_argument('--canvas_size', type=int, default=64, help='digits: canvas side')
  args = p.parse_args(argv)

  report = {}
  if args.from_folder:
    if not os.path.isdir(args.from_folder):
      p.error(f'--from_folder {args.from_folder!r} is not a directory')
    pairs, unpaired = folder_pairs(args.from_folder)
    report = {k: len(v) for k, v in unpaired.items()}
    for kind, paths in unpaired.items():
      for path in paths[:10]:
        print(f'skipped ({kind.replace("_", " ")}): {path}', file=sys.stderr)
    if not pairs:
      p.error(f'no image + caption pairs under {args.from_folder}')
    records, count = folder_records(pairs), len(pairs)
  elif args.from_tfds:
    name, _, split = args.from_tfds.partition(':')
    records, count = tfds_records(name, split or 'train', args.data_dir, args.image_key,
                                  args.caption_key)
  else:
    records = digits_records(args.from_digits, args.n, args.seed, args.canvas_size)
    count = args.n
  paths = write_shards(records, count, args.out, args.num_shards)
  summary = {'records': count, 'shards': len(paths), 'skipped': report,
             'pattern': f'{args.out}-*-of-{len(paths):05d}{SUFFIX}'}
  print(json.dumps(summary))
  return summary


if __name__ == '__main__':
  main()
