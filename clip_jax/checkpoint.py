"""orbax checkpoints: the whole run in one atomic, async, keep-N checkpoint.

A checkpoint (one step directory under WORKDIR/checkpoints) holds four items,
and a fifth for a run with a teacher:

  variables  params (frozen subtrees included: the whole model) + mutable model
             collections (BatchNorm statistics)
  train      step, optimizer state, RNG, consecutive-bad-step counter
  data       each process's input-iterator position (one file per process)
  config     the run's full config as JSON
  teacher    the frozen teacher's variables (config.teacher; clip_jax.train.frozen)

Splitting `variables` from `train` lets `load()` read a model for evaluation
or export without the optimizer state. orbax writes into a temporary
directory and renames it on commit, so a run killed mid-save leaves the
previous checkpoint as the latest.
"""

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clip_jax.train import frozen as frozen_lib

# orbax splits each replicated array among its replicas to write the parts in parallel, slicing it
# with one eager jit per (shape, device): on an 8-device data-parallel mesh the first save of the
# tiny digits model compiled 96 slices (~0.25 s each on CPU, about 24 s). Parallel writes pay off
# only for large parts, so arrays whose per-replica part is smaller than this are written whole
# by one replica. Registered for jax.Array in this process (orbax's handler registry is global).
REPLICA_PARALLEL_MIN_BYTES = 16 << 20
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
    override=True)


# ---- per-process input-iterator state -------------------------------------

class DataStateHandler(ocp.CheckpointHandler):
  """Each process writes (and later reads) its own iterator state file."""

  @staticmethod
  def _path(directory) -> epath.Path:
    return epath.Path(directory) / f'process_{jax.process_index()}-of-{jax.process_count()}.bin'

  def save(self, directory, args: 'DataStateSave'):
    self._path(directory).write_bytes(args.state)

  def restore(self, directory, args: Optional['DataStateRestore'] = None) -> bytes:
    path = self._path(directory)
    if not path.exists():
      raise FileNotFoundError(
          f'{path} is missing: this checkpoint was written by a run with a different process count '
          f'({sorted(p.name for p in epath.Path(directory).iterdir())}); resume with the same number of processes')
    return path.read_bytes()

  def metadata(self, directory):
    return None

  def structure(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: bytes


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ---- the manager -------------------------------------------------------------

def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a bucket URL (gs://...) stays a URL, a local path becomes absolute."""
  if '://' in str(workdir):
    return str(workdir).rstrip('/') + '/checkpoints'
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, max_to_keep: int = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                         create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options, item_names=('variables', 'train', 'data', 'config', 'teacher'),
      item_handlers={'data': DataStateHandler()})


def _config_json(config: ml_collections.ConfigDict) -> dict:
  out = json.loads(config.to_json_best_effort())
  teacher = out.get('teacher')
  if isinstance(teacher, dict) and not teacher.get('model'):
    # The teacher's architecture came from its source run: saved here, so the checkpoint stands alone.
    from clip_jax.train import pretrained  # pylint: disable=g-import-not-at-top
    teacher['model'] = json.loads(pretrained.teacher_config(config).to_json_best_effort())
  return out


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: bytes,
         config: ml_collections.ConfigDict, force: bool = False) -> bool:
  """Starts an (async) save of the whole run at `step`; frozen variables are saved once, without optimizer state."""
  variables = {'params': frozen_lib.merge(state.params, state.frozen.get('params', {})), **state.model_state}
  train = {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng, 'bad_steps': state.bad_steps}
  items = dict(variables=ocp.args.StandardSave(variables), train=ocp.args.StandardSave(train),
               data=DataStateSave(data_state), config=ocp.args.JsonSave(_config_json(config)))
  if frozen_lib.TEACHER in state.frozen:
    items['teacher'] = ocp.args.StandardSave(state.frozen[frozen_lib.TEACHER])
  return mngr.save(step, force=force, args=ocp.args.Composite(**items))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """(state, data iterator state) restored onto the shardings of `abstract_state`'s leaves."""
  frozen = abstract_state.frozen
  abstract_vars = {'params': frozen_lib.merge(abstract_state.params, frozen.get('params', {})),
                   **abstract_state.model_state}
  abstract_train = {'step': abstract_state.step, 'opt_state': abstract_state.opt_state,
                    'rng': abstract_state.rng, 'bad_steps': abstract_state.bad_steps}
  items = dict(variables=ocp.args.StandardRestore(abstract_vars), train=ocp.args.StandardRestore(abstract_train),
               data=DataStateRestore())
  if frozen_lib.TEACHER in frozen:
    items['teacher'] = ocp.args.StandardRestore(frozen[frozen_lib.TEACHER])
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  variables, train = out['variables'], out['train']
  params, fixed = frozen_lib.unmerge(variables['params'], abstract_state.params, frozen.get('params', {}))
  restored_frozen = {'params': fixed} if fixed else {}
  if frozen_lib.TEACHER in frozen:
    restored_frozen[frozen_lib.TEACHER] = out['teacher']
  state = abstract_state.replace(
      params=params, model_state={k: v for k, v in variables.items() if k != 'params'},
      step=train['step'], opt_state=train['opt_state'], rng=train['rng'], bad_steps=train['bad_steps'],
      frozen=restored_frozen)
  return state, out['data']


