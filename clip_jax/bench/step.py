"""Train-step timing, FLOPs and MFU: the pieces `python -m clip_jax.bench train` is built from.

FLOPs are the model's: XLA's cost analysis of the step as traced with the
transformer blocks unrolled and nothing rematerialised (`model_flops`), over
the devices. The compiled program's own count would be wrong both ways: a
scanned stack's loop body counts once, and rematerialised matmuls count twice.
MFU is per device: those FLOPs over the step time over one device's peak.
The peak is measured in the same run by a dense matmul on the same device,
in the model's compute dtype; on a known GPU/TPU the datasheet's dense bf16
peak is reported beside it.
"""

import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) bf16 peak per chip, FLOP/s, by a substring of `device_kind`; first match wins,
# so the more specific names come first. H100/H200: the SXM parts (PCIe H100: 756 TFLOP/s).
DATASHEET_BF16_PEAK = (
    ('H200', 989e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('L4', 121e12),
    ('TPU v6 lite', 918e12),
    ('TPU v6e', 918e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v4', 275e12),
    ('TPU v3', 123e12),
)


def datasheet_peak(device) -> Optional[float]:
  """The dense bf16 datasheet peak (FLOP/s) of `device` (a jax Device or its device_kind), or None (CPU, unknown)."""
  kind = device if isinstance(device, str) else device.device_kind
  if not isinstance(device, str) and device.platform == 'cpu':
    return None
  for name, peak in DATASHEET_BF16_PEAK:
    if name.lower() in kind.lower():
      return peak
  return None


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_s: Optional[float]) -> Optional[float]:
  """Model FLOPs utilisation: achieved FLOP/s over the peak (None without a peak)."""
  if not peak_flops_per_s:
    return None
  if flops_per_step <= 0 or step_seconds <= 0:
    raise ValueError(f'mfu needs positive flops and time, got {flops_per_step} FLOPs in {step_seconds} s')
  return flops_per_step / step_seconds / peak_flops_per_s


def cost_flops(program) -> float:
  """FLOPs of one execution of a lowered or compiled jax function (`jit(f).lower(...)[.compile()]`), per XLA."""
  analysis = program.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0]
  if not analysis or 'flops' not in analysis:
    raise ValueError('XLA reported no FLOP count for this program')
  return float(analysis['flops'])


def matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32, device=None) -> float:
  """FLOP/s of an n x n dense matmul on `device`: the best of `repeats` timed calls after a warm-up."""
  device = device or jax.devices()[0]
  rng = np.random.default_rng(0)
  a = jax.device_put(jnp.asarray(rng.standard_normal((n, n)), dtype), device)
  b = jax.device_put(jnp.asarray(rng.standard_normal((n, n)), dtype), device)
  fn = jax.jit(jnp.matmul).lower(a, b).compile()
  fn(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def random_batch(abstract: dict, vocab_size: int, seed: int = 0) -> dict:
  """Host arrays shaped as `abstract` (name -> ShapeDtypeStruct): uint8 images, token rows ending in EOT."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, spec in abstract.items():
    if key == 'tokens':
      b, length = spec.shape
      tokens = rng.integers(1, vocab_size - 1, (b, length))
      ends = rng.integers(length // 4, length, b)
      tokens[np.arange(b), ends] = vocab_size - 1  # EOT: the largest id, as CLIP's BPE
      tokens[np.arange(length)[None] > ends[:, None]] = 0
      out[key] = tokens.astype(spec.dtype)
    elif np.issubdtype(spec.dtype, np.integer):
      out[key] = rng.integers(0, 256 if spec.dtype == np.uint8 else 2, spec.shape).astype(spec.dtype)
    else:
      out[key] = rng.standard_normal(spec.shape).astype(spec.dtype)
  return out


def model_flops(config) -> float:
  """FLOPs of one train step of `config` for the whole mesh: its lowering with the blocks in a Python
  loop and remat 'none' (no compilation), so a scan or remat setting does not change the count."""
  from clip_jax import sharding  # pylint: disable=g-import-not-at-top
  from clip_jax.train import trainer  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  for field, plain in (('scan_layers', False), ('remat', 'none')):
    if field in c.model:
      c.model[field] = plain
  s = trainer.setup(c)
  with sharding.use(s.mesh, s.rules):
    return cost_flops(trainer.jit_step(s).lower(s.abstract_state, trainer.abstract_batch(s)))


class JaxStep:
  """clip_jax's train step for a config, compiled once (AOT), its inputs already on device.

  Calls go to the compiled executable, so a change of input shape or sharding is
  an error, never a silent recompilation.
  """

  def __init__(self, config, seed: int = 0):
    from clip_jax import sharding  # pylint: disable=g-import-not-at-top
    from clip_jax.train import trainer  # pylint: disable=g-import-not-at-top
    self.batch_size = config.batch_size
    s = trainer.setup(config)
    self._context = lambda: sharding.use(s.mesh, s.rules)
    abstract = trainer.abstract_batch(s)
    with self._context():
      start = time.perf_counter()
      self.compiled = trainer.jit_step(s).lower(s.abstract_state, abstract).compile()
      self.compile_seconds = time.perf_counter() - start
      self.state = s.init_state(jax.random.PRNGKey(seed))
      self.batch = trainer.global_batch(s.mesh, random_batch(abstract, config.model.text.vocab_size, seed))
    jax.block_until_ready((self.state, self.batch))
    self.devices = s.mesh.size
    self.flops = model_flops(config) / self.devices  # per device
    self.device = s.mesh.devices.flat[0]
    self.dtype = jnp.dtype(config.model.get('dtype', 'float32'))  # the matmuls' compute dtype

  def __call__(self) -> float:
    """Runs one step to completion; its wall time in seconds."""
    start = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - start


def time_steps(step: Callable[[], float], n: int) -> list:
  return [step() for _ in range(n)]


def summarise(times: list, batch_size: int) -> dict:
  median = statistics.median(times)
  return dict(step_seconds=times, median_step_seconds=median, images_per_second=batch_size / median)
