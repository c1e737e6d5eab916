"""optax AdamW with CLIP's recipe: warmup + cosine, no decay on gains/biases/embeddings, clipping."""

import jax
import ml_collections
import optax

# Parameters that are embeddings or temperatures: excluded from weight decay even when 2-D.
_NO_DECAY_NAMES = ('token_embedding', 'positional_embedding', 'class_embedding', 'logit_scale', 'logit_bias')


def decay_mask(params):
  """True where weight decay applies: matrices and conv kernels, not biases, norms or embeddings."""
  def decays(path, leaf):
    names = [str(getattr(p, 'key', getattr(p, 'name', ''))) for p in path]
    # By name, not only by rank: attention biases are [3, heads, head_dim].
    if any(n in _NO_DECAY_NAMES or n in ('bias', 'scale') for n in names):
      return False
    return leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


def schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = int(config.warmup_steps)
  if warmup >= total_steps:
    raise ValueError(f'optim.warmup_steps={warmup} must be below total_steps={total_steps}')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup, decay_steps=total_steps,
      end_value=config.lr * config.get('final_lr_fraction', 0.0))


def make(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """`config.optim`: lr, warmup_steps, weight_decay, b1, b2, eps, grad_clip_norm (0 = off)."""
  if config.lr <= 0:
    raise ValueError(f'optim.lr={config.lr} must be positive')
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask))
  return optax.chain(*chain)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(lr=5e-4, warmup_steps=100, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6,
                                        grad_clip_norm=1.0, final_lr_fraction=0.0))
