"""How a process decides to join a multi-process run (clip_jax.distributed.resolve)."""

import pytest

from clip_jax import distributed


def test_explicit_flags_or_environment():
  assert distributed.resolve('auto', '10.0.0.2:1234', 4, 3, environ={}) == distributed.Spec('explicit', '10.0.0.2:1234', 4, 3)
  env = {'CLIP_JAX_COORDINATOR_ADDRESS': 'host:99', 'CLIP_JAX_NUM_PROCESSES': '2', 'CLIP_JAX_PROCESS_ID': '1'}
  assert distributed.resolve(environ=env) == distributed.Spec('explicit', 'host:99', 2, 1)
  assert distributed.resolve(process_id=0, environ=env).process_id == 0  # a flag wins over its variable


def test_cluster_detection_and_single_process():
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_ID': '0', 'SLURM_NTASKS': '16'}
  assert distributed.resolve(environ=slurm).mode == 'cluster'
  assert distributed.resolve(environ={**slurm, 'SLURM_NTASKS': '1'}).mode == 'single'
  assert distributed.resolve(environ={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}).mode == 'single'  # sbatch shell, not a step
  assert distributed.resolve(environ={'TPU_WORKER_HOSTNAMES': 'a,b'}).mode == 'cluster'
  assert distributed.resolve('on', environ={}).mode == 'cluster'
  assert distributed.resolve('off', '10.0.0.2:1', 2, 0, environ=slurm).mode == 'single'
  assert distributed.resolve(environ={}).mode == 'single'


@pytest.mark.parametrize('kwargs, message', [
    (dict(coordinator_address='h:1', num_processes=2), r"missing \['--process_id'\]"),
    (dict(coordinator_address='h', num_processes=2, process_id=0), 'use HOST:PORT'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), r'--process_id=2 must be in \[0, --num_processes=2\)'),
    (dict(coordinator_address='h:1', num_processes='two', process_id=0), 'must be integers'),
    (dict(distributed='maybe'), "--distributed='maybe'"),
])
def test_bad_setups_name_the_flag(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(environ={}, **kwargs)
