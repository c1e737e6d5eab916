"""`python -m clip_jax.evaluate segment`: zero-shot segmentation of held-out digits canvases.

  python -m clip_jax.evaluate segment --workdir runs/groupvit --baseline runs/groupvit_clip

Scores the run in --workdir (GroupViT, or a CLIP ViT with the patch
baseline) and, with --baseline, a second run on the same canvases, plus the
all-background prediction; prints one table of mIoU (background + the ten
digits), background IoU and the digits' mean IoU, then per-class IoU. The
canvases come from the test split (scans never drawn into training scenes),
at the first run's canvas size; every model sees them resized to its own
input. Settings default to the first run's config.eval.segmentation (else
clip_jax.evaluate.segmentation.default_config()); the flags override them.
Written to --out (default WORKDIR/segment):

  panels/NNN.png          the first --num_png canvases, every method side by side
                          (clip_jax.evaluate.overlay)
  masks/truth/NNN.png     label masks of every canvas, one byte per pixel:
  masks/<method>/NNN.png  0 background, 1 + d digit d (the digits encoding)
  scores.json             the printed numbers
"""

import json
import os
import re

import numpy as np
from PIL import Image

from clip_jax import checkpoint, models
from clip_jax.data import digits as digits_data
from clip_jax.evaluate import overlay, segmentation


def add_parser(commands):
  p = commands.add_parser('segment', help='zero-shot segmentation mIoU of held-out digits canvases, with baselines')
  p.add_argument('--workdir', required=True, help='a GroupViT (or CLIP ViT) training run directory')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add_argument('--baseline', default=None, help='a second run to score on the same canvases (e.g. the CLIP '
                 'patch-similarity baseline, configs/groupvit.py:clip_baseline)')
  p.add_argument('--baseline_step', type=int, default=None, help="the baseline's checkpoint step (default: latest)")
  p.add_argument('--num_images', type=int, default=None, help='test canvases (default: the run config\'s, or 500)')
  p.add_argument('--num_digits', type=int, nargs=2, default=None, metavar=('MIN', 'MAX'),
                 help='digits per canvas (default 2 3)')
  p.add_argument('--seed', type=int, default=None, help='which test canvases')
  p.add_argument('--top_k', type=int, default=None, help='image-level classes a segment may take (NVlabs: 5)')
  p.add_argument('--bg_thresh', type=float, default=None, help='background below this class probability (0.95)')
  p.add_argument('--logit_scale', type=float, default=None,
                 help="similarity scale of the class softmax (default: each model's own, capped at 100, as NVlabs)")
  p.add_argument('--batch_size', type=int, default=None)
  p.add_argument('--out', default=None, help='directory for the PNG panels (default WORKDIR/segment)')
  p.add_argument('--num_png', type=int, default=16, help='panels to write (0: none; label masks are always written)')


def _settings(config, args):
  base = segmentation.default_config()
  saved = config.eval.get('segmentation') if 'eval' in config else None
  if saved:
    base.update(saved)
  for field in ('num_images', 'seed', 'top_k', 'bg_thresh', 'logit_scale', 'batch_size'):
    value = getattr(args, field)
    if value is not None:
      base[field] = value
  if args.num_digits is not None:
    base.num_digits = tuple(args.num_digits)
  lo, hi = base.num_digits
  if not 1 <= lo <= hi <= 3:
    raise ValueError(f'--num_digits {lo} {hi}: need 1 <= MIN <= MAX <= 3 digits per canvas')
  scale = None if base.logit_scale is None else float(base.logit_scale)
  return base, segmentation.Settings(int(base.top_k), float(base.bg_thresh), scale,
                                     int(base.batch_size))


def _score(config, variables, images, settings):
  method = segmentation.method_name(config.model)
  model = models.build(config.model)
  classes = segmentation.class_embeddings(model, variables, digits_data.DIGIT_NAMES,
                                          segmentation.templates_of(config), config.model.text.context_length)
  return method, segmentation.segment(model, variables, method, images, classes, config.model.vision.image_size,
                                      settings)


def run(args) -> dict:
  """Prints the table; returns {method: {'miou', 'iou_background', 'miou_digits', 'iou'}}."""
  if args.num_png < 0:
    raise ValueError(f'--num_png={args.num_png} must be >= 0')
  runs = [checkpoint.load(args.workdir, args.step)]
  if args.baseline is not None:
    runs.append(checkpoint.load(args.baseline, args.baseline_step))
  config = runs[0][0]  # the canvas size and the default settings
  base, settings = _settings(config, args)
  canvas = config.data.digits.canvas_size if 'data' in config else 64
  images, masks = segmentation.test_scenes(int(base.num_images), int(base.seed), canvas, tuple(base.num_digits))

  outputs = {}
  for workdir, (run_config, variables) in zip((args.workdir, args.baseline), runs):
    method, result = _score(run_config, variables, images, settings)
    name = method if method not in outputs else f'{method} ({os.path.basename(os.path.normpath(workdir))})'
    outputs[name] = result
  outputs['all-background'] = (np.zeros_like(masks), np.zeros(masks.shape, np.int32))

  scores = {}
  scale_text = settings.logit_scale or "each model's own"
  print(f'{len(images)} held-out test canvases ({canvas}x{canvas}, {base.num_digits[0]}-{base.num_digits[1]} '
        f'digits), {segmentation.NUM_CLASSES} classes (background + 10 digits); top_k={settings.top_k}, '
        f'bg_thresh={settings.bg_thresh}, logit_scale={scale_text}')
  print(f'{"method":<24}{"mIoU":>8}{"background":>12}{"digits":>8}')
  for name, (pred, _) in outputs.items():
    per_class = segmentation.iou(segmentation.confusion(masks, pred))
    scores[name] = dict(miou=float(np.nanmean(per_class)), iou_background=float(per_class[0]),
                        miou_digits=float(np.nanmean(per_class[1:])), iou=per_class.tolist())
    print(f'{name:<24}{scores[name]["miou"]:>8.4f}{per_class[0]:>12.4f}{scores[name]["miou_digits"]:>8.4f}')
  print('per-class IoU:')
  print(f'{"":<24}' + ''.join(f'{n[:5]:>7}' for n in segmentation.CLASS_NAMES))
  for name, s in scores.items():
    print(f'{name:<24}' + ''.join(f'{v:>7.3f}' for v in s['iou']))

  out = args.out or os.path.join(args.workdir, 'segment')
  models_out = {k: v for k, v in outputs.items() if k != 'all-background'}
  _write_masks(os.path.join(out, 'masks'), masks, {k: pred for k, (pred, _) in models_out.items()})
  with open(os.path.join(out, 'scores.json'), 'w') as f:
    json.dump(dict(scores, settings=dict(base.to_dict(), num_digits=list(base.num_digits))), f, indent=1)
  if args.num_png:
    overlay.write_panels(os.path.join(out, 'panels'), images, masks, models_out, segmentation.CLASS_NAMES,
                         args.num_png)
  print(f'label masks, scores and {min(args.num_png, len(images))} PNG panels in {out}')
  return scores


def _write_masks(out: str, truth: np.ndarray, preds: dict):
  for name, masks in dict(truth=truth, **preds).items():
    folder = os.path.join(out, re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_'))
    os.makedirs(folder, exist_ok=True)
    for i, mask in enumerate(masks):
      Image.fromarray(np.asarray(mask, np.uint8), 'L').save(os.path.join(folder, f'{i:03d}.png'))
