"""Shared pieces of the input-pipeline tests (both loaders)."""

import numpy as np

from clip_jax.data import digits
from clip_jax.data import pipeline

L = 16  # context length: digits captions fit


def make(c, batch_size=8, image_size=32, seed=0, train=True, process_index=0, process_count=1):
  return pipeline.make_iterator(c, batch_size=batch_size, image_size=image_size, context_length=L,
                                seed=seed, train=train, process_index=process_index,
                                process_count=process_count)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def image_index(split, n):
  """{image bytes: index} of the digits scenes (eval geometry at 64 is the identity)."""
  src = digits.DigitsSource(split, n)
  table = {src[i]['image'].tobytes(): i for i in range(n)}
  assert len(table) == n
  return table


def assert_eval_resumes_mid_pass(c, num_batches):
  """After one eval batch, a new iterator given the state yields exactly the rest of the pass."""
  it = make(c, train=False)
  next(it)
  state = it.get_state()
  rest = list(it)
  resumed = make(c, train=False)
  resumed.set_state(state)
  got = list(resumed)
  assert len(got) == len(rest) == num_batches
  for a, b in zip(got, rest):
    assert_batches_equal(a, b)
