"""GroupViT's grouping pieces: token mixing, cross-attention and hard assignment.

A GroupingBlock turns S image tokens into G segment tokens: learned group
tokens attend to the image tokens, then every image token is assigned to one
group (a one-hot over the *group* axis) and each group averages the tokens it
won. The layout and numerics follow Hugging Face's `GroupViTTokenAssign`
(itself a port of NVlabs' GroupingBlock), so parameters convert one-to-one.

Parameter logical axes reuse clip_jax.sharding's names: a token-count axis
(group slots, like positional-embedding rows) is 'pos'; the single assignment
head's width is 'kv'.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.layers import activations
from clip_jax.layers.dense import DenseGeneral
from clip_jax.layers.initializers import normal
from clip_jax.layers.mlp import Mlp
from clip_jax.layers.norms import LayerNorm

# NVlabs GroupViT initialises every Linear of its new layers with std 0.02.
_STD = 0.02


def _dense(features: int, axes: tuple, name: str, kw: dict, std: float = _STD) -> nn.Dense:
  return nn.Dense(features, name=name, kernel_init=nn.with_logical_partitioning(normal(std), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]), **kw)


def _tokens(x):
  return nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))


def straight_through_one_hot(logits, axis: int, noise=None):
  """(hard assignment with straight-through gradients, one-hot) along `axis`.

  The forward value is the one-hot of argmax(softmax(logits + noise)); the
  gradient is the softmax's. It is computed as `hard - sg(soft) + soft`, the
  same float operations as torch's `hard_softmax`: the forward value is
  one-hot only up to float32 rounding, in both, so eval outputs agree.
  """
  z = logits if noise is None else logits + noise
  soft = jax.nn.softmax(z.astype(jnp.float32), axis=axis)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=axis), soft.shape[axis], axis=axis, dtype=soft.dtype)
  return hard - jax.lax.stop_gradient(soft) + soft, hard


class TokenMixer(nn.Module):
  """An MLP across the token axis: [B, S_in, C] -> [B, S_out, C] (HF's GroupViTMixerMLP)."""
  hidden: int
  out_tokens: int
  act: str = 'gelu'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _dense(self.hidden, ('pos', 'mlp'), 'c_fc', kw)(jnp.swapaxes(x, 1, 2))  # [B, C, hidden]
    h = nn.with_logical_constraint(activations.get(self.act)(h), ('act_batch', 'act_embed', 'act_mlp'))
    return _tokens(jnp.swapaxes(_dense(self.out_tokens, ('mlp', 'pos'), 'c_proj', kw)(h), 1, 2))


class CrossAttention(nn.Module):
  """Multi-head attention of `query` tokens to `context` tokens, scale head_dim^-0.5.

  q, k and v are separate projections (the packed MultiHeadAttention needs
  one input for all three); kernels are [embed, heads, head_dim] as there.
  """
  num_heads: int
  implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, context):
    width = query.shape[-1]
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: DenseGeneral((self.num_heads, head_dim), 1, ('embed', 'heads', 'kv'), ('heads', 'kv'),
                                     width ** -0.5, name=name, **kw)
    constrain = lambda t: nn.with_logical_constraint(t, ('act_batch', 'act_length', 'act_heads', 'act_kv'))
    q, k, v = (constrain(proj(n)(t)) for n, t in (('q', query), ('k', context), ('v', context)))
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    out = DenseGeneral((width,), 2, ('heads', 'kv', 'embed'), ('embed',), width ** -0.5, name='out', **kw)(out)
    return _tokens(out)


class AssignAttention(nn.Module):
  """One-head attention whose weights are a hard assignment of tokens to groups.

  logits [B, G, L] = q(groups) k(tokens)^T / sqrt(C); softmax over the
  *group* axis, so each image token picks one group; training adds Gumbel
  noise (the 'gumbel' RNG stream) before the argmax unless `gumbel` is False
  (NVlabs' AssignAttention option; then training takes the noise-free argmax,
  still with the softmax's straight-through gradient). Each group then
  averages its tokens' values: A / (sum_L A + assign_eps) @ v -> proj.

  Returns (out [B, G, C], soft [B, G, L] (noise-free softmax), hard [B, G, L]).
  """
  assign_eps: float = 1.0
  gumbel: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, groups, tokens, *, train: bool = False):
    width = groups.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = _dense(width, ('embed', 'kv'), 'q', kw)(groups)
    k = _dense(width, ('embed', 'kv'), 'k', kw)(tokens)
    v = _dense(width, ('embed', 'kv'), 'v', kw)(tokens)
    logits = jnp.einsum('bgc,blc->bgl', q, k).astype(jnp.float32) * width ** -0.5
    noise = None
    if train and self.gumbel:
      if not self.has_rng('gumbel'):
        raise ValueError("GroupViT in training mode samples Gumbel noise: pass rngs={'gumbel': key} to apply")
      noise = jax.random.gumbel(self.make_rng('gumbel'), logits.shape, logits.dtype)
    assign, hard = straight_through_one_hot(logits, axis=-2, noise=noise)
    soft = jax.nn.softmax(logits, axis=-2)
    assign = assign / (assign.sum(-1, keepdims=True) + self.assign_eps)
    out = jnp.einsum('bgl,blc->bgc', assign.astype(self.dtype), v)
    return _dense(width, ('kv', 'embed'), 'proj', kw)(out), soft, hard


class GroupingBlock(nn.Module):
  """[B, L, C] image tokens + [B, S, C] group tokens -> [B, G, C] segment tokens.

  As HF's GroupViTTokenAssign: LN both inputs; mix the S group tokens into G
  (TokenMixer, LN); a post-norm cross-attention block lets them look at the
  image; hard-assign the image tokens to them (AssignAttention); add the
  groups back and finish with a pre-LN channel MLP.
  Returns (segments, soft, hard) with the maps [B, G, L].
  """
  num_output_groups: int
  num_heads: int
  mlp_dim: int          # the cross-attention block's MLP (the encoder's intermediate size)
  token_mlp_dim: int    # TokenMixer hidden, assign_mlp_ratio[0] * width
  channel_mlp_dim: int  # the closing channel MLP, assign_mlp_ratio[1] * width
  act: str = 'gelu'
  assign_eps: float = 1.0
  gumbel: bool = True
  ln_eps: float = 1e-5
  attn_implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, group_tokens, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: LayerNorm(epsilon=self.ln_eps, name=name, **kw)
    group_tokens = ln('norm_tokens')(group_tokens)
    tokens = ln('norm_x')(tokens)
    groups = TokenMixer(self.token_mlp_dim, self.num_output_groups, act=self.act, name='mlp_inter',
                        **kw)(group_tokens)
    groups = ln('norm_post_tokens')(groups)
    # Post-norm cross-attention block: the queries are already normalised.
    groups = groups + CrossAttention(self.num_heads, implementation=self.attn_implementation, name='cross_attn',
                                     **kw)(groups, tokens)
    groups = groups + Mlp(self.mlp_dim, act=self.act, name='cross_mlp', **kw)(ln('cross_ln')(groups))
    groups = ln('cross_ln_post')(groups)
    out, soft, hard = AssignAttention(self.assign_eps, self.gumbel, name='assign', **kw)(groups, tokens, train=train)
    out = out + groups
    out = out + Mlp(self.channel_mlp_dim, act=self.act, name='mlp_channels', **kw)(ln('norm_new_x')(out))
    return _tokens(out), soft, hard
