"""Exact resume through the real CLI: SIGKILL at a random step, SIGTERM, for both loaders."""

import random
import signal

import numpy as np
import pytest

from clip_jax import checkpoint
from trainer_helpers import losses, max_param_diff, run_cli, start_cli, wait_for_checkpoint, wait_for_step

STEPS = 16
FLAGS = (f'--config.total_steps={STEPS}', '--config.checkpoint.every_steps=2', '--config.log_every_steps=1',
         '--config.mesh.data=2', '--config.mesh.fsdp=4')


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['grain', 'tfdata'])
def test_sigkill_then_restart_matches_an_uninterrupted_run(loader, tmp_path):
  flags = FLAGS + (f'--config.data.loader={loader}',)
  straight = tmp_path / 'straight'
  done = run_cli(straight, *flags)
  assert done.returncode == 0, done.stdout + done.stderr

  killed = tmp_path / 'killed'
  kill_at = random.Random().randint(3, STEPS // 2)  # after the first checkpoint (step 2), well before the end
  proc = start_cli(killed, *flags)
  wait_for_step(killed, kill_at, proc)
  wait_for_checkpoint(killed, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed_from = checkpoint.manager(str(killed), read_only=True).latest_step()
  assert resumed_from is not None and 2 <= resumed_from < STEPS, resumed_from
  again = run_cli(killed, *flags)
  assert again.returncode == 0, again.stdout + again.stderr

  assert max_param_diff(straight, killed) <= 1e-6, (kill_at, resumed_from)
  want_losses, got_losses = losses(straight), losses(killed)
  after = range(resumed_from + 1, STEPS + 1)
  np.testing.assert_array_equal([got_losses[s] for s in after], [want_losses[s] for s in after])


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
  flags = FLAGS[:1] + ('--config.checkpoint.every_steps=100', '--config.log_every_steps=1',
                       '--config.mesh.data=8')
  proc = start_cli(tmp_path, *flags)
  wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  saved = checkpoint.manager(str(tmp_path), read_only=True).latest_step()
  assert saved is not None and 3 <= saved < STEPS  # no periodic save was due: this one is SIGTERM's
  again = run_cli(tmp_path, *flags)
  assert again.returncode == 0, again.stdout + again.stderr
  assert checkpoint.manager(str(tmp_path), read_only=True).latest_step() == STEPS
  assert f'step={STEPS}' in again.stdout
