"""Multi-process start-up: one JAX process per TPU VM host or per GPU.

Every process runs the same command. `resolve()` decides how the processes
find each other, from flags or the environment:

  explicit   --coordinator_address HOST:PORT --num_processes N --process_id I
             (or CLIP_JAX_COORDINATOR_ADDRESS / CLIP_JAX_NUM_PROCESSES /
             CLIP_JAX_PROCESS_ID): launch/local.sh and launch/slurm.sbatch.
  cluster    JAX's own detection (TPU pod VMs, SLURM steps with several tasks):
             `--distributed=on`, or `auto` when SLURM / TPU worker variables
             say there are several processes.
  single     nothing of the above: one process, no coordinator.

`initialize()` connects (with a timeout and a message that says what to
check when the coordinator cannot be reached); `check_same_config()` then
makes sure every process is about to train the same run, since processes
that disagree on e.g. the batch size would otherwise deadlock or silently
train something else.
"""

import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
from typing import Mapping, Optional

import numpy as np

log = logging.getLogger(__name__)

ENV = {'coordinator_address': 'CLIP_JAX_COORDINATOR_ADDRESS',
       'num_processes': 'CLIP_JAX_NUM_PROCESSES',
       'process_id': 'CLIP_JAX_PROCESS_ID'}
MODES = ('auto', 'on', 'off')


class DistributedError(RuntimeError):
  """The processes of a multi-process run could not be set up consistently."""


@dataclasses.dataclass(frozen=True)
class Spec:
  mode: str  # 'single' | 'explicit' | 'cluster'
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None


def _cluster_env(environ: Mapping[str, str]) -> Optional[str]:
  """Names the cluster whose variables say this is one of several processes, if any."""
  if 'SLURM_JOB_ID' in environ and 'SLURM_STEP_ID' in environ:
    ntasks = environ.get('SLURM_STEP_NUM_TASKS') or environ.get('SLURM_NTASKS') or '1'
    if ntasks.isdigit() and int(ntasks) > 1:
      return 'SLURM'
  hosts = environ.get('TPU_WORKER_HOSTNAMES', '')
  if ',' in hosts:
    return 'TPU pod'
  return None


def resolve(distributed: str = 'auto', coordinator_address: Optional[str] = None,
            num_processes: Optional[int] = None, process_id: Optional[int] = None,
            environ: Optional[Mapping[str, str]] = None) -> Spec:
  """How this process joins the run (see the module docstring)."""
  environ = os.environ if environ is None else environ
  if distributed not in MODES:
    raise ValueError(f'--distributed={distributed!r}: choose one of {MODES}')
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  for key, var in ENV.items():
    if given[key] is None and environ.get(var):
      given[key] = environ[var]
  explicit = {k: v for k, v in given.items() if v is not None}
  if distributed == 'off':
    return Spec('single')
  if explicit:
    missing = [f'--{k}' for k in given if given[k] is None]
    if missing:
      raise ValueError(f'an explicit multi-process setup needs all of --coordinator_address, '
                       f'--num_processes and --process_id (or their {"/".join(ENV.values())} '
                       f'variables); missing {missing}')
    address = str(given['coordinator_address'])
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit():
      raise ValueError(f'--coordinator_address={address!r}: use HOST:PORT, e.g. 10.0.0.2:12345')
    try:
      n, i = int(given['num_processes']), int(given['process_id'])
    except ValueError:
      raise ValueError(f'--num_processes={given["num_processes"]!r} and --process_id='
                       f'{given["process_id"]!r} must be integers') from None
    if n < 1 or not 0 <= i < n:
      raise ValueError(f'--process_id={i} must be in [0, --num_processes={n})')
    return Spec('explicit', address, n, i)
  cluster = _cluster_env(environ)
  if distributed == 'on' or cluster:
    return Spec('cluster')
  return Spec('single')


