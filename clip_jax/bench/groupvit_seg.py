"""`python -m clip_jax.bench groupvit_seg --workdir DIR`: GroupViT's zero-shot segmentation vs. its baselines.

Trains configs/groupvit.py:digits (GroupViT) and :clip_baseline (a CLIP ViT
of comparable size; the same data, objective and schedule) with the training
CLI, one after the other, each in DIR/<variant> (a finished run is reused;
its recorded time is reported), timing each run's wall clock (start-up and
compilation included). Then scores both on the same held-out multi-digit
canvases with `python -m clip_jax.evaluate segment`, next to the
all-background prediction: one table, mIoU over background + the ten digits.
No masks are used in training; the test canvases draw only test-split scans.
Both variants distill from the main job's CLIP, so run it first (its workdir
is the configs' config.teacher.workdir, runs/digits, relative to the current
directory).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from clip_jax.evaluate import segment_cli

_VARIANTS = ('digits', 'clip_baseline')


def _config_path() -> str:
  path = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'groupvit.py'
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: run the benchmark from a checkout of the repository')
  return str(path)


def _train(variant: str, workdir: str, overrides) -> float:
  """Wall seconds of the training run (recorded in workdir, so a finished run is not retrained)."""
  record = os.path.join(workdir, 'bench_time.json')
  if os.path.exists(record):
    with open(record) as f:
      return json.load(f)['seconds']
  command = [sys.executable, '-m', 'clip_jax.train', '--config', f'{_config_path()}:{variant}', '--workdir', workdir,
             '--progress=false', *[f'--config.{o}' for o in overrides]]
  print('$ ' + ' '.join(command), flush=True)
  start = time.time()
  subprocess.run(command, check=True)
  seconds = time.time() - start
  with open(record, 'w') as f:
    json.dump({'seconds': seconds, 'command': command}, f)
  return seconds


def run(args):
  times = {v: _train(v, os.path.join(args.workdir, v), args.override) for v in _VARIANTS}
  for variant, seconds in times.items():
    print(f'training {variant}: {seconds / 60:.1f} min wall (start-up and compilation included)')
  argv = ['segment', '--workdir', os.path.join(args.workdir, 'digits'),
          '--baseline', os.path.join(args.workdir, 'clip_baseline'), '--out', os.path.join(args.workdir, 'segment')]
  parser = argparse.ArgumentParser()
  segment_cli.add_parser(parser.add_subparsers(dest='command'))
  scores = segment_cli.run(parser.parse_args(argv))
  print('$ python -m clip_jax.evaluate ' + ' '.join(argv))
  return times, scores


def add_parser(subparsers):
  p = subparsers.add_parser('groupvit_seg', help=__doc__.splitlines()[0].split(': ', 1)[1])
  p.add_argument('--workdir', required=True, help='DIR: the two runs and the segmentation outputs go here')
  p.add_argument('--override', nargs='*', default=[], metavar='KEY=VALUE',
                 help='config overrides for both runs, e.g. total_steps=100 (passed as --config.KEY=VALUE)')
  p.set_defaults(func=run)
