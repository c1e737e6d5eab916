"""The contrastive objective: CLIP's softmax loss or SigLIP's sigmoid loss."""

import dataclasses

from clip_jax.data import transforms
from clip_jax.losses import contrastive as losses
from clip_jax.tasks.base import Task


def clip_forward(model, variables, batch, *, train: bool, rngs: dict):
  """Feeds uint8 images (normalised here, on device) and tokens to a two-tower model."""
  del rngs  # no dropout in the CLIP towers
  images = transforms.normalize(batch['image'])
  mutable = [k for k in variables if k != 'params'] if train else []
  if mutable:
    out, updates = model.apply(variables, images, batch['tokens'], train=train, mutable=mutable)
  else:
    out, updates = model.apply(variables, images, batch['tokens'], train=train), {}
  names = ('image_features', 'text_features', 'logit_scale', 'logit_bias')
  return dict(zip(names, out)), updates


@dataclasses.dataclass(frozen=True)
class ContrastiveTask(Task):
  """`config.tasks.contrastive`: loss = 'softmax' (CLIP) or 'sigmoid' (SigLIP; needs model.init_logit_bias)."""
  loss_type: str = 'softmax'
  name: str = 'contrastive'

  def __post_init__(self):
    if self.loss_type not in ('softmax', 'sigmoid'):
      raise ValueError(f"tasks.contrastive.loss={self.loss_type!r}: use 'softmax' (CLIP) or 'sigmoid' (SigLIP)")

  def loss(self, outputs, batch):
    img, txt, scale = outputs['image_features'], outputs['text_features'], outputs['logit_scale']
    if self.loss_type == 'softmax':
      loss = losses.softmax_loss(img, txt, scale)
    else:
      if 'logit_bias' not in outputs:
        raise ValueError("tasks.contrastive.loss='sigmoid' needs a logit bias: set model.init_logit_bias "
                         '(SigLIP uses -10.0)')
      loss = losses.sigmoid_loss(img, txt, scale, outputs['logit_bias'])
    return loss, {'i2t_top1': losses.retrieval_accuracy(img, txt)}

  def evaluate(self, model, variables, config):
    from clip_jax.evaluate import digits as digits_eval  # pylint: disable=g-import-not-at-top
    return digits_eval.evaluate(model, variables, config)