def initialize(spec: Spec, timeout_s: int = 300) -> None:
  """Connects this process to the others (no-op for a single process).

  When the coordinator cannot be reached (or, on process 0, the others never
  arrive), XLA's coordination client aborts the process from C++ with a bare
  DEADLINE_EXCEEDED. A watchdog thread fires first: it prints what to check and
  exits with status 2 (no checkpoint is touched before this point).
  """
  if spec.mode == 'single':
    return
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = dict(initialization_timeout=int(timeout_s) + 60)  # ours fires first, with a message
  if spec.mode == 'explicit':
    kwargs.update(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                  process_id=spec.process_id)
    who = f'process {spec.process_id} of {spec.num_processes}'
    where = f'the coordinator at {spec.coordinator_address}'
  else:
    who, where = 'this process', "the coordinator JAX's cluster detection chose"
  message = (f'error: could not join the multi-process run through {where} within --init_timeout={timeout_s} s '
             f'({who}). Check that every process has started (process 0 runs the coordinator), that '
             'HOST:PORT is reachable from this host with the port open, and that every process got the same '
             '--coordinator_address and --num_processes.')
  watchdog = threading.Timer(timeout_s, _give_up, args=(message,))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # a setup jax rejects before connecting (bad address, already initialised)
    raise DistributedError(f'{message}\n{type(e).__name__}: {e}') from e
  finally:
    watchdog.cancel()
  log.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())


def _give_up(message: str) -> None:
  print(message, file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access  (the main thread is blocked inside XLA)


def _digest(text: str) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)


def config_json(config) -> str:
  return json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)


def check_same_config(config) -> None:
  """Every process must train the same config: compares hashes across processes and, where one
  differs, names the fields that differ from process 0's (process 0's config is broadcast)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = config_json(config)
  digests = np.asarray(multihost_utils.process_allgather(_digest(mine)))
  bad = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
  if not bad:
    return
  # Everyone takes part in the broadcast (a collective), then each process reports.
  encoded = np.frombuffer(mine.encode(), np.uint8)
  length = int(np.max(np.asarray(multihost_utils.process_allgather(np.array([encoded.size])))))
  padded = np.zeros(length, np.uint8)
  padded[:encoded.size] = encoded
  first = bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).rstrip(b'\0').decode()
  diff = _diff(json.loads(first), json.loads(mine))
  detail = ''
  if jax.process_index() in bad:
    detail = '; this process differs from process 0 at ' + ', '.join(
        f'{k}: process 0 has {a!r}, this one {b!r}' for k, (a, b) in list(diff.items())[:10])
  raise DistributedError(f'processes {bad} were started with a config different from process 0'
                         f'{detail}. Start every process with the same --config and --config.* flags.')


def _diff(a, b, prefix=''):
  out = {}
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      out.update(_diff(a.get(key), b.get(key), f'{prefix}{key}.'))
    return out
  if a != b:
    out[prefix.rstrip('.')] = (a, b)
  return out


def check_process_layout(mesh, batch_axes) -> None:
  """Each process feeds the rows [p*b, (p+1)*b) of the global batch: the mesh must give every
  process exactly that contiguous block of the batch-sharded dimension."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  nproc = jax.process_count()
  if nproc == 1:
    return
  if mesh.devices.size != jax.device_count():
    raise DistributedError(f'the mesh has {mesh.devices.size} devices but the {nproc} processes have '
                           f'{jax.device_count()} together ({jax.local_device_count()} here)')
  blocks = int(np.prod([mesh.shape[a] for a in batch_axes]))
  sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
  index = sharding.devices_indices_map((blocks,))
  owned = {}
  for device, (sl,) in index.items():
    owned.setdefault(device.process_index, set()).add(sl.start or 0)
  per = blocks // nproc if blocks % nproc == 0 else None
  for p in range(nproc):
    want = set(range(p * per, (p + 1) * per)) if per else None
    if want is None or owned.get(p) != want:
      raise DistributedError(
          f'mesh {dict(mesh.shape)} over {nproc} processes with {jax.local_device_count()} devices each: '
          f'process {p} would hold batch blocks {sorted(owned.get(p, ()))} of {blocks}, but each process '
          f'must hold one contiguous block of {blocks}/{nproc} (its own input rows). Keep mesh.tensor within '
          'one process (tensor <= local devices) and make data*fsdp a multiple of the process count.')