def _open(workdir: str, step: Optional[int]) -> tuple[ocp.CheckpointManager, int]:
  """A read-only manager and the step to read (latest by default), or a clear error."""
  mngr = manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}: train first, or pass the run\'s workdir')
  if step not in mngr.all_steps():
    raise FileNotFoundError(f'no checkpoint for step {step} in {checkpoint_dir(workdir)}; '
                            f'available: {sorted(mngr.all_steps())}')
  return mngr, step


def _read_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  raw = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  return config_from_json(raw)


def config_from_json(raw: Any) -> ml_collections.ConfigDict:
  """JSON turned tuples into lists; ConfigDict fields that were tuples (resnet layers) go back."""
  def fix(node):
    if isinstance(node, dict):
      return {k: fix(v) for k, v in node.items()}
    if isinstance(node, list):
      return tuple(fix(v) for v in node)
    return node
  return ml_collections.ConfigDict(fix(raw))


def load(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, variables) of a run's checkpoint (latest by default), as host numpy arrays.

  Needs neither the optimizer state nor the mesh the run trained on.
  """
  from clip_jax import models  # pylint: disable=g-import-not-at-top
  mngr, step = _open(workdir, step)
  config = _read_config(mngr, step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        models.abstract_variables(config.model))
  return config, _to_host(mngr.restore(step, args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(target)))['variables'])


def _to_host(tree):
  """Device arrays -> numpy leaf by leaf, each device buffer dropped once copied (never two full copies)."""
  leaves, treedef = jax.tree.flatten(tree)
  del tree
  for i, leaf in enumerate(leaves):
    leaves[i] = np.asarray(jax.device_get(leaf))
    del leaf
  return jax.tree.unflatten(treedef, leaves)


def load_teacher(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, dict]:
  """(teacher model config, variables) of a run with a frozen teacher (config.teacher), as host numpy arrays."""
  from clip_jax import models  # pylint: disable=g-import-not-at-top
  mngr, step = _open(workdir, step)
  config = _read_config(mngr, step)
  if not config.get('teacher') or not config.teacher.get('model'):
    raise ValueError(f'the run in {workdir} has no teacher (config.teacher); only distillation runs (ViLD) do')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        models.abstract_variables(config.teacher.model))
  variables = mngr.restore(step, args=ocp.args.Composite(teacher=ocp.args.StandardRestore(target)))['teacher']
  return config.teacher.model, jax.tree.map(np.asarray, variables)


def load_config(workdir: str, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config a run saved with its checkpoint (latest by default); reads nothing else."""
  mngr, step = _open(workdir, step)
  return _read_config(mngr, step)
