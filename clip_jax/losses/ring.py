"""Chunked ("ring") contrastive losses: the global losses without the B x B logits.

`contrastive.py` writes the losses on the global batch and lets GSPMD gather
what each device needs, so every device materialises B x B (or b x B) logits,
which stops fitting long before the features do. Here, inside `jax.shard_map`,
each of the n batch shards keeps its b = B / n image rows while the text
chunks travel around a ring (`jax.lax.ppermute`): on hop h device k scores its
images against the texts of shard k - h, so after n hops every pair has been
scored once and no device ever held more than one b x b block.

Each block is rematerialised (`jax.checkpoint`), so the backward pass also
works one block at a time; autodiff keeps only what entered each hop (the
travelling b x D chunk and b-vectors), i.e. O(B x D) per device, never
O(B x B). The ring shift itself stays outside the checkpoint so the backward
pass does not repeat the communication.

Values and gradients equal the global losses' (float32, up to summation
order). Axes that do not split the batch (tensor) hold replicas that compute
the same numbers.
"""

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from clip_jax import sharding


def ring_softmax_loss(image_features, text_features, logit_scale, *, mesh=None, batch_axes=None):
  """`contrastive.softmax_loss`, streamed over a ring of the batch shards.

  Image->text rows need a logsumexp over all texts, text->image columns one
  over all images. Both are kept as running (online) logsumexps: the image
  rows' accumulator stays home, the text columns' accumulator travels with its
  text chunk, so each hop costs one b x b matmul. The diagonal (the targets)
  is read on hop 0, where the chunk is the device's own.

  Args:
    image_features: [B, D] L2-normalised features of the global batch.
    text_features: [B, D] likewise, row i paired with image row i.
    logit_scale: scalar multiplying the cosine similarities.
    mesh: the mesh to ring over; default the current one (`jax.set_mesh`,
      e.g. via `sharding.use`).
    batch_axes: mesh axes the batch is split over; default `sharding.BATCH_AXES`.

  Returns:
    The scalar loss, equal to `softmax_loss(image_features, text_features, logit_scale)`.
  """
  mesh, axes, n = _ring_layout(image_features, text_features, mesh, batch_axes)
  batch = image_features.shape[0]

  def shard(img, txt, scale):
    scaled = scale.astype(jnp.float32) * img.astype(jnp.float32)
    rows, cols, diagonal = _first_softmax_block(scaled, txt)

    def hop(carry, _):
      chunk, cols, rows = carry
      chunk, cols = _shift((chunk, cols), axes, n)  # the image rows' accumulator stays home
      rows, cols = _softmax_block(scaled, chunk, rows, cols)
      return (chunk, cols, rows), None

    if n > 1:
      (_, cols, rows), _ = jax.lax.scan(hop, (txt, cols, rows), length=n - 1)
    # Wherever a text chunk's accumulator ended up, every column is summed exactly once.
    local = 0.5 * (jnp.sum(_lse_value(rows)) + jnp.sum(_lse_value(cols))) - diagonal
    return _psum(local, axes) / batch

  return _run(shard, mesh, axes, (image_features, text_features), (logit_scale,))


def ring_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, *, mesh=None, batch_axes=None):
  """`contrastive.sigmoid_loss`, streamed over a ring of the batch shards (SigLIP's chunked form).

  Every pair is an independent binary term, so each hop just adds its block's
  sum; positives (+1 labels) exist only on hop 0, where the text chunk is the
  device's own. Arguments as in `ring_softmax_loss`, plus the scalar
  `logit_bias`; returns the value of `sigmoid_loss`.
  """
  mesh, axes, n = _ring_layout(image_features, text_features, mesh, batch_axes)
  batch = image_features.shape[0]

  def shard(img, txt, scale, bias):
    scaled = scale.astype(jnp.float32) * img.astype(jnp.float32)
    bias = bias.astype(jnp.float32)
    total = _sigmoid_block(scaled, txt, bias, True)

    def hop(carry, _):
      chunk, total = carry
      chunk = _shift(chunk, axes, n)
      return (chunk, total + _sigmoid_block(scaled, chunk, bias, False)), None

    if n > 1:
      (_, total), _ = jax.lax.scan(hop, (txt, total), length=n - 1)
    return _psum(total, axes) / batch

  return _run(shard, mesh, axes, (image_features, text_features), (logit_scale, logit_bias))


