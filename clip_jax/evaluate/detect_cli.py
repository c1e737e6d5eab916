"""`python -m clip_jax.evaluate detect`: base / novel AP of ViLD runs on held-out digits scenes.

  python -m clip_jax.evaluate detect --workdir runs/vild --baseline runs/vild_text

Scores the run in --workdir and, with --baseline, a second run on the same
scenes (test-split scans only), and prints one table: AP and AP50 of the
base classes (boxes seen in training) and of the novel ones (never seen),
from pycocotools (clip_jax.evaluate.detection). Settings default to the first
run's config.eval.detection; the flags override them. Written to --out
(default WORKDIR/detect):

  panels/NNN.png   the first --num_png scenes: the ground truth, then each run's detections
                   scoring >= --draw_threshold (novel classes marked '*')
  scores.json      the printed numbers and the settings
"""

import json
import os

from clip_jax import checkpoint, models
from clip_jax.evaluate import detection, draw
from clip_jax.tasks import classes as classes_lib


def add_parser(commands):
  p = commands.add_parser('detect', help='ViLD base / novel AP and AP50 (pycocotools) on held-out digits scenes')
  p.add_argument('--workdir', required=True, help='a ViLD training run directory')
  p.add_argument('--baseline', default=None, help='a second ViLD run scored on the same scenes (e.g. without '
                 'ViLD-image, configs/vild.py:digits_text)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step of --workdir (default: latest)')
  p.add_argument('--num_images', type=int, default=None, help="test scenes (default: the run's eval.detection)")
  p.add_argument('--seed', type=int, default=None, help='which test scenes')
  p.add_argument('--score', choices=detection.SCORES, default=None,
                 help='auto: ViLD-ensemble when the model has an image branch, else the text branch')
  p.add_argument('--batch_size', type=int, default=None)
  p.add_argument('--out', default=None, help='output directory (default WORKDIR/detect)')
  p.add_argument('--num_png', type=int, default=8, help='panels to write (0: none)')
  p.add_argument('--draw_threshold', type=float, default=0.3, help='lowest score drawn on the panels')


def _settings(config, args):
  e = detection.default_config()
  e.update(config.eval.get('detection') or {})
  for field in ('num_images', 'seed', 'score', 'batch_size'):
    if getattr(args, field) is not None:
      e[field] = getattr(args, field)
  if e.num_images < 1 or e.batch_size < 1:
    raise ValueError(f'--num_images={e.num_images} and --batch_size={e.batch_size} must be >= 1')
  if e.score not in detection.SCORES:
    raise ValueError(f'--score={e.score!r}: choose one of {detection.SCORES}')
  return e


def _load(workdir, step):
  config, variables = checkpoint.load(workdir, step)
  if config.model.name != 'vild':
    raise ValueError(f'{workdir} is a {config.model.name!r} run; `detect` evaluates ViLD runs')
  teacher_config, teacher_variables = checkpoint.load_teacher(workdir, step)
  return config, variables, models.build(teacher_config), teacher_variables


def run(args) -> dict:
  """Prints the table; returns {run name: {'base/AP', 'base/AP50', 'novel/AP', 'novel/AP50'}}."""
  if args.num_png < 0:
    raise ValueError(f'--num_png={args.num_png} must be >= 0')
  runs = [(args.workdir, _load(args.workdir, args.step))]
  if args.baseline:
    runs.append((args.baseline, _load(args.baseline, None)))
  config = runs[0][1][0]
  e = _settings(config, args)
  vocab = classes_lib.from_config(config)
  images, truth = detection.test_scenes(e, config.data.digits.canvas_size, config.model.vision.image_size)

  scores, detections = {}, {}
  for workdir, (run_config, variables, teacher, teacher_variables) in runs:
    if classes_lib.from_config(run_config) != vocab:
      raise ValueError(f'{workdir} was trained with other classes ({run_config.classes.to_dict()}) than '
                       f'{args.workdir}; compare runs with the same base / novel split')
    model = models.build(run_config.model)
    e_run = e.copy_and_resolve_references()
    if e_run.score == 'ensemble' and not model.image_head:
      e_run.score = 'text'  # the baseline may have no image branch
    name = os.path.basename(os.path.normpath(workdir))
    name = name if name not in scores else f'{name} ({len(scores)})'
    scores[name], detections[name] = detection.score(model, variables, teacher, teacher_variables, run_config,
                                                     e_run, images, truth)
    scores[name]['score'] = e_run.score if e_run.score != 'auto' else (
        'ensemble' if model.image_head else 'text')

  novel = ', '.join(vocab.names[i] for i in vocab.held_out_ids)
  print(f'{len(images)} held-out scenes; base: {", ".join(vocab.names[i] for i in vocab.train_ids)}; '
        f'novel (no boxes in training): {novel}')
  print(f'{"run":<24}{"scores":>10}{"base AP":>9}{"AP50":>7}{"novel AP":>10}{"AP50":>7}')
  for name, s in scores.items():
    print(f'{name:<24}{s["score"]:>10}{s["base/AP"]:>9.4f}{s["base/AP50"]:>7.4f}{s["novel/AP"]:>10.4f}'
          f'{s["novel/AP50"]:>7.4f}')

  out = args.out or os.path.join(args.workdir, 'detect')
  os.makedirs(out, exist_ok=True)
  for i in range(min(args.num_png, len(images))):
    drawn = {}
    for name, dets in detections.items():
      boxes, labels, s = dets[i]
      keep = s >= args.draw_threshold
      drawn[name] = (boxes[keep], labels[keep], s[keep])
    draw.save(draw.detection_panel(images[i], truth[i][0], truth[i][1], drawn, vocab.names, vocab.held_out_ids),
              os.path.join(out, 'panels', f'{i:03d}.png'))
  with open(os.path.join(out, 'scores.json'), 'w') as f:
    json.dump(dict(scores, settings=dict(e.to_dict(), num_digits=list(e.num_digits))), f, indent=1)
  print(f'scores and {min(args.num_png, len(images))} PNG panels in {out}')
  return scores
