"""python -m clip_jax.evaluate zeroshot --workdir RUN --images DIR [--templates "a photo of a {}." ...]
python -m clip_jax.evaluate segment --workdir RUN [--baseline CLIP_RUN] [--out DIR]
python -m clip_jax.evaluate lseg --workdir RUN [--out DIR]
python -m clip_jax.evaluate detect --workdir RUN [--baseline RUN] [--out DIR]

zeroshot: zero-shot classification of an image folder (DIR/<class name>/*.png)
with a trained run's latest (or --step) checkpoint; prints top-1 and top-5.

segment: zero-shot segmentation of held-out digits canvases (test-split scans)
by a GroupViT run (or a CLIP ViT run: the patch-similarity baseline); prints
mIoU over background + the ten digits, beside the all-background baseline and,
with --baseline, a second run's; writes PNG panels (see clip_jax.evaluate.segment_cli).

lseg: an LSeg run's seen / unseen mIoU on held-out digits canvases, every pixel
labelled among all class names; writes PNG overlays (clip_jax.evaluate.lseg).

detect: ViLD runs' base / novel AP and AP50 (pycocotools) on held-out digits
scenes, with --baseline a second run (the ViLD-image ablation); writes PNG
overlays (clip_jax.evaluate.detect_cli).
"""

import argparse
import sys

from clip_jax import checkpoint, models
from clip_jax.evaluate import detect_cli, embed, folder, lseg, segment_cli, zeroshot


def _zeroshot(args) -> dict:
  templates = args.templates or zeroshot.load_templates('openai')
  zeroshot.check_templates(templates)  # cheap checks before the checkpoint and images load
  config, variables = checkpoint.load(args.workdir, args.step)
  model = models.build(config.model)
  images, labels, classes = folder.load(args.images, config.model.vision.image_size)
  classifier = zeroshot.build_classifier(zeroshot.text_encoder(model, variables), classes, templates,
                                         context_length=config.model.text.context_length)
  feats = embed.image_features(model, variables, images, args.batch_size, normalized=True)
  k = min(5, len(classes))
  topk, _ = zeroshot.predict(feats, classifier, k=k)
  acc = zeroshot.accuracy(topk, labels, ks=sorted({1, k}))
  print(f'{len(images)} images, {len(classes)} classes, {len(templates)} template(s)')
  for name, value in acc.items():
    print(f'{name}: {value:.4f}')
  return acc


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m clip_jax.evaluate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  zs = commands.add_parser('zeroshot', help='zero-shot top-1/top-5 on an image folder')
  zs.add_argument('--workdir', required=True, help='the training run directory')
  zs.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  zs.add_argument('--images', required=True, help='DIR/<class name>/*.png')
  zs.add_argument('--templates', nargs='+', default=None,
                  help='prompt templates with one {} (default: the 80 OpenAI ImageNet templates)')
  zs.add_argument('--batch_size', type=int, default=128)
  segment_cli.add_parser(commands)
  lseg.add_parser(commands)
  detect_cli.add_parser(commands)
  args = parser.parse_args(argv)
  try:
    if args.command == 'segment':
      segment_cli.run(args)
    elif args.command == 'lseg':
      lseg.run(args)
    elif args.command == 'detect':
      detect_cli.run(args)
    else:
      _zeroshot(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
