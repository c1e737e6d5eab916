"""LSeg evaluation: seen / unseen mIoU on held-out digits canvases, labelled by class name.

Every pixel takes the argmax over ALL of config.classes.names (the generalised
zero-shot setting: an unseen class competes with the seen ones and the
background), scored by LSeg against the frozen text tower's embeddings of the
names' prompts. The canvases are built from test-split scans, never drawn into
training scenes. IoU accumulates over the whole set (TP / (TP + FP + FN) per
class, clip_jax.evaluate.segmentation.confusion); the summary splits it:

  miou_seen     mean IoU of the training classes other than label 0 (digits 0-6)
  miou_unseen   mean IoU of the held-out classes (digits 7-9): zero-shot, by name
  hiou          their harmonic mean (the zero-shot segmentation literature's summary)
  iou_background, miou (all classes that occur)

A second protocol scores the held-out classes alone, LSeg's "any label set at
inference": every pixel is labelled among the background and the held-out names
only, and pixels of seen digits are left out (`unseen_only`). Its control permutes
the held-out names (seven's embedding stands for eight, ...): an encoder that
segments by name scores well above its permuted self, one that merely finds
foreground does not.

`python -m clip_jax.evaluate lseg --workdir RUN` prints both beside the
all-background prediction (which scores 0 on every digit) and writes PNG panels.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from clip_jax import checkpoint, models
from clip_jax.data import augment, transforms
from clip_jax.evaluate import draw, embed
from clip_jax.evaluate import segmentation as seg_metrics
from clip_jax.tasks import classes as classes_lib


def default_config() -> ml_collections.ConfigDict:
  """`config.eval.lseg` (num_images=0 turns it off during training)."""
  return ml_collections.ConfigDict(dict(num_images=500, num_digits=(1, 3), seed=4321, batch_size=50))


@functools.lru_cache(maxsize=8)
def _predict_fn(model, mesh):
  out = None if mesh is None else NamedSharding(mesh, PartitionSpec())

  def predict(variables, images, class_embeddings):
    logits = model.apply(variables, transforms.normalize(images), class_embeddings)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.jit(predict, out_shardings=out)


def class_embeddings(model, variables, vocab: classes_lib.Vocabulary, context_length: int) -> np.ndarray:
  """[C, D] unit embeddings of every class's prompt, from the model's own (frozen) text tower."""
  encode = embed.encoder(model, variables, 'encode_text')
  return encode(vocab.tokens(range(len(vocab.names)), context_length))


def segment(model, variables, images: np.ndarray, classes: np.ndarray, batch_size: int) -> np.ndarray:
  """Label masks [N, S, S] uint8 (index into `classes` [C, D]) of uint8 canvases [N, S, S, 3]."""
  mesh = embed.mesh_of(variables)
  predict = _predict_fn(model, mesh)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:  # one shape: one compile
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    pred = predict(variables, embed.place(chunk, mesh), jnp.asarray(classes))
    out.append(np.asarray(pred)[:n].astype(np.uint8))
  return np.concatenate(out)


def summarize(conf: np.ndarray, vocab: classes_lib.Vocabulary) -> dict:
  """The summary of a confusion matrix over the vocabulary's classes (see the module docstring)."""
  per_class = seg_metrics.iou(conf)
  seen = [i for i in vocab.train_ids if i != 0]
  unseen = list(vocab.held_out_ids)
  mean = lambda ids: float(np.nanmean(per_class[ids])) if ids and not np.all(np.isnan(per_class[ids])) else 0.0
  s, u = mean(seen), mean(unseen)
  return dict(miou_seen=s, miou_unseen=u, hiou=2 * s * u / (s + u) if s + u > 0 else 0.0,
              iou_background=float(np.nan_to_num(per_class[0])), miou=float(np.nanmean(per_class)),
              iou=[None if np.isnan(v) else float(v) for v in per_class])


def unseen_only(model, variables, images, masks, classes, vocab, batch_size: int, permute: bool = False) -> dict:
  """{'miou_unseen', 'iou_background', 'iou'} labelling pixels among background + the held-out names only.

  Pixels whose truth is a seen digit are left out. permute=True rolls the held-out names' embeddings by
  one (the control: names that do not match the shapes).
  """
  held = list(vocab.held_out_ids)
  source = held[1:] + held[:1] if permute else held
  pred = segment(model, variables, images, classes[[0] + source], batch_size)  # index into [0] + held
  labels = np.asarray([0] + held, np.uint8)[pred]
  keep = ~np.isin(masks, [i for i in vocab.train_ids if i != 0])
  per_class = seg_metrics.iou(seg_metrics.confusion(masks[keep], labels[keep], len(vocab.names)))
  return dict(miou_unseen=float(np.nanmean(per_class[held])), iou_background=float(per_class[0]),
              iou=[None if np.isnan(per_class[i]) else float(per_class[i]) for i in held])


def _test_set(e, canvas_size: int, image_size: int):
  """(canvases, masks) of the held-out scenes at the model's input size (the eval geometry; masks nearest)."""
  images, masks = seg_metrics.test_scenes(int(e.num_images), int(e.seed), canvas_size, tuple(e.num_digits))
  if images.shape[1] != image_size:
    pairs = [augment.center_crop(x, image_size, m) for x, m in zip(images, masks)]
    images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
  return images, masks