def ring_retrieval_accuracy(image_features, text_features, *, mesh=None, batch_axes=None):
  """`contrastive.retrieval_accuracy` (in-batch image->text top-1) without B x B scores.

  Each image row keeps a running best score and the global index of the text
  that gave it; ties go to the lower index, as `argmax` over the full row
  would. Not differentiated (a metric). Arguments as in `ring_softmax_loss`.
  """
  mesh, axes, n = _ring_layout(image_features, text_features, mesh, batch_axes)
  batch = image_features.shape[0]

  def shard(img, txt):
    b = img.shape[0]
    me = jax.lax.axis_index(axes) if axes else 0
    img = jax.lax.stop_gradient(img).astype(jnp.float32)
    best, index = _best_match(img, jax.lax.stop_gradient(txt), me * b)

    def hop(carry, h):
      chunk, best, index = carry
      chunk = _shift(chunk, axes, n)
      value, where = _best_match(img, chunk, ((me - h) % n) * b)  # hop h holds shard me - h's texts
      better = (value > best) | ((value == best) & (where < index))
      return (chunk, jnp.where(better, value, best), jnp.where(better, where, index)), None

    if n > 1:
      (_, best, index), _ = jax.lax.scan(hop, (txt, best, index), jnp.arange(1, n))
    hits = jnp.sum((index == me * b + jnp.arange(b)).astype(jnp.float32))
    return _psum(hits, axes) / batch

  return _run(shard, mesh, axes, (image_features, text_features), ())


# --- the ring: layout, shift, shard_map ---


def _ring_layout(image_features, text_features, mesh, batch_axes):
  """(mesh, the batch axes that split it, their shard count n), validated."""
  if image_features.ndim != 2 or image_features.shape != text_features.shape:
    raise ValueError(f'ring losses take image and text features of the same shape [B, D]; got '
                     f'{image_features.shape} and {text_features.shape}')
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:  # no mesh in scope: one device holds the batch, a ring of one
    return mesh, (), 1
  sizes = dict(mesh.shape)
  if batch_axes is None:
    batch_axes = tuple(a for a in sharding.BATCH_AXES if a in sizes)
  unknown = [a for a in batch_axes if a not in sizes]
  if unknown:
    raise ValueError(f'ring losses: batch_axes {tuple(batch_axes)} name {unknown}, not axes of the '
                     f'mesh {sizes}; pass mesh axes the batch is split over')
  axes = tuple(a for a in batch_axes if sizes[a] > 1)
  n = math.prod(sizes[a] for a in axes)
  if image_features.shape[0] % n:
    raise ValueError(f'ring losses: the global batch of {image_features.shape[0]} does not split over '
                     f'the {n} batch shards {dict((a, sizes[a]) for a in axes)}; set batch_size to a '
                     f'multiple of {n}, or tasks.contrastive.chunked=False')
  return mesh, axes, n


def _run(shard: Callable, mesh, axes: Sequence[str], arrays, scalars):
  """`shard` on each device's rows of `arrays`, replicated `scalars`; a replicated scalar out."""
  scalars = tuple(jnp.asarray(s) for s in scalars)
  if mesh.empty:
    return shard(*arrays, *scalars)
  rows = PartitionSpec(tuple(axes) if axes else None, None)
  in_specs = (rows,) * len(arrays) + (PartitionSpec(),) * len(scalars)
  return jax.shard_map(shard, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec())(*arrays, *scalars)


def _shift(tree, axes, n):
  """Sends every leaf one step around the ring: device k gets device k - 1's."""
  perm = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


# --- per-block work, each rematerialised in the backward pass ---


@jax.checkpoint
def _first_softmax_block(scaled, txt):
  """Hop 0: starts both running logsumexps and reads the diagonal (the targets)."""
  logits = scaled @ txt.astype(jnp.float32).T
  return _lse_start(logits, 1), _lse_start(logits, 0), jnp.sum(jnp.diagonal(logits))


@jax.checkpoint
def _softmax_block(scaled, chunk, rows, cols):
  logits = scaled @ chunk.astype(jnp.float32).T
  return _lse_add(rows, logits, 1), _lse_add(cols, logits, 0)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _sigmoid_block(scaled, chunk, bias, own: bool):
  """Sum of -log sigmoid(label * logit) over one block; +1 labels only on the device's own chunk."""
  logits = scaled @ chunk.astype(jnp.float32).T + bias
  if own:
    signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  else:
    signs = -1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits))


def _best_match(img, chunk, offset):
  """Per image row: the best score in this chunk and its global text index."""
  scores = img @ chunk.astype(jnp.float32).T
  return jnp.max(scores, axis=1), offset + jnp.argmax(scores, axis=1)


# --- online logsumexp: (running max, sum of exp(x - max)) ---
# The max is a stop_gradient shift: the value is exact whatever it is, and the
# gradient of max + log(sum exp(x - max)) is the softmax either way.


def _lse_start(logits, axis):
  top = jax.lax.stop_gradient(jnp.max(logits, axis=axis))
  return top, jnp.sum(jnp.exp(logits - jnp.expand_dims(top, axis)), axis=axis)


def _lse_add(acc, logits, axis):
  top, total = acc
  new_top = jnp.maximum(top, jax.lax.stop_gradient(jnp.max(logits, axis=axis)))
  total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - jnp.expand_dims(new_top, axis)), axis=axis)
  return new_top, total


def _lse_value(acc):
  top, total = acc
  return top + jnp.log(total)
