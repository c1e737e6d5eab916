"""Shared pieces of the trainer tests: small runs, their logs and checkpoints."""

import json
import os
import pathlib
import subprocess
import sys
import time

from conftest import ROOT, load_config


def tiny_config(**overrides):
  """configs/clip_digits.py:tiny with a small batch and no evaluation, plus dotted overrides."""
  config = load_config('clip_digits', 'tiny')
  config.eval.at_end = False
  config.tensorboard = False
  config.checkpoint['async'] = False
  for key, value in overrides.items():
    node = config
    parts = key.split('.')
    for part in parts[:-1]:
      node = node[part]
    node[parts[-1]] = value
  return config


def losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl; a step logged twice (resumed run) keeps its last value."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'loss' in row:
        out[row['step']] = row['loss']
  return out


def cli_command(workdir, *flags):
  return [sys.executable, '-m', 'clip_jax.train', '--config', str(ROOT / 'configs' / 'clip_digits.py') + ':tiny',
          '--workdir', str(workdir), '--progress=false', '--config.eval.at_end=false',
          '--config.tensorboard=false', *flags]


def cli_env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  return env


def run_cli(workdir, *flags, timeout=300):
  return subprocess.run(cli_command(workdir, *flags), env=cli_env(), capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def start_cli(workdir, *flags):
  return subprocess.Popen(cli_command(workdir, *flags), env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for_step(workdir, step, proc, timeout=240):
  """Blocks until metrics.jsonl shows `step` (or the process ends)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists() and any(s >= step for s in losses(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f'run ended before step {step}:\n{proc.stdout.read()}')
    time.sleep(0.05)
  raise AssertionError(f'step {step} not reached in {timeout}s')


def wait_for_checkpoint(workdir, proc, timeout=240):
  """Blocks until a checkpoint is committed (async saves land a little after their step)."""
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (pathlib.Path(workdir) / 'checkpoints').exists():
      if checkpoint.manager(str(workdir), read_only=True).latest_step() is not None:
        return
    if proc.poll() is not None:
      raise AssertionError(f'run ended before its first checkpoint:\n{proc.stdout.read()}')
    time.sleep(0.05)
  raise AssertionError(f'no checkpoint committed in {timeout}s')


def max_param_diff(workdir_a, workdir_b) -> float:
  """Largest absolute difference between the latest checkpointed variables of two runs."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  _, a = checkpoint.load(str(workdir_a))
  _, b = checkpoint.load(str(workdir_b))
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))
