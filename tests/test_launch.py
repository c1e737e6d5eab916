"""launch/: tpu_pod.sh, slurm.sbatch and slurm.sh.

Each script runs under bash in a subprocess. The --dry-run output is parsed with shlex and
compared with the exact commands; the real code paths run against fake `gcloud` / `srun` /
python executables that record what they were given (the remote commands of tpu_pod.sh are
executed by a local bash, so the shell quoting is tested for real, not only read back).
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / 'launch'
BASH = shutil.which('bash')
TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']

# Trainer arguments that need quoting: spaces, both quote kinds, $, backslash, glob, ;, unicode.
NASTY = ['--config.data.caption_key=it\'s a "caption"', '--config.name', 'two  spaces', '$HOME',
         'back\\slash', '*', 'a;b', 'héllo', '']


def run(script, *args, env=None, path=None, check=None):
  """Runs launch/<script> under bash with a clean environment (no SLURM_* or gcloud leaking in)."""
  full = {'PATH': path or os.environ['PATH'], 'HOME': os.environ.get('HOME', '/tmp'), 'TMPDIR': '/tmp',
          'LC_ALL': 'C.UTF-8'}
  full.update(env or {})
  p = subprocess.run([BASH, str(LAUNCH / script), *args], capture_output=True, text=True, env=full,
                     timeout=60, cwd=ROOT)
  if check is not None:
    assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
  return p


def commands(stdout):
  """Printed commands (comment lines dropped), each split back into its words."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith('#')]