def evaluate(model, variables, config) -> dict:
  """The summary on config.eval.lseg's test canvases (the trainer's periodic / final eval)."""
  e = config.eval.lseg
  vocab = classes_lib.from_config(config)
  images, masks = _test_set(e, config.data.digits.canvas_size, config.model.vision.image_size)
  check_masks(masks, len(vocab.names))
  classes = class_embeddings(model, variables, vocab, models.context_length(config.model))
  pred = segment(model, variables, images, classes, int(e.batch_size))
  out = summarize(seg_metrics.confusion(masks, pred, len(vocab.names)), vocab)
  out.pop('iou')
  return out


def check_masks(masks: np.ndarray, num_classes: int):
  bad = masks >= num_classes
  if bad.any():
    raise ValueError(f'{int(bad.sum())} mask pixels have class ids >= {num_classes} (config.classes.names has '
                     f'{num_classes} names): e.g. {sorted(set(masks[bad].tolist()))[:5]}; fix the mask encoding '
                     'or add the names')


# --- the CLI -----------------------------------------------------------------------------------

def add_parser(commands):
  p = commands.add_parser('lseg', help='LSeg seen / unseen mIoU on held-out digits canvases, with PNG overlays')
  p.add_argument('--workdir', required=True, help='an LSeg training run directory')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add_argument('--num_images', type=int, default=None, help="test canvases (default: the run's eval.lseg)")
  p.add_argument('--seed', type=int, default=None, help='which test canvases')
  p.add_argument('--batch_size', type=int, default=None)
  p.add_argument('--out', default=None, help='output directory (default WORKDIR/lseg)')
  p.add_argument('--num_png', type=int, default=16, help='overlay panels to write (0: none)')


def run(args) -> dict:
  """Prints the table; writes scores.json, masks/{truth,lseg}/NNN.png and panels/NNN.png."""
  if args.num_png < 0:
    raise ValueError(f'--num_png={args.num_png} must be >= 0')
  config, variables = checkpoint.load(args.workdir, args.step)
  if config.model.name != 'lseg':
    raise ValueError(f'--workdir {args.workdir} is a {config.model.name!r} run; `lseg` evaluates LSeg runs '
                     '(GroupViT: `segment`)')
  e = default_config()
  e.update(config.eval.get('lseg') or {})
  for field in ('num_images', 'seed', 'batch_size'):
    if getattr(args, field) is not None:
      e[field] = getattr(args, field)
  if e.num_images < 1 or e.batch_size < 1:
    raise ValueError(f'--num_images={e.num_images} and --batch_size={e.batch_size} must be >= 1')
  vocab = classes_lib.from_config(config)
  model = models.build(config.model)
  images, masks = _test_set(e, config.data.digits.canvas_size, config.model.vision.image_size)
  check_masks(masks, len(vocab.names))
  classes = class_embeddings(model, variables, vocab, models.context_length(config.model))
  pred = segment(model, variables, images, classes, int(e.batch_size))
  scores = {'lseg': summarize(seg_metrics.confusion(masks, pred, len(vocab.names)), vocab),
            'all-background': summarize(seg_metrics.confusion(masks, np.zeros_like(masks), len(vocab.names)), vocab)}
  unseen = ', '.join(vocab.names[i] for i in vocab.held_out_ids)
  print(f'{len(images)} held-out canvases, {len(vocab.names)} classes; unseen in training: {unseen}')
  print(f'{"method":<16}{"seen":>8}{"unseen":>8}{"hIoU":>8}{"backgr":>8}{"mIoU":>8}')
  for name, s in scores.items():
    print(f'{name:<16}{s["miou_seen"]:>8.4f}{s["miou_unseen"]:>8.4f}{s["hiou"]:>8.4f}{s["iou_background"]:>8.4f}'
          f'{s["miou"]:>8.4f}')
  print('per-class IoU (lseg): ' + ', '.join(
      f'{n}{"*" if i in vocab.held_out_ids else ""} {v:.3f}' for i, (n, v) in
      enumerate(zip(vocab.names, scores['lseg']['iou'])) if v is not None))
  if vocab.held_out_ids:
    bs = int(e.batch_size)
    scores['unseen_only'] = unseen_only(model, variables, images, masks, classes, vocab, bs)
    scores['unseen_only_permuted'] = unseen_only(model, variables, images, masks, classes, vocab, bs, permute=True)
    print(f'label set = {vocab.names[0]} + {unseen} only (seen-digit pixels left out):')
    for name, title in (('unseen_only', 'lseg'), ('unseen_only_permuted', 'names permuted')):
      s = scores[name]
      print(f'  {title:<16} unseen mIoU {s["miou_unseen"]:.4f}  per class ' +
            ' '.join(f'{v:.3f}' for v in s['iou'] if v is not None) + f'  background {s["iou_background"]:.4f}')

  out = args.out or os.path.join(args.workdir, 'lseg')
  for name, arrays in (('truth', masks), ('lseg', pred)):
    folder = os.path.join(out, 'masks', name)
    os.makedirs(folder, exist_ok=True)
    for i, m in enumerate(arrays):
      Image.fromarray(m, 'L').save(os.path.join(folder, f'{i:03d}.png'))
  names = [n + ('*' if i in vocab.held_out_ids else '') for i, n in enumerate(vocab.names)]
  for i in range(min(args.num_png, len(images))):
    draw.save(draw.segmentation_panel(images[i], masks[i], {'lseg': pred[i]}, names),
              os.path.join(out, 'panels', f'{i:03d}.png'))
  with open(os.path.join(out, 'scores.json'), 'w') as f:
    json.dump(dict(scores, settings=dict(e.to_dict(), num_digits=list(e.num_digits))), f, indent=1)
  print(f'label masks, scores and {min(args.num_png, len(images))} PNG panels in {out}')
  return scores
