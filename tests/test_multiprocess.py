"""Multi-process training on loopback (launch/local.sh: jax.distributed + CPU collectives).

The runs use the same global batch and the same 8-device mesh (data=2 x fsdp=4) whether one
process holds all 8 devices or 2 / 4 processes hold 4 / 2 each; the grain stream gives process
p rows [p*b, (p+1)*b) of every global batch (tests/test_pipeline.py checks that the shares are
disjoint and assemble the single-process batch), so the runs must train the same losses.
"""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clip_jax import checkpoint
from conftest import ROOT
from trainer_helpers import cli_command, cli_env, losses, max_param_diff, run_cli, wait_for_checkpoint, wait_for_step

STEPS = 24
FLAGS = (f'--config.total_steps={STEPS}', '--config.checkpoint.every_steps=4', '--config.log_every_steps=1',
         '--config.mesh.data=2', '--config.mesh.fsdp=4')
LOCAL = str(ROOT / 'launch' / 'local.sh')


def local_command(n, workdir, *flags):
  trainer_args = cli_command(workdir, *flags)[3:]  # drop `python -m clip_jax.train`
  return ['bash', LOCAL, '--python', sys.executable, str(n), *trainer_args]


def run_local(n, workdir, *flags, timeout=420):
  return subprocess.run(local_command(n, workdir, *flags), env=cli_env(), capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def logs(workdir):
  out = []
  for name in sorted(os.listdir(workdir / 'logs')):
    with open(workdir / 'logs' / name) as f:
      out.append(f'--- {name}\n{f.read()[-3000:]}')
  return '\n'.join(out)


@pytest.fixture(scope='module')
def single(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('single')
  done = run_cli(workdir, *FLAGS)
  assert done.returncode == 0, done.stdout + done.stderr
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize('n', [2, 4])
def test_processes_train_the_same_losses_as_one(single, n, tmp_path):
  done = run_local(n, tmp_path, *FLAGS)
  assert done.returncode == 0, done.stdout + done.stderr + logs(tmp_path)
  assert f'over {n} process(es)' in done.stdout  # process 0's start-up summary
  want, got = losses(single), losses(tmp_path)
  steps = range(1, 21)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)
  assert max_param_diff(single, tmp_path) <= 1e-5


def _pid_of(workdir, process_id, timeout=60):
  deadline = time.time() + timeout
  while time.time() < deadline:
    found = subprocess.run(['pgrep', '-f', '--', f'--workdir {workdir} .*--process_id {process_id}$'],
                           capture_output=True, text=True).stdout.split()
    if found:
      return int(found[0])
    time.sleep(0.1)
  raise AssertionError(f'process {process_id} of the run in {workdir} not found')


@pytest.mark.slow
def test_killing_one_process_then_restarting_resumes_exactly(single, tmp_path):
  proc = subprocess.Popen(local_command(2, tmp_path, *FLAGS), env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT)
  kill_at = random.Random().randint(6, 14)
  wait_for_step(tmp_path, kill_at, proc)
  wait_for_checkpoint(tmp_path, proc)
  os.kill(_pid_of(tmp_path, 1), signal.SIGKILL)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and 'process 1 exited' in out, out  # the launcher stopped process 0 too
  resumed_from = checkpoint.manager(str(tmp_path), read_only=True).latest_step()
  assert resumed_from is not None and 4 <= resumed_from < STEPS, resumed_from

  again = run_local(2, tmp_path, *FLAGS)
  assert again.returncode == 0, again.stdout + again.stderr + logs(tmp_path)
  assert f'resumed from step {resumed_from}' in logs(tmp_path)
  assert max_param_diff(single, tmp_path) <= 1e-5, (kill_at, resumed_from)
  want_losses, got_losses = losses(single), losses(tmp_path)
  after = range(resumed_from + 1, STEPS + 1)
  np.testing.assert_allclose([got_losses[s] for s in after], [want_losses[s] for s in after], rtol=1e-5)


def test_local_dry_run_prints_each_process_command(tmp_path):
  done = subprocess.run(['bash', LOCAL, '--dry-run', '--port', '23456', '--python', 'py', '2', '--config',
                         'configs/clip_digits.py', '--workdir', str(tmp_path / 'my run')],
                        capture_output=True, text=True, env={**os.environ, 'XLA_FLAGS': '--foo --xla_force_host_platform_device_count=8'})
  assert done.returncode == 0, done.stderr
  lines = done.stdout.strip().splitlines()
  assert len(lines) == 2
  import shlex  # pylint: disable=g-import-not-at-top
  for i, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[:3] == ['env', 'JAX_PLATFORMS=cpu', 'XLA_FLAGS=--foo --xla_force_host_platform_device_count=4']
    assert argv[3:] == ['py', '-m', 'clip_jax.train', '--config', 'configs/clip_digits.py', '--workdir',
                        str(tmp_path / 'my run'), '--coordinator_address', '127.0.0.1:23456', '--num_processes',
                        '2', '--process_id', str(i), '>', str(tmp_path / 'my run' / 'logs' / f'process_{i}.log'),
                        '2>&1']
  bad = subprocess.run(['bash', LOCAL, 'two', '--workdir', 'x'], capture_output=True, text=True)
  assert bad.returncode == 2 and 'number of processes N' in bad.stderr


def test_unreachable_coordinator_fails_with_a_timeout_message(tmp_path):
  done = run_cli(tmp_path, '--coordinator_address=127.0.0.1:9', '--num_processes=2', '--process_id=1',
                 '--init_timeout=3', timeout=120)
  assert done.returncode == 2, done.stdout + done.stderr
  assert 'could not join the multi-process run through the coordinator at 127.0.0.1:9' in done.stderr
  assert '--init_timeout=3 s' in done.stderr


def test_processes_with_different_configs_refuse_to_train(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = cli_env()
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  procs = [subprocess.Popen(cli_command(tmp_path, *FLAGS, f'--config.batch_size={16 * (i + 1)}',
                                        f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                                        f'--process_id={i}'),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
           for i in range(2)]
  outs = [p.communicate(timeout=180)[0] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], outs
  assert 'processes [1] were started with a config different from process 0' in outs[0], outs[0]
  assert 'batch_size: process 0 has 16, this one 32' in outs[1], outs[1]
  assert not (tmp_path / 'checkpoints').exists()


def test_a_mesh_that_spans_processes_in_the_tensor_axis_is_refused(tmp_path):
  done = run_local(2, tmp_path, *FLAGS[:-2], '--config.mesh.data=1', '--config.mesh.tensor=8', timeout=240)
  assert done.returncode == 2, done.stdout + done.stderr
  text = done.stdout + done.stderr + logs(tmp_path)
  assert 'each process must hold one contiguous block' in text and 'mesh.tensor' in text


@pytest.mark.slow
def test_sigterm_to_one_process_saves_at_a_step_both_agree_on(tmp_path):
  """A scheduler's notice may reach one host first: the processes agree on the step to save at."""
  flags = ('--config.total_steps=400', '--config.checkpoint.every_steps=1000', '--config.log_every_steps=1',
           '--config.mesh.data=2', '--config.mesh.fsdp=4')
  proc = subprocess.Popen(local_command(2, tmp_path, *flags), env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT)
  wait_for_step(tmp_path, 3, proc)
  os.kill(_pid_of(tmp_path, 1), signal.SIGTERM)
  out, _ = proc.communicate(timeout=180)
  assert proc.returncode == 0, out + logs(tmp_path)
  saved = checkpoint.manager(str(tmp_path), read_only=True).latest_step()
  assert saved is not None and 3 <= saved < 400
  for i in range(2):
    assert f'SIGTERM: saved step {saved}, exiting' in (tmp_path / 'logs' / f'process_{i}.log').read_text()