def remote_words(command):
  """A remote --command split into shell words and operators (;, &&, >>, &, |, ...)."""
  lex = shlex.shlex(command, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  return list(lex)


def trainer_argv(command):
  """The argument list of `python -m clip_jax.train ...` inside a remote command."""
  words = remote_words(command)
  start = words.index('clip_jax.train') + 1
  return words[start:words.index('>>', start)]


def contains(words, part):
  return any(words[i:i + len(part)] == part for i in range(len(words)))


def bin_dir(tmp_path, **scripts):
  """A directory of executables NAME -> text, for PATH."""
  d = tmp_path / 'bin'
  d.mkdir(exist_ok=True)
  for name, text in scripts.items():
    f = d / name
    f.write_text(text)
    f.chmod(0o755)
  return d


# ---- tpu_pod.sh: dry run -------------------------------------------------------------------

POD = ['--name', 'pod-1', '--zone', 'us-central2-b']
WHERE = ['--zone=us-central2-b']


def test_tpu_up_dry_run_prints_every_command_and_needs_no_gcloud(tmp_path):
  # PATH holds only `dirname`: no gcloud, tar or ssh is needed to print the commands.
  only = bin_dir(tmp_path)
  (only / 'dirname').symlink_to(shutil.which('dirname'))
  p = run('tpu_pod.sh', 'up', '--dry-run', *POD, '--accelerator_type', 'v4-32', '--version',
          'tpu-ubuntu2204-base', '--spot', '--workdir', 'gs://bucket/runs/b16', '--extras', 'tfdata', '--',
          '--config', 'configs/clip.py:ViT-B/16', *NASTY, path=str(only), check=0)
  cmds = commands(p.stdout)
  assert cmds[0] == TPU + ['describe', 'pod-1', *WHERE, '--format=value(state,acceleratorType)']
  assert cmds[1] == TPU + ['create', 'pod-1', *WHERE, '--accelerator-type=v4-32',
                           '--version=tpu-ubuntu2204-base', '--spot']
  assert cmds[2] == TPU + ['delete', 'pod-1', *WHERE, '--quiet']
  assert cmds[3] == TPU + ['start', 'pod-1', *WHERE]
  assert 'if the describe fails' in p.stdout and 'PREEMPTED' in p.stdout  # the guard, as comments
  tar, scp, install, train, logs = cmds[4:]
  tarball = '/tmp/clip_jax-pod-1.tar.gz'
  assert tar[:5] == ['tar', '-C', str(ROOT), '-czf', tarball] and tar[-1] == '.'
  assert {'--exclude=.git', '--exclude=.venv', '--exclude=runs'} <= set(tar)
  assert scp == TPU + ['scp', tarball, 'pod-1:clip_jax.tar.gz', *WHERE, '--worker=all']
  for cmd in (install, train, logs):
    assert cmd[:6] == TPU + ['ssh', 'pod-1'] and cmd[6:8] == [*WHERE, '--worker=all']
    assert cmd[8].startswith('--command=') and len(cmd) == 9
  install_words = remote_words(install[8][len('--command='):])
  assert contains(install_words, ['tar', '-xzf', '~/clip_jax.tar.gz', '-C', '~/clip_jax'])
  assert install_words[-8:] == ['~/clip_jax_venv/bin/python', '-m', 'pip', 'install', '-q', '-e', '.[gcs,tfdata]',
                                'jax[tpu]']
  train_cmd = train[8][len('--command='):]
  assert trainer_argv(train_cmd) == ['--workdir=gs://bucket/runs/b16', '--distributed=on', '--config',
                                     'configs/clip.py:ViT-B/16', *NASTY]
  assert 'nohup ~/clip_jax_venv/bin/python -m clip_jax.train' in train_cmd
  assert 'tail -n 100 -F ~/clip_jax_train.log' in logs[8]


def test_tpu_single_commands_dry_run():
  stop = commands(run('tpu_pod.sh', 'stop', '--dry-run', *POD, '--project', 'proj', '--worker', '3',
                      '--grace=30', check=0).stdout)
  assert len(stop) == 1 and stop[0][:9] == TPU + ['ssh', 'pod-1', *WHERE, '--project=proj', '--worker=3']
  assert 'kill -TERM "$pid"' in stop[0][9] and '$(seq 30)' in stop[0][9] and 'kill -KILL' in stop[0][9]
  assert commands(run('tpu_pod.sh', 'delete', '--dry-run', *POD, check=0).stdout) == [
      TPU + ['delete', 'pod-1', *WHERE, '--quiet']]
  detached = commands(run('tpu_pod.sh', 'train', '--dry-run', '--detach', *POD, '--workdir=gs://b/r', '--',
                          '--config=configs/clip_digits.py', check=0).stdout)
  assert len(detached) == 1 and trainer_argv(detached[0][-1]) == [
      '--workdir=gs://b/r', '--distributed=on', '--config=configs/clip_digits.py']
  # Flags with hyphens or underscores, before or after the command, '=' or a separate value.
  create = commands(run('tpu_pod.sh', '--dry-run', '--accelerator-type=v5litepod-64', 'create', *POD,
                        '--version', 'v2-alpha-tpuv5-lite', '--preemptible', check=0).stdout)
  assert create[1] == TPU + ['create', 'pod-1', *WHERE, '--accelerator-type=v5litepod-64',
                             '--version=v2-alpha-tpuv5-lite', '--preemptible']


@pytest.mark.parametrize('repo, clone', [
    ('https://github.com/me/clip_jax@v1.2', ['https://github.com/me/clip_jax', 'v1.2']),
    ('git@github.com:me/clip_jax.git@feature/x', ['git@github.com:me/clip_jax.git', 'feature/x']),
    ('git@github.com:me/clip_jax.git', ['git@github.com:me/clip_jax.git', None]),
])
def test_tpu_install_from_repo(repo, clone):
  cmds = commands(run('tpu_pod.sh', 'install', '--dry-run', *POD, '--repo', repo, check=0).stdout)
  assert len(cmds) == 1 and cmds[0][7] == '--worker=all'  # no tarball, no scp
  words = remote_words(cmds[0][8][len('--command='):])
  url, ref = clone
  assert contains(words, ['git', 'clone', '--quiet', url, '~/clip_jax'])
  if ref:
    assert contains(words, ['git', '-C', '~/clip_jax', 'checkout', '--quiet', ref])
  else:
    assert 'checkout' not in words


@pytest.mark.parametrize('args, message', [
    (['train', *POD, '--', '--config', 'c'], '--workdir gs://BUCKET/DIR is required'),
    (['up', *POD, '--accelerator_type', 'v4-8', '--version', 'v', '--workdir', 'runs/x', '--', '--config', 'c'],
     "--workdir must be a gs:// bucket path, not 'runs/x'"),
    (['train', *POD, '--workdir', '/mnt/x', '--', '--config', 'c'], 'must be a gs:// bucket path'),
    (['train', *POD, '--workdir', 'gs://b/x', '--', '--config', 'c', '--workdir=gs://b/y'],
     'give --workdir to tpu_pod.sh'),
    (['train', *POD, '--workdir', 'gs://b/x'], 'the trainer needs --config'),
    (['train', *POD, '--workdir', 'gs://b/x', '--bogus', '1', '--', '--config', 'c'], "unknown flag '--bogus'"),
    (['train', '--zone', 'z', '--workdir', 'gs://b/x', '--', '--config', 'c'], '--name is required'),
    (['stop', '--name', 'p'], '--zone is required'),
    (['create', *POD, '--version', 'v'], '--accelerator_type is required'),
    (['create', *POD, '--accelerator_type', 'v4-8'], '--version is required'),
    (['stop', *POD, '--', '--config', 'c'], "'stop' takes no trainer arguments"),
    (['stop', *POD, '--worker', 'x'], "--worker must be 'all' or a worker number"),
    (['launch', *POD], "unknown command 'launch'"),
    ([], 'no command given'),
    (['stop', *POD, '--name'], '--name needs a value'),
])
def test_tpu_errors(args, message):
  p = run('tpu_pod.sh', '--dry-run', *args, check=2)
  assert message in p.stderr and not p.stdout


def test_tpu_help():
  p = run('tpu_pod.sh', '--help', check=0)
  assert p.stdout.startswith('usage: launch/tpu_pod.sh') and '--dry-run' in p.stdout


# ---- tpu_pod.sh: real code paths against a fake gcloud --------------------------------------

FAKE_GCLOUD = '''#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps(args) + '\\n')
if args[3] == 'describe':
  print(os.environ.get('FAKE_DESCRIBE', ''))
  sys.exit(int(os.environ.get('FAKE_DESCRIBE_RC', '0')))
if args[3] == 'ssh':  # the worker is this machine, HOME is the test's directory
  command = [a for a in args if a.startswith('--command=')][0][len('--command='):]
  sys.exit(subprocess.run(['bash', '-c', command]).returncode)
'''

# The trainer stand-in: records its arguments, then waits for SIGTERM like the real one.
FAKE_TRAINER = '''#!/bin/bash
trap 'echo TERM > "$HOME/got_term"; exit 0' TERM
printf '%s\\0' "$@" > "$HOME/argv.tmp" && mv "$HOME/argv.tmp" "$HOME/argv"
while :; do sleep 0.05; done
'''


@pytest.fixture
def fake_pod(tmp_path):
  home = tmp_path / 'home'
  (home / 'clip_jax').mkdir(parents=True)
  (home / 'clip_jax_venv' / 'bin').mkdir(parents=True)
  trainer = home / 'clip_jax_venv' / 'bin' / 'python'
  trainer.write_text(FAKE_TRAINER)
  trainer.chmod(0o755)
  fake = bin_dir(tmp_path, gcloud=FAKE_GCLOUD.format(python=sys.executable))
  log = tmp_path / 'gcloud.jsonl'
  env = {'HOME': str(home), 'FAKE_LOG': str(log)}
  path = f'{fake}:{os.environ["PATH"]}'

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  yield home, env, path, calls
  pidfile = home / 'clip_jax_train.pid'
  if pidfile.exists():  # a test that failed half-way: stop the stand-in it started
    try:
      os.kill(int(pidfile.read_text()), 9)
    except (ProcessLookupError, ValueError):
      pass


@pytest.mark.parametrize('describe, rc, expected', [
    ('', 1, ['describe', 'create']),
    ('READY\tv4-32', 0, ['describe']),
    ('PREEMPTED\tv4-32', 0, ['describe', 'delete', 'create']),
    ('STOPPED\tv4-32', 0, ['describe', 'start']),
])
def test_tpu_create_or_reuse(fake_pod, describe, rc, expected):
  _, env, path, calls = fake_pod
  env.update(FAKE_DESCRIBE=describe, FAKE_DESCRIBE_RC=str(rc))
  run('tpu_pod.sh', 'create', *POD, '--accelerator_type', 'v4-32', '--version', 'tpu-ubuntu2204-base',
      env=env, path=path, check=0)
  assert [c[3] for c in calls()] == expected


def test_tpu_create_refuses_other_accelerator(fake_pod):
  _, env, path, calls = fake_pod
  env.update(FAKE_DESCRIBE='READY\tv4-16')
  p = run('tpu_pod.sh', 'create', *POD, '--accelerator_type', 'v4-32', '--version', 'v', env=env, path=path,
          check=2)
  assert "exists as v4-16, not v4-32" in p.stderr and [c[3] for c in calls()] == ['describe']


def test_tpu_train_and_stop_run_the_remote_commands(fake_pod):
  home, env, path, calls = fake_pod
  args = ['--config', 'configs/clip.py:ViT-B/16', *NASTY]
  run('tpu_pod.sh', 'train', '--detach', *POD, '--workdir', 'gs://b/run', '--', *args, env=env, path=path,
      check=0)
  deadline = time.time() + 10
  while not (home / 'argv').exists() and time.time() < deadline:
    time.sleep(0.05)
  argv = (home / 'argv').read_bytes().decode().split('\0')[:-1]
  assert argv == ['-m', 'clip_jax.train', '--workdir=gs://b/run', '--distributed=on', *args]
  assert (home / 'clip_jax_train.pid').exists() and 'start on' in (home / 'clip_jax_train.log').read_text()
  # A second start on a worker whose trainer still runs is refused.
  again = run('tpu_pod.sh', 'train', '--detach', *POD, '--workdir', 'gs://b/run', '--', *args, env=env,
              path=path)
  assert again.returncode != 0 and 'already running' in again.stderr
  # So is an install, which would replace the code under it (the tarball is made for real here).
  (home / 'clip_jax' / 'marker').write_text('')
  install = run('tpu_pod.sh', 'install', *POD, env=dict(env, TMPDIR=str(home.parent)), path=path)
  assert install.returncode != 0 and 'already running' in install.stderr and (home / 'clip_jax' / 'marker').exists()
  assert 'launch/tpu_pod.sh' in subprocess.run(['tar', '-tzf', str(home.parent / 'clip_jax-pod-1.tar.gz')],
                                               capture_output=True, text=True, check=True).stdout
  run('tpu_pod.sh', 'stop', *POD, '--grace', '10', env=env, path=path, check=0)
  assert (home / 'got_term').read_text().strip() == 'TERM'
  assert not (home / 'clip_jax_train.pid').exists()
  assert [c[3] for c in calls()] == ['ssh', 'ssh', 'scp', 'ssh', 'ssh']
  assert all('--worker=all' in c for c in calls())


# ---- slurm.sbatch ----------------------------------------------------------------------------

SLURM_2x4 = {'SLURM_JOB_ID': '123456', 'SLURM_JOB_NODELIST': 'gpu[07-08]', 'SLURM_NNODES': '2',
             'SLURM_NTASKS': '8', 'SLURM_NTASKS_PER_NODE': '4', 'SLURM_TASKS_PER_NODE': '4(x2)'}
PORT = 10000 + 123456 % 20000


@pytest.mark.parametrize('nodelist, hosts', [
    ('gpu01', ['gpu01']),
    ('gpu[01-04],gpu07', ['gpu01', 'gpu02', 'gpu03', 'gpu04', 'gpu07']),
    ('node[8-11,20]', ['node8', 'node9', 'node10', 'node11', 'node20']),
    ('a[098-101]-ib,b7,c[1,3]', ['a098-ib', 'a099-ib', 'a100-ib', 'a101-ib', 'b7', 'c1', 'c3']),
])
def test_nodelist_parser(nodelist, hosts):
  assert run('slurm.sbatch', '--expand-nodelist', nodelist, check=0).stdout.split() == hosts


@pytest.mark.parametrize('nodelist', ['gpu[01-02', 'r[1-2]n[1-2]', 'gpu[a-b]'])
def test_nodelist_parser_refuses(nodelist):
  assert 'cannot parse node list' in run('slurm.sbatch', '--expand-nodelist', nodelist, check=2).stderr


def test_slurm_dry_run_2_nodes_x_4_gpus(tmp_path):
  args = ['--config', 'configs/clip.py:ViT-B/16', '--workdir', '/shared/runs/x', *NASTY]
  p = run('slurm.sbatch', '--dry-run', *args, env=SLURM_2x4, path=str(bin_dir(tmp_path)), check=0)  # no scontrol
  cmds = commands(p.stdout)
  assert cmds[0] == ['export', f'CLIP_JAX_COORDINATOR_ADDRESS=gpu07:{PORT}', 'CLIP_JAX_NUM_PROCESSES=8']
  srun = cmds[1]
  assert srun[:6] == ['srun', '--nodes=2', '--ntasks=8', '--kill-on-bad-exit=1', 'bash', '-c']
  assert 'CLIP_JAX_PROCESS_ID=$SLURM_PROCID' in srun[6] and 'exec python -m clip_jax.train "$@"' in srun[6]
  assert srun[7:] == ['clip_jax.train', *args]
  tasks = [line for line in p.stdout.splitlines() if line.startswith('# task ')]
  assert len(tasks) == 8
  for i, line in enumerate(tasks):
    head, env = line.split(': ', 1)
    assert head == f'# task {i} on gpu0{7 + i // 4}'
    assert dict(kv.split('=') for kv in env.split()) == {
        'CLIP_JAX_COORDINATOR_ADDRESS': f'gpu07:{PORT}', 'CLIP_JAX_NUM_PROCESSES': '8',
        'CLIP_JAX_PROCESS_ID': str(i), 'JAX_LOCAL_DEVICE_IDS': str(i % 4)}


def test_slurm_dry_run_uneven_layout_port_override_and_cpus():
  env = {'SLURM_JOB_ID': '7', 'SLURM_JOB_NODELIST': 'n[1-3]', 'SLURM_NTASKS': '5', 'SLURM_TASKS_PER_NODE': '2(x2),1',
         'SLURM_CPUS_PER_TASK': '6', 'CLIP_JAX_PORT': '4000'}
  p = run('slurm.sbatch', '--dry-run', '--config=c', '--workdir=w', env=env, check=0)
  assert commands(p.stdout)[:2] == [['export', 'CLIP_JAX_COORDINATOR_ADDRESS=n1:4000', 'CLIP_JAX_NUM_PROCESSES=5'],
                                   ['export', 'SRUN_CPUS_PER_TASK=6']]
  assert commands(p.stdout)[2][1:3] == ['--nodes=3', '--ntasks=5']
  hosts = [line.split()[4].rstrip(':') for line in p.stdout.splitlines() if line.startswith('# task ')]
  assert hosts == ['n1', 'n1', 'n2', 'n2', 'n3']


FAKE_SRUN = '''#!/bin/bash
# Runs the step's tasks one after the other on this machine: 2 nodes x 4 tasks.
while [[ $1 == --* ]]; do shift; done
for procid in 0 1 2 3 4 5 6 7; do
  local=$((procid % 4))
  if [[ $FAKE_BIND == one ]]; then gpus=$local; else gpus=0,1,2,3; fi
  SLURM_PROCID=$procid SLURM_LOCALID=$local CUDA_VISIBLE_DEVICES=$gpus "$@" || exit $?
done
'''

FAKE_PYTHON = '''#!{python}
import json, os, sys
keys = ('CLIP_JAX_COORDINATOR_ADDRESS', 'CLIP_JAX_NUM_PROCESSES', 'CLIP_JAX_PROCESS_ID', 'JAX_LOCAL_DEVICE_IDS')
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(json.dumps({{'argv': sys.argv[1:], 'env': {{k: os.environ.get(k) for k in keys}}}}) + '\\n')
'''


@pytest.mark.parametrize('bind', ['all', 'one'])
def test_slurm_real_path_with_fake_srun(tmp_path, bind):
  fake = bin_dir(tmp_path, srun=FAKE_SRUN, python=FAKE_PYTHON.format(python=sys.executable))
  log = tmp_path / 'tasks.jsonl'
  env = dict(SLURM_2x4, FAKE_LOG=str(log), FAKE_BIND=bind, CLIP_JAX_PYTHON=str(fake / 'python'))
  args = ['--config', 'configs/clip.py:ViT-B/16', '--workdir', '/shared/runs/x', *NASTY]
  p = run('slurm.sbatch', *args, env=env, path=f'{fake}:/usr/bin:/bin', check=0)
  assert f'8 processes on 2 nodes, coordinator gpu07:{PORT}' in p.stderr
  tasks = [json.loads(line) for line in log.read_text().splitlines()]
  assert [t['argv'] for t in tasks] == [['-m', 'clip_jax.train', *args]] * 8
  assert [t['env'] for t in tasks] == [
      {'CLIP_JAX_COORDINATOR_ADDRESS': f'gpu07:{PORT}', 'CLIP_JAX_NUM_PROCESSES': '8', 'CLIP_JAX_PROCESS_ID': str(i),
       'JAX_LOCAL_DEVICE_IDS': str(i % 4) if bind == 'all' else '0'} for i in range(8)]


@pytest.mark.parametrize('env, args, message', [
    ({}, ['--config', 'c', '--workdir', 'w'], '$SLURM_JOB_ID is not set'),
    ({k: v for k, v in SLURM_2x4.items() if k != 'SLURM_NTASKS'}, ['--config', 'c', '--workdir', 'w'],
     '$SLURM_NTASKS is not set'),
    (SLURM_2x4, ['--config', 'c'], '--workdir DIR is required'),
    (SLURM_2x4, ['--workdir', 'w'], '--config is required'),
    (dict(SLURM_2x4, SLURM_JOB_NODELIST='gpu[1-'), ['--config', 'c', '--workdir', 'w'], 'cannot parse node list'),
])
def test_slurm_errors(tmp_path, env, args, message):
  p = run('slurm.sbatch', '--dry-run', *args, env=env, path=str(bin_dir(tmp_path)), check=2)
  assert message in p.stderr


def test_slurm_help():
  p = run('slurm.sbatch', '--help', check=0)
  assert 'One trainer process per GPU' in p.stdout and 'SBATCH' not in p.stdout


# ---- slurm.sh --------------------------------------------------------------------------------

def test_slurm_submit_dry_run():
  args = ['--config', 'configs/clip.py:ViT-B/16', '--workdir', '/shared/runs/x', *NASTY]
  p = run('slurm.sh', '--dry-run', '--nodes', '2', '--gpus_per_node=8', '--partition', 'gpu', '--time', '1-00:00:00',
          '--account', 'proj', '--', *args, check=0)
  assert commands(p.stdout) == [['sbatch', '--nodes=2', '--ntasks-per-node=8', '--gpus-per-node=8', '--partition=gpu',
                                 '--time=1-00:00:00', '--account=proj', str(LAUNCH / 'slurm.sbatch'), *args]]


@pytest.mark.parametrize('args, message', [
    (['--nodes', '2', '--bogus', 'x', '--', '--config', 'c', '--workdir', 'w'], "unknown flag '--bogus'"),
    (['--nodes', 'two', '--', '--config', 'c', '--workdir', 'w'], '--nodes must be a positive number'),
    (['--', '--config', 'c'], '--workdir DIR is required'),
    (['--nodes', '2'], 'trainer arguments missing'),
])
def test_slurm_submit_errors(args, message):
  assert message in run('slurm.sh', '--dry-run', *args, check=2).stderr
