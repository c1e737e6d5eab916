"""Per-pixel softmax cross-entropy with ignored pixels (LSeg's supervised objective)."""

import jax
import jax.numpy as jnp


def pixel_cross_entropy(logits, labels):
  """(mean loss over labelled pixels, number of labelled pixels) for logits [..., C], labels [...].

  A pixel with a label outside [0, C) is ignored (it adds nothing to the sum or the count):
  torch's `cross_entropy(..., ignore_index=i, reduction='mean')` for any negative ignore
  label. The mean is over the global batch's labelled pixels, so it does not depend on how the
  batch is split over devices; a batch with none gives 0.
  """
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f'pixel_cross_entropy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} '
                     'must agree except for the class axis')
  num_classes = logits.shape[-1]
  valid = (labels >= 0) & (labels < num_classes)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  count = valid.sum()
  loss = -jnp.where(valid, picked, 0.0).sum() / jnp.maximum(count, 1)
  return loss, count
