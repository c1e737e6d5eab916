"""python -m clip_jax.export --workdir RUN [--step N] --format open_clip|hf|safetensors --out DIR [--force]

Writes a training run's checkpoint (latest, or --step) in a format other tools
load; see clip_jax.export for the files and how to load each.
"""

import argparse
import sys


def main(argv=None) -> int:
  from clip_jax.export import writers  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m clip_jax.export', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='the training run directory')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  parser.add_argument('--format', required=True, help=f'one of {", ".join(writers.FORMATS)}')
  parser.add_argument('--out', required=True, help='output directory (created; must be empty or absent)')
  parser.add_argument('--force', action='store_true', help='replace a non-empty --out')
  args = parser.parse_args(argv)
  try:
    names = writers.export(args.workdir, args.format, args.out, step=args.step, force=args.force)
  except writers.ExportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if names:
    print(f'wrote {args.out}: {", ".join(names)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
