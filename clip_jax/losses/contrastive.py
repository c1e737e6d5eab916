"""Image-text contrastive losses over the global batch.

Both take L2-normalised features [B, D] of the *global* batch; under jit with
the batch sharded over ('data', 'fsdp') GSPMD gathers what each device needs
for its rows of the B x B logits. Computation is in float32 whatever the
model's compute dtype.
"""

import jax
import jax.numpy as jnp
import optax


def softmax_loss(image_features, text_features, logit_scale):
  """CLIP: mean of image->text and text->image cross-entropy with the diagonal as targets."""
  image_features = image_features.astype(jnp.float32)
  text_features = text_features.astype(jnp.float32)
  logits = logit_scale * image_features @ text_features.T
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return 0.5 * (i2t + t2i)


def sigmoid_loss(image_features, text_features, logit_scale, logit_bias):
  """SigLIP: every image-text pair is a binary problem (+1 on the diagonal, -1 off it).

  Normalised as in the paper: summed over the B x B pairs, divided by B.
  """
  image_features = image_features.astype(jnp.float32)
  text_features = text_features.astype(jnp.float32)
  logits = logit_scale * image_features @ text_features.T + logit_bias
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def retrieval_accuracy(image_features, text_features):
  """Fraction of in-batch image->text matches found at rank 1 (a training metric)."""
  logits = image_features.astype(jnp.float32) @ text_features.astype(jnp.float32).T
  return jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
