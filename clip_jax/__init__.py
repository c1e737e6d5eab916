"""clip_jax: CLIP and its follow-up family in JAX/Flax."""

from clip_jax.data.tokenizer import tokenize

__all__ = ['tokenize']
