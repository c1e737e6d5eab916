"""Run logs: metrics.jsonl, TensorBoard event files, the start-up summary."""

import json
import logging
import math
import time
from typing import Any, Mapping

from etils import epath
import jax
import numpy as np


class MetricsWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors it to TensorBoard.

  Only process 0 writes. The JSON log is appended (not truncated), so a
  resumed run continues the same file. WORKDIR may be a bucket URL (gs://...,
  through etils.epath): object stores cannot append, so there the file is
  rewritten whole at each write (a long run logs a few thousand rows).
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    self._path = directory / 'metrics.jsonl'
    self._remote = '://' in str(workdir)
    self._rows = []
    if self._remote:
      self._rows = self._path.read_text().splitlines() if self._path.exists() else []
    else:
      self._file = open(self._path, 'a', encoding='utf-8')
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(str(directory / 'tensorboard'))
      except Exception as e:  # optional (not installed, or no writer for this filesystem): the JSON log is the record
        if not isinstance(e, ImportError):
          logging.getLogger(__name__).warning('no TensorBoard events for %s: %s', workdir, e)
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    for key, value in metrics.items():
      value = np.asarray(value)
      row[key] = value.item() if value.size == 1 else value.tolist()
    line = json.dumps(row, allow_nan=True)
    if self._remote:
      self._rows.append(line)
      self._path.write_text('\n'.join(self._rows) + '\n')
    else:
      self._file.write(line + '\n')
      self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      if not self._remote:
        self._file.close()
      if self._tb is not None:
        self._tb.close()


def _per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` laid out with `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def startup_summary(mesh, abstract_state, state_shardings) -> str:
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
  pbytes = _per_device_bytes(abstract_state.params, state_shardings.params)
  obytes = _per_device_bytes(abstract_state.opt_state, state_shardings.opt_state)
  devices = jax.devices()
  lines = [
      f'devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}) over '
      f'{jax.process_count()} process(es)',
      'mesh: ' + ', '.join(f'{k}={v}' for k, v in mesh.shape.items()),
      f'parameters: {params:,}',
      f'per-device bytes: parameters {pbytes / 2**20:.2f} MiB, optimizer state {obytes / 2**20:.2f} MiB',
  ]
  for name, tree in sorted(getattr(abstract_state, 'frozen', {}).items()):  # clip_jax.train.frozen
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    fbytes = _per_device_bytes(tree, state_shardings.frozen[name])
    lines.append(f'frozen {name}: {count:,} values, {fbytes / 2**20:.2f} MiB per device, no optimizer state')
  return '\n'.join(lines)


class Throughput:
  """Examples per second between two log points (wall clock, includes input time)."""

  def __init__(self):
    self._t, self._n = time.perf_counter(), 0

  def add(self, examples: int):
    self._n += examples

  def rate(self) -> float:
    now = time.perf_counter()
    rate = self._n / max(now - self._t, 1e-9)
    self._t, self._n = now, 0
    return rate
