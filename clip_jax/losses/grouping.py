"""A load-balancing term for GroupViT's hard token-to-group assignment.

Hard assignment trains through the softmax's straight-through gradient, which
says nothing about *how many* groups an image uses: on small data every image
token can settle on one group (the others are left with only their
cross-attention summary), the image embedding is then a plain average, and
the zero-shot segments are one per image. The term below is the Switch
Transformer's auxiliary loss (Fedus et al. 2021, eq. 4), applied per image
over the groups of one grouping stage:

  G * sum_g f_g * P_g,   f_g = share of the image's tokens assigned to g (the
                               hard one-hot; no gradient),
                         P_g = mean soft assignment probability of g,

which is 1 when the tokens spread evenly over the G groups and G when one
group takes them all; its gradient lowers the soft probability of the groups
that won many tokens, so the tokens least like the majority move first.
It uses no labels. While the soft maps are still near uniform (early in
training) its value stays near 1 even when the hard assignment has collapsed,
so `largest_group_share` is what shows a collapse.
Computation is in float32.
"""

import jax
import jax.numpy as jnp


def load_balance(soft, hard):
  """Mean over images of G * sum_g f_g P_g for assignment maps soft, hard [B, G, L] (softmax over G)."""
  if soft.shape != hard.shape or soft.ndim != 3:
    raise ValueError(f'load_balance: soft {soft.shape} and hard {hard.shape} must both be [B, G, L]')
  g = soft.shape[1]
  share = jax.lax.stop_gradient(hard.astype(jnp.float32)).mean(axis=-1)  # [B, G]
  prob = soft.astype(jnp.float32).mean(axis=-1)                          # [B, G]
  return g * jnp.mean(jnp.sum(share * prob, axis=-1))


def largest_group_share(hard):
  """Mean over images of the share of tokens in the image's largest group, for hard maps [B, G, L]:
  1/G when the tokens spread evenly, 1 when one group takes them all."""
  return jnp.mean(jnp.max(hard.astype(jnp.float32).mean(axis=-1), axis=-1))
