"""CLIP's causal text transformer."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers.initializers import normal, param_with_axes
from clip_jax.layers.norms import LayerNorm
from clip_jax.layers.transformer import Transformer


class TextTransformer(nn.Module):
  """token + pos embedding -> causal blocks -> ln_final -> feature at EOT @ proj.

  The EOT token (49407) has the largest id in the vocabulary and padding is 0,
  so argmax over the ids finds it, as the original does; a vocabulary whose
  end token is not the largest id sets `eot_token_id` (its first occurrence).
  `return_tokens=True` also returns every token after ln_final.
  """
  context_length: int
  vocab_size: int
  width: int
  layers: int
  num_heads: int
  mlp_dim: int
  output_dim: int
  act: str = 'quick_gelu'
  ln_eps: float = 1e-5
  eot_token_id: Optional[int] = None  # None: the largest id marks the end (CLIP's BPE)
  attn_implementation: Optional[str] = None
  remat: str = 'none'         # clip_jax.layers.remat policy of each residual block
  scan_layers: bool = False   # nn.scan over the blocks (see clip_jax.layers.transformer)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, return_tokens: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    length = tokens.shape[-1]
    embedding = param_with_axes(self, 'token_embedding', normal(0.02), (self.vocab_size, self.width),
                                self.param_dtype, ('vocab', 'embed'))
    pos = param_with_axes(self, 'positional_embedding', normal(0.01), (self.context_length, self.width),
                          self.param_dtype, ('pos', 'embed'))
    # Gather from a table whole along `embed` (FSDP all-gathers weights before use), so the
    # looked-up rows come out sharded like the batch rather than like the table.
    embedding = nn.with_logical_constraint(embedding, ('vocab', None))
    # Out-of-vocabulary ids become NaN rather than silently clamped rows, so
    # a bad batch inside jit is caught by the trainer's non-finite check.
    x = jnp.take(embedding, tokens, axis=0, mode='fill', fill_value=jnp.nan).astype(self.dtype)
    x = x + pos[:length].astype(self.dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
    x = Transformer(self.layers, self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
                    attn_implementation=self.attn_implementation, remat=self.remat,
                    scan_layers=self.scan_layers, name='transformer', **kw)(x, causal=True)
    x = LayerNorm(epsilon=self.ln_eps, name='ln_final', **kw)(x)
    proj = param_with_axes(self, 'text_projection', normal(self.width ** -0.5), (self.width, self.output_dim),
                           self.param_dtype, ('embed', 'joint'))
    eot = jnp.argmax(tokens if self.eot_token_id is None else tokens == self.eot_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0] @ proj.astype(self.dtype)
    return (pooled, x) if return_tokens else pooled
