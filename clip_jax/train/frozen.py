"""Parameters no optimizer touches: frozen subtrees of the model, and teacher models.

Two kinds of fixed variables live in `TrainState.frozen`, a dict with up to
two entries:

  'params'   subtrees of the model's own parameters named by
             `config.frozen.params` ('/'-separated paths under params, e.g.
             ('text',) for LSeg's CLIP text tower). They are split off the
             trainable tree when the state is created and merged back into
             `params` for every forward, so the model sees one tree.
  'teacher'  the variables of a second model, `config.teacher` (ViLD's CLIP
             teacher), handed to the objective's forward next to the model's.

Neither is differentiated (the step takes gradients with respect to the
trainable params only), so neither gets optimizer state or updates, and the
step returns them as they came: bitwise unchanged. Both are born sharded
like every other leaf, from their logical axis names and the one rules
table. A checkpoint holds each once: the model's frozen subtrees inside its
`variables` item (so `checkpoint.load` returns the whole model), the teacher
in a `teacher` item of its own.
"""

from typing import Any, Mapping, Sequence

import ml_collections

TEACHER = 'teacher'


def default_config() -> ml_collections.ConfigDict:
  """`config.frozen`: nothing frozen."""
  return ml_collections.ConfigDict(dict(params=()))


def paths_of(config) -> tuple[tuple[str, ...], ...]:
  """`config.frozen.params` as key tuples; () when the run freezes nothing."""
  spec = config.get('frozen')
  raw = tuple(spec.get('params', ())) if spec else ()
  out = []
  for path in raw:
    if not isinstance(path, str) or not path.strip('/'):
      raise ValueError(f'config.frozen.params={raw!r}: give \'/\'-separated parameter paths, e.g. (\'text\',) or '
                       "('vision/transformer',)")
    out.append(tuple(path.strip('/').split('/')))
  for i, a in enumerate(out):
    for b in out[i + 1:]:
      if a[:len(b)] == b or b[:len(a)] == a:
        raise ValueError(f'config.frozen.params: {"/".join(a)!r} and {"/".join(b)!r} overlap; name each '
                         'subtree once')
  return tuple(out)


def _describe(tree: Mapping, prefix: tuple) -> str:
  keys = sorted(tree) if isinstance(tree, Mapping) else []
  where = '/'.join(prefix) or 'params'
  return f'{where} has {keys}' if keys else f'{where} is a leaf'


def split(params: Mapping, paths: Sequence[tuple[str, ...]]) -> tuple[dict, dict]:
  """(trainable, frozen): `params` with each path's subtree moved into a second tree of the same nesting.

  Raises ValueError naming a path that is not a subtree of `params` and what is there instead.
  """
  trainable = _copy_dicts(params)
  frozen: dict = {}
  for path in paths:
    node, dst = trainable, frozen
    for depth, key in enumerate(path):
      if not isinstance(node, Mapping) or key not in node:
        raise ValueError(f'config.frozen.params names {"/".join(path)!r}, which is not in the model\'s '
                         f'parameters ({_describe(node, path[:depth])}); name an existing subtree')
      if depth == len(path) - 1:
        dst[key] = node.pop(key)
      else:
        node = node[key]
        dst = dst.setdefault(key, {})
  return trainable, frozen


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  """The model's whole parameter tree: the inverse of `split`."""
  if not frozen:
    return trainable
  out = dict(trainable)
  for key, sub in frozen.items():
    if key in out and isinstance(out[key], Mapping) and isinstance(sub, Mapping):
      out[key] = merge(out[key], sub)
    else:
      out[key] = sub
  return out


def unmerge(merged: Mapping, trainable_like: Mapping, frozen_like: Mapping) -> tuple[dict, dict]:
  """`merge`'s inverse for a tree shaped like merge(trainable_like, frozen_like) (a restored checkpoint)."""
  trainable, frozen = {}, {}
  for key, value in merged.items():
    if key in frozen_like and key in trainable_like:  # a dict both trees reach into
      trainable[key], frozen[key] = unmerge(value, trainable_like[key], frozen_like[key])
    elif key in frozen_like:
      frozen[key] = value
    else:
      trainable[key] = value
  return trainable, frozen


def model_variables(params: Mapping, model_state: Mapping, frozen: Mapping) -> dict:
  """The variables one forward sees: all parameters, mutable collections, and the teacher's (if any)."""
  out = {'params': merge(params, frozen.get('params', {})), **model_state}
  if TEACHER in frozen:
    out[TEACHER] = frozen[TEACHER]
  return out


def _copy_dicts(tree: Any) -> Any:
  return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree
