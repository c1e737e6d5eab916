"""The contrastive objective: CLIP's softmax loss or SigLIP's sigmoid loss."""

import dataclasses

from clip_jax.data import transforms
from clip_jax.losses import contrastive as losses
from clip_jax.losses import ring
from clip_jax.tasks.base import Task, mutable_collections


def clip_forward(model, variables, batch, *, train: bool, rngs: dict):
  """Feeds uint8 images (normalised here, on device) and tokens to a two-tower model."""
  del rngs  # no dropout in the CLIP towers
  images = transforms.normalize(batch['image'])
  mutable = mutable_collections(variables, train)
  if mutable:
    out, updates = model.apply(variables, images, batch['tokens'], train=train, mutable=mutable)
  else:
    out, updates = model.apply(variables, images, batch['tokens'], train=train), {}
  names = ('image_features', 'text_features', 'logit_scale', 'logit_bias')
  return dict(zip(names, out)), updates


@dataclasses.dataclass(frozen=True)
class ContrastiveTask(Task):
  """`config.tasks.contrastive`: loss = 'softmax' (CLIP) or 'sigmoid' (SigLIP; needs model.init_logit_bias).

  `chunked=True` computes the loss and the i2t_top1 metric with the ring
  versions (`losses/ring.py`): the same values and gradients, but each device
  only ever holds b x b blocks of logits (b = batch per batch shard) instead
  of its b x B rows, for global batches whose logits would not fit.
  """
  loss_type: str = 'softmax'
  chunked: bool = False
  name: str = 'contrastive'

  def __post_init__(self):
    if self.loss_type not in ('softmax', 'sigmoid'):
      raise ValueError(f"tasks.contrastive.loss={self.loss_type!r}: use 'softmax' (CLIP) or 'sigmoid' (SigLIP)")
    if not isinstance(self.chunked, bool):
      raise ValueError(f'tasks.contrastive.chunked={self.chunked!r}: use True (ring losses) or False (global)')

  def loss(self, outputs, batch):
    img, txt, scale = outputs['image_features'], outputs['text_features'], outputs['logit_scale']
    softmax, sigmoid, top1 = ((ring.ring_softmax_loss, ring.ring_sigmoid_loss, ring.ring_retrieval_accuracy)
                              if self.chunked else
                              (losses.softmax_loss, losses.sigmoid_loss, losses.retrieval_accuracy))
    if self.loss_type == 'softmax':
      loss = softmax(img, txt, scale)
    else:
      if 'logit_bias' not in outputs:
        raise ValueError("tasks.contrastive.loss='sigmoid' needs a logit bias: set model.init_logit_bias "
                         '(SigLIP uses -10.0)')
      loss = sigmoid(img, txt, scale, outputs['logit_bias'])
    return loss, {'i2t_top1': top1(img, txt)}

  def evaluate(self, model, variables, config):
    from clip_jax.evaluate import digits as digits_eval  # pylint: disable=g-import-not-at-top
    return digits_eval.evaluate(model, variables, config)
