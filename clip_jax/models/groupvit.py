"""GroupViT (Xu et al. 2022): a ViT that groups image tokens into segments.

The image tower runs stages of transformer blocks over [image tokens ‖ group
tokens]; a GroupingBlock after each stage hard-assigns the image tokens to the
groups, which become the next stage's image tokens (paper: 196 patches -> 64
-> 8 segments). The pooled embedding is the mean of the final segments. Both
towers end in an MLP projection head with BatchNorm, as Hugging Face's
`GroupViTModel` (parameter for parameter; see clip_jax.convert.hf_groupvit).
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.layers.grouping import GroupingBlock, TokenMixer
from clip_jax.layers.initializers import normal, param_with_axes
from clip_jax.layers.norms import LayerNorm
from clip_jax.layers.transformer import Transformer
from clip_jax.models.clip import CLIP, MAX_LOGIT_SCALE, l2_normalize

# torch BatchNorm1d(momentum=0.1) keeps 0.9 of the old running statistics.
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5


class GroupingStage(nn.Module):
  """Blocks over [x ‖ group tokens], then (with group tokens) a GroupingBlock.

  The stage's group tokens are learned. `with_projector` adds a
  `group_projector` (LN -> TokenMixer) of the previous stage's group tokens
  to them, as HF's GroupViTStage: HF builds it when the previous stage's
  `num_output_groups` is non-zero and sizes its input by that number, which
  config validation makes equal to the previous stage's group-token count.
  Returns (x, group tokens or None, soft map or None, hard map or None).
  """
  depth: int
  num_group_tokens: int
  num_output_groups: int
  with_projector: bool
  num_heads: int
  mlp_dim: int
  token_mlp_dim: int
  channel_mlp_dim: int
  act: str = 'gelu'
  assign_eps: float = 1.0
  gumbel: bool = True
  ln_eps: float = 1e-5
  attn_implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, prev_group_tokens=None, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, _, width = x.shape
    blocks = Transformer(self.depth, self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
                         attn_implementation=self.attn_implementation, name='transformer', **kw)
    if not self.num_group_tokens:
      return blocks(x), None, None, None
    group = param_with_axes(self, 'group_token', normal(0.02), (self.num_group_tokens, width), self.param_dtype,
                            ('pos', 'embed'))
    group = jnp.broadcast_to(group.astype(self.dtype), (b, self.num_group_tokens, width))
    if self.with_projector:
      prev = LayerNorm(epsilon=self.ln_eps, name='projector_norm', **kw)(prev_group_tokens)
      group = group + TokenMixer(width // 2, self.num_group_tokens, act=self.act, name='group_projector', **kw)(prev)
    x = blocks(jnp.concatenate([x, group], axis=1))
    x, group = x[:, :-self.num_group_tokens], x[:, -self.num_group_tokens:]
    segments, soft, hard = GroupingBlock(
        self.num_output_groups, self.num_heads, self.mlp_dim, self.token_mlp_dim, self.channel_mlp_dim,
        act=self.act, assign_eps=self.assign_eps, gumbel=self.gumbel, ln_eps=self.ln_eps,
        attn_implementation=self.attn_implementation, name='grouping', **kw)(x, group, train=train)
    return segments, group, soft, hard


class GroupViTVision(nn.Module):
  """patch conv (+bias) -> LN -> + pos -> grouping stages -> LN -> mean over segments.

  Input: float NHWC images, already normalised. Returns (pooled [B, width],
  segment tokens after the final LN [B, G, width], soft maps, hard maps), the
  maps one [B, G_i, L_i] array per grouping stage (L_0 = patches, then the
  previous stage's G).
  """
  image_size: int
  patch_size: int
  width: int
  num_heads: int
  mlp_dim: int
  depths: Sequence[int]
  num_group_tokens: Sequence[int]
  num_output_groups: Sequence[int]
  assign_mlp_ratio: Sequence[float] = (0.5, 4.0)
  assign_eps: float = 1.0
  gumbel: bool = True
  act: str = 'gelu'
  ln_eps: float = 1e-5
  attn_implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', name='conv1',
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, 'conv_in', 'embed')),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                **kw)(images.astype(self.dtype))
    b, h, w, c = x.shape
    x = LayerNorm(epsilon=self.ln_eps, name='ln_pre', **kw)(x.reshape(b, h * w, c))
    pos = param_with_axes(self, 'positional_embedding', normal(0.02), ((self.image_size // p) ** 2, self.width),
                          self.param_dtype, ('pos', 'embed'))
    x = nn.with_logical_constraint(x + pos.astype(self.dtype), ('act_batch', 'act_length', 'act_embed'))
    # int() as HF: a ratio like 0.5 of an odd width rounds down.
    token_mlp_dim, channel_mlp_dim = (int(r * self.width) for r in self.assign_mlp_ratio)
    group, soft_maps, hard_maps = None, [], []
    for i, depth in enumerate(self.depths):
      x, group, soft, hard = GroupingStage(
          depth, self.num_group_tokens[i], self.num_output_groups[i],
          bool(i and self.num_group_tokens[i] and self.num_output_groups[i - 1]), self.num_heads, self.mlp_dim,
          token_mlp_dim, channel_mlp_dim, act=self.act, assign_eps=self.assign_eps, gumbel=self.gumbel,
          ln_eps=self.ln_eps, attn_implementation=self.attn_implementation, name=f'stages_{i}',
          **kw)(x, group, train=train)
      if soft is not None:
        soft_maps.append(soft)
        hard_maps.append(hard)
    tokens = LayerNorm(epsilon=self.ln_eps, name='ln_post', **kw)(x)
    return tokens.mean(axis=1), tokens, tuple(soft_maps), tuple(hard_maps)


class GroupViTText(nn.Module):
  """CLIP's causal text transformer without the linear projection: the pooled EOT feature.

  Parameters and numerics are those of clip_jax.models.text.TextTransformer
  (see there for the EOT rule); GroupViT projects with an MLP head instead.
  """
  context_length: int
  vocab_size: int
  width: int
  layers: int
  num_heads: int
  mlp_dim: int
  act: str = 'quick_gelu'
  ln_eps: float = 1e-5
  eot_token_id: Optional[int] = None
  attn_implementation: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embedding = param_with_axes(self, 'token_embedding', normal(0.02), (self.vocab_size, self.width),
                                self.param_dtype, ('vocab', 'embed'))
    pos = param_with_axes(self, 'positional_embedding', normal(0.01), (self.context_length, self.width),
                          self.param_dtype, ('pos', 'embed'))
    embedding = nn.with_logical_constraint(embedding, ('vocab', None))
    x = jnp.take(embedding, tokens, axis=0, mode='fill', fill_value=jnp.nan).astype(self.dtype)
    x = x + pos[:tokens.shape[-1]].astype(self.dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
    x = Transformer(self.layers, self.num_heads, self.mlp_dim, act=self.act, ln_eps=self.ln_eps,
                    attn_implementation=self.attn_implementation, name='transformer', **kw)(x, causal=True)
    x = LayerNorm(epsilon=self.ln_eps, name='ln_final', **kw)(x)
    eot = jnp.argmax(tokens if self.eot_token_id is None else tokens == self.eot_token_id, axis=-1)
    return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]


class ProjectionHead(nn.Module):
  """Linear -> BatchNorm -> ReLU -> Linear on the last axis (HF's visual/text_projection).

  BatchNorm uses batch statistics when training (the 'batch_stats'
  collection must then be mutable) and the running ones otherwise.
  """
  hidden: int
  output_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda n, axes, name: nn.Dense(
        n, name=name, kernel_init=nn.with_logical_partitioning(normal(0.02), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]), **kw)
    h = dense(self.hidden, ('embed', 'mlp'), 'fc1')(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, name='bn',
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)), **kw)(h)
    return dense(self.output_dim, ('mlp', 'joint'), 'fc2')(nn.relu(h))


class GroupViT(nn.Module):
  """`apply(variables, images, tokens)` -> (image features, text features, logit scale).

  Features are L2-normalised float32, the scale exp(logit_scale) capped at
  100 as CLIP's. `train=True` samples Gumbel noise (rngs={'gumbel': key})
  and updates BatchNorm statistics (mutable=['batch_stats']).

  `multi_label_logit_scale` is the separate learnable temperature of the
  multi-label loss (clip_jax.losses.multilabel; NVlabs' default, not shared
  with the image-text one). Hugging Face's GroupViTModel has no such
  parameter: conversion from HF initialises it, export drops it.
  """
  vision: GroupViTVision
  text: GroupViTText
  visual_projection: ProjectionHead
  text_projection: ProjectionHead
  image_size: int
  init_logit_scale: float = 2.6592
  init_multi_label_logit_scale: float = 2.6592

  # Same input contract as CLIP's towers (uses image_size, text.context_length, text.vocab_size).
  _check_images = CLIP._check_images
  _check_tokens = CLIP._check_tokens

  def setup(self):
    self.logit_scale = param_with_axes(self, 'logit_scale', nn.initializers.constant(self.init_logit_scale), (),
                                       jnp.float32, ())
    self.multi_label_logit_scale = param_with_axes(
        self, 'multi_label_logit_scale', nn.initializers.constant(self.init_multi_label_logit_scale), (),
        jnp.float32, ())

  def encode_image(self, images, *, train: bool = False, normalize: bool = False, return_attentions: bool = False):
    """[B, D] image features; with `return_attentions`, also a dict for dense prediction:

    'soft' / 'hard': per grouping stage, [B, G_i, L_i] float32 assignment maps
    of the stage's L_i input tokens to its G_i groups (soft: softmax over the
    groups, what HF returns as `attentions`; hard: the one-hot the model used,
    Gumbel-perturbed when training). L_0 is the patch grid, row-major.
    'group_features': [B, G, D] every final segment through the projection
    head (running BN statistics even when training, so the head's batch
    statistics are not disturbed), normalised like the image features.
    """
    self._check_images(images)
    pooled, tokens, soft, hard = self.vision(images, train=train)
    features = self.visual_projection(pooled, train=train)
    features = l2_normalize(features) if normalize else features
    if not return_attentions:
      return features
    groups = self.visual_projection(tokens, train=False)
    return features, dict(soft=soft, hard=hard, group_features=l2_normalize(groups) if normalize else groups)

  def encode_text(self, tokens, *, train: bool = False, normalize: bool = False):
    self._check_tokens(tokens)
    features = self.text_projection(self.text(tokens), train=train)
    return l2_normalize(features) if normalize else features

  def scale(self):
    return jnp.minimum(jnp.exp(self.logit_scale), MAX_LOGIT_SCALE)

  def multi_label_scale(self):
    return jnp.minimum(jnp.exp(self.multi_label_logit_scale), MAX_LOGIT_SCALE)

  def __call__(self, images, tokens, *, train: bool = False):
    return (self.encode_image(images, train=train, normalize=True),
            self.encode_text(tokens, train=train, normalize=True), self.scale())
