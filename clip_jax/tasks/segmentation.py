"""LSeg's supervised objective: per-pixel cross-entropy against frozen text embeddings.

  config.model      an LSeg config (clip_jax.models.lseg)
  config.frozen.params = ('text',)       the CLIP text tower is never trained (LSeg)
  config.classes    the label set (clip_jax.tasks.classes); mask value i is class names[i]
  config.tasks.pixel_ce = dict(weight=1.0)

The forward embeds the training classes' prompts with the model's (frozen)
text tower inside the step, so it always scores against the tower's current
weights, and returns LSeg's logits [B, S, S, K] over those K classes at the
fixed temperature (model.logit_scale, 1/0.07). Pixels of held-out classes and
pixels whose value is not a class id are ignored; the metrics count both
(`held_out_fraction`, `invalid_pixels`), so a mask in another encoding shows
instead of training silently on garbage.
"""

import dataclasses

import jax.numpy as jnp

from clip_jax import models
from clip_jax.data import transforms
from clip_jax.losses import dense
from clip_jax.tasks import classes as classes_lib
from clip_jax.tasks.base import Task
from clip_jax.train import frozen as frozen_lib


def _mutable(variables):
  return [k for k in variables if k not in ('params', frozen_lib.TEACHER)]


def _lseg_logits(module, images, class_tokens, train):
  return module(images, module.encode_text(class_tokens), train=train)


def lseg_forward_for(config):
  """(forward, batch keys) of an LSeg run: the training classes' prompts are fixed at build time."""
  vocab = classes_lib.from_config(config)
  class_tokens = jnp.asarray(vocab.tokens(vocab.train_ids, models.context_length(config.model)))

  def forward(model, variables, batch, *, train: bool, rngs: dict):
    """LSeg on uint8 images (normalised here, on device): {'logits': [B, S, S, K]}."""
    del rngs  # no dropout
    images = transforms.normalize(batch['image'])
    mutable = _mutable(variables) if train else []
    if mutable:
      logits, updates = model.apply(variables, images, class_tokens, train, method=_lseg_logits, mutable=mutable)
    else:
      logits, updates = model.apply(variables, images, class_tokens, train, method=_lseg_logits), {}
    return {'logits': logits}, updates

  return forward, ('image',)


@dataclasses.dataclass(frozen=True)
class PixelCETask(Task):
  """`config.tasks.pixel_ce`: mean cross-entropy over the labelled pixels of the global batch.

  Reads batch['mask'] [B, S, S] (uint8 label ids, the image's size). Metrics: pixel accuracy over
  the labelled pixels, the fraction of pixels held out, the count of invalid ones.
  """
  lookup: tuple = ()
  name: str = 'pixel_ce'
  batch_keys = ('mask',)

  def check(self, config):
    if config.model.name != 'lseg':
      raise ValueError(f'config.tasks.pixel_ce trains LSeg; model.name={config.model.name!r}')
    paths = frozen_lib.paths_of(config)
    if ('text',) not in paths:
      raise ValueError("config.tasks.pixel_ce: LSeg's text tower must be frozen; add 'text' to "
                       'config.frozen.params')

  def loss(self, outputs, batch):
    logits, mask = outputs['logits'], batch['mask']
    if mask.shape != logits.shape[:3]:
      raise ValueError(f'tasks.pixel_ce: masks are {tuple(mask.shape[1:])} but the images are '
                       f'{tuple(logits.shape[1:3])}; the mask must have the image\'s size (resize it with the '
                       'image, nearest-neighbour)')
    labels = jnp.asarray(self.lookup, jnp.int32)[mask.astype(jnp.int32)]
    loss, count = dense.pixel_cross_entropy(logits, labels)
    correct = ((logits.argmax(-1) == labels) & (labels >= 0)).sum()
    return loss, {'pixel_accuracy': correct / jnp.maximum(count, 1),
                  'held_out_fraction': (labels == classes_lib.HELD_OUT).mean(),
                  'invalid_pixels': (labels == classes_lib.INVALID).sum()}

  def evaluate(self, model, variables, config):
    e = config.eval.get('lseg')
    if not e or not e.num_images:
      return {}
    from clip_jax.evaluate import lseg as lseg_eval  # pylint: disable=g-import-not-at-top
    return lseg_eval.evaluate(model, variables, config)


def pixel_ce(config, options) -> PixelCETask:
  unknown = sorted(set(options) - {'weight'})
  if unknown:
    raise ValueError(f'config.tasks.pixel_ce: unknown options {unknown}; it takes only `weight` (the classes '
                     'are config.classes)')
  return PixelCETask(lookup=tuple(classes_lib.from_config(config).train_lookup().tolist()))
