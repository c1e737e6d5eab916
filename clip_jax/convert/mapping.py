"""Declarative PyTorch <-> Flax parameter maps, shared by every converter.

A converter lists `Rule`s: which state-dict keys make which Flax variable and
how (transpose, reshape, stack). The same list converts both ways and checks a
state dict for missing, unexpected and mis-shaped entries before anything is
built, so a wrong checkpoint fails with the list of bad keys rather than a
deep shape error later.
"""

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
  path: tuple[str, ...]  # ('params', 'vision', 'conv1', 'kernel'), collection first
  keys: tuple[str, ...]  # PyTorch state-dict keys it is made from
  to_flax: Callable[..., np.ndarray]
  to_torch: Callable[[np.ndarray], Sequence[np.ndarray]]


def _same(x):
  return x


def copy(path, key):
  return Rule(tuple(path), (key,), _same, lambda x: (x,))


def linear_weight(path, key):
  """torch Linear [out, in] <-> Flax Dense kernel [in, out]."""
  return Rule(tuple(path), (key,), lambda w: w.T, lambda k: (k.T,))


def conv_weight(path, key):
  """torch OIHW <-> Flax HWIO."""
  return Rule(tuple(path), (key,), lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),))


def packed_qkv(path, weight_key, bias_key, heads):
  """torch in_proj [3d, d] (+ [3d]) <-> Flax qkv kernel [d, 3, heads, hd] (+ bias [3, heads, hd])."""
  def w_to_flax(w):
    d = w.shape[1]
    return w.reshape(3, heads, -1, d).transpose(3, 0, 1, 2)

  def w_to_torch(k):
    d = k.shape[0]
    return (k.transpose(1, 2, 3, 0).reshape(-1, d),)

  return [Rule(tuple(path) + ('kernel',), (weight_key,), w_to_flax, w_to_torch),
          Rule(tuple(path) + ('bias',), (bias_key,), lambda b: b.reshape(3, heads, -1), lambda b: (b.reshape(-1),))]


def separate_qkv(path, prefixes: Sequence[str], heads):
  """Three torch Linears (q, k, v) <-> one Flax qkv kernel [d, 3, heads, hd]."""
  weights = tuple(p + '.weight' for p in prefixes)
  biases = tuple(p + '.bias' for p in prefixes)

  def w_to_flax(*ws):
    d = ws[0].shape[1]
    return np.stack([w.T.reshape(d, heads, -1) for w in ws], axis=1)

  def w_to_torch(k):
    d = k.shape[0]
    return tuple(k[:, i].reshape(d, -1).T for i in range(3))

  def b_to_flax(*bs):
    return np.stack([b.reshape(heads, -1) for b in bs], axis=0)

  return [Rule(tuple(path) + ('kernel',), weights, w_to_flax, w_to_torch),
          Rule(tuple(path) + ('bias',), biases, b_to_flax, lambda b: tuple(x.reshape(-1) for x in b))]


def attn_out(path, prefix, heads):
  """torch out_proj Linear [out, d] <-> Flax kernel [heads, hd, out] (+ bias)."""
  return [Rule(tuple(path) + ('kernel',), (prefix + '.weight',),
               lambda w: w.T.reshape(heads, -1, w.shape[0]), lambda k: (k.reshape(-1, k.shape[-1]).T,)),
          copy(tuple(path) + ('bias',), prefix + '.bias')]


def dense(path, prefix, bias=True):
  rules = [linear_weight(tuple(path) + ('kernel',), prefix + '.weight')]
  return rules + ([copy(tuple(path) + ('bias',), prefix + '.bias')] if bias else [])


def layer_norm(path, prefix):
  return [copy(tuple(path) + ('scale',), prefix + '.weight'), copy(tuple(path) + ('bias',), prefix + '.bias')]


def batch_norm(path, prefix):
  """Flax keeps BN statistics in the 'batch_stats' collection."""
  stats = ('batch_stats',) + tuple(path[1:])
  return [copy(tuple(path) + ('scale',), prefix + '.weight'), copy(tuple(path) + ('bias',), prefix + '.bias'),
          copy(stats + ('mean',), prefix + '.running_mean'), copy(stats + ('var',), prefix + '.running_var')]


def to_numpy(value: Any) -> np.ndarray:
  """torch tensors (any float dtype, fp16/bf16 included) or arrays -> numpy, floats as float32."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.floating) or value.dtype.name == 'bfloat16':
    value = value.astype(np.float32)
  return value


class StateDictError(ValueError):
  """A state dict that does not match the architecture; lists the bad keys."""


def _set(tree: dict, path: Sequence[str], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Sequence[str]):
  for p in path:
    tree = tree[p]
  return tree


def from_state_dict(state_dict: Mapping[str, Any], rules: Iterable[Rule], expected: Mapping,
                    ignore: Callable[[str], bool] = lambda k: False, what: str = 'state dict') -> dict:
  """Builds the Flax variables; `expected` is the abstract variables tree (shapes)."""
  rules = list(rules)
  wanted = {k for r in rules for k in r.keys}
  missing = sorted(wanted - set(state_dict))
  unexpected = sorted(k for k in state_dict if k not in wanted and not ignore(k))
  variables, misshaped = {}, []
  if not missing:
    for rule in rules:
      arrays = [to_numpy(state_dict[k]) for k in rule.keys]
      value = rule.to_flax(*arrays)
      try:
        want = tuple(_get(expected, rule.path).shape)
      except KeyError:
        raise StateDictError(f'internal: no variable {"/".join(rule.path)} in the model') from None
      if tuple(value.shape) != want:
        misshaped.append(f'{", ".join(rule.keys)}: {[tuple(a.shape) for a in arrays]} '
                         f'(gives {tuple(value.shape)}, model needs {want} at {"/".join(rule.path)})')
        continue
      _set(variables, rule.path, value.astype(_get(expected, rule.path).dtype))
  if missing or unexpected or misshaped:
    parts = [f'{what} does not match the model:']
    for name, items in (('missing keys', missing), ('unexpected keys', unexpected), ('mis-shaped keys', misshaped)):
      if items:
        shown = items[:20] + ([f'... and {len(items) - 20} more'] if len(items) > 20 else [])
        parts.append(f'  {name} ({len(items)}): ' + '; '.join(shown))
    raise StateDictError('\n'.join(parts))
  return variables


def to_state_dict(variables: Mapping, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
  out = {}
  variables = jax.device_get(variables)
  for rule in rules:
    values = rule.to_torch(np.asarray(_get(variables, rule.path), dtype=np.float32))
    for key, value in zip(rule.keys, values):
      value = np.asarray(value)
      out[key] = np.ascontiguousarray(value).reshape(value.shape)  # ascontiguousarray makes 0-d arrays 1-d
  return out
