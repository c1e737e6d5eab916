"""GroupViT's multi-label image-text contrastive loss, over the global batch.

Each image i has up to K prompts made from its caption's nouns
(clip_jax.data.prompts); `valid` marks the real ones, k_i of them. With
L2-normalised features and s the loss's own temperature:

  image -> prompts  logits s * x_i . t_jm over every valid prompt of the
                    batch; soft cross-entropy whose target puts 1/k_i on each
                    of image i's own prompts (they share the target mass) and
                    0 elsewhere, averaged over the images with k_i > 0;
  prompt -> images  each valid prompt's logits over the B images; plain
                    cross-entropy with its own image as the target, averaged
                    over the valid prompts;
  loss              the mean of the two.

With every prompt valid this is NVlabs' `multi_label_loss` exactly (there an
image with fewer nouns repeats its caption in the spare slots, and the
repeats count as prompts; here they are masked out). A prompt naming the
same noun as another image's prompt is a negative for that image, as there.
Computation is in float32; invalid prompts get no gradient.
"""

import jax
import jax.numpy as jnp

# Stands in for -inf on masked logits: exp underflows to exactly 0, and a row with nothing valid stays finite.
_MASKED = -1e9


def multi_label_loss(image_features, prompt_features, valid, logit_scale):
  """Scalar loss for image features [B, D], prompt features [B, K, D] and valid [B, K] (bool)."""
  b, k, d = prompt_features.shape
  if image_features.shape != (b, d) or valid.shape != (b, k):
    raise ValueError(f'multi_label_loss: image_features {image_features.shape}, prompt_features '
                     f'{prompt_features.shape} and valid {valid.shape} must be [B, D], [B, K, D] and [B, K]')
  image = image_features.astype(jnp.float32)
  prompts = prompt_features.astype(jnp.float32).reshape(b * k, d)
  valid = valid.reshape(b * k).astype(bool)
  logits = logit_scale * image @ prompts.T                              # [B, B*K]
  own = (jnp.arange(b * k) // k)[None, :] == jnp.arange(b)[:, None]     # prompt column belongs to image row
  positive = own & valid[None, :]
  counts = positive.sum(axis=1)

  log_p = jax.nn.log_softmax(jnp.where(valid[None, :], logits, _MASKED), axis=1)
  per_image = -jnp.sum(jnp.where(positive, log_p, 0.0), axis=1) / jnp.maximum(counts, 1)
  images_with_prompts = counts > 0
  i2p = jnp.sum(jnp.where(images_with_prompts, per_image, 0.0)) / jnp.maximum(images_with_prompts.sum(), 1)

  log_q = jax.nn.log_softmax(logits.T, axis=1)                          # [B*K, B]
  per_prompt = -jnp.sum(jnp.where(own.T, log_q, 0.0), axis=1)
  p2i = jnp.sum(jnp.where(valid, per_prompt, 0.0)) / jnp.maximum(valid.sum(), 1)
  return 0.5 * (i2p + p2i)
