"""The distillation objectives: a frozen teacher's embeddings taught to the model.

  config.tasks.vild_image = dict(weight=1.0, crop_scales=(1.0, 1.5))   ViLD's region embeddings
  config.tasks.feature_distill = dict(weight=1.0)                      a CLIP image tower

ViLD-image:

The ViLD forward (clip_jax.tasks.detection) embeds every proposal's crops
with the teacher's image tower at each crop scale (ViLD sums the 1x and 1.5x
crops' embeddings; marked UNVERIFIED in SYSTEMS.md) and stops their gradient;
this task is the L1 loss between them and the student's embeddings of the
same proposals: the image branch's with model.head.image_head (ViLD-ensemble),
else the shared region embeddings (ViLD). Proposals carry no labels, so
novel objects the RPN finds are distilled too: the source of ViLD's novel
recall.
"""

import dataclasses

import jax

from clip_jax import models
from clip_jax.data import transforms
from clip_jax.losses import detection as losses
from clip_jax.tasks.base import Task
from clip_jax.train import frozen as frozen_lib
from clip_jax.train import pretrained


@dataclasses.dataclass(frozen=True)
class ViLDImageTask(Task):
  crop_scales: tuple = (1.0, 1.5)
  name: str = 'vild_image'

  def check(self, config):
    if config.model.name != 'vild':
      raise ValueError(f'config.tasks.vild_image distills into ViLD; model.name={config.model.name!r}')

  def loss(self, outputs, batch):
    p = outputs['proposals'].shape[1]
    student = outputs.get('image_embeddings', outputs['region_embeddings'])[:, :p]
    valid = outputs['proposal_valid']
    loss = losses.distillation_loss(student, outputs['teacher_embeddings'], valid)
    cosine = (student * outputs['teacher_embeddings']).sum(-1)
    return loss, {'cosine': (cosine * valid).sum() / valid.sum().clip(1), 'proposals': valid.sum() / valid.shape[0]}


def vild_image(config, options) -> ViLDImageTask:
  unknown = sorted(set(options) - {'weight', 'crop_scales'})
  if unknown:
    raise ValueError(f'config.tasks.vild_image: unknown options {unknown}; it takes `weight` and `crop_scales`')
  scales = tuple(float(s) for s in options.get('crop_scales', (1.0, 1.5)))
  if not scales or min(scales) <= 0:
    raise ValueError(f'config.tasks.vild_image.crop_scales={scales}: give positive multiples of the box size, '
                     'e.g. (1.0, 1.5)')
  return ViLDImageTask(crop_scales=scales)


# --- feature distillation: a CLIP image tower taught by another CLIP's -------------------------

def clip_distill_forward_for(config):
  """(forward, batch keys) of a CLIP run distilling config.teacher's image embeddings into its image tower.

  The outputs are the student's and the teacher's unit image embeddings of the same images
  (resized to the teacher's input size when it differs); the teacher's carry no gradient.
  """
  teacher_config = pretrained.teacher_config(config)
  if teacher_config is None:
    raise ValueError('config.tasks.feature_distill needs config.teacher (the CLIP whose image embeddings the '
                     'model learns); see clip_jax.train.pretrained')
  teacher = models.build(teacher_config)

  def forward(model, variables, batch, *, train: bool, rngs: dict):
    del rngs
    variables = dict(variables)
    teacher_variables = variables.pop(frozen_lib.TEACHER)
    images = transforms.normalize(batch['image'])
    mutable = [k for k in variables if k != 'params'] if train else []
    kw = dict(method='encode_image', train=train, normalize=True)
    if mutable:
      student, updates = model.apply(variables, images, mutable=mutable, **kw)
    else:
      student, updates = model.apply(variables, images, **kw), {}
    size = teacher.image_size
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, images.shape[:1] + (size, size, 3), 'bilinear')
    target = teacher.apply(teacher_variables, images, method='encode_image', normalize=True)
    return {'image_features': student, 'teacher_features': jax.lax.stop_gradient(target)}, updates

  return forward, ('image',)


@dataclasses.dataclass(frozen=True)
class FeatureDistillTask(Task):
  """`config.tasks.feature_distill`: mean squared distance between the student's and the teacher's unit
  image embeddings (= 2 - 2 cos). With the teacher's text tower copied and frozen (config.init,
  config.frozen), the student's images land in the teacher's joint space: a CLIP of another image
  architecture without contrastive training. Evaluation: digits zero-shot / retrieval.
  """
  name: str = 'feature_distill'

  def check(self, config):
    if config.model.name != 'clip':
      raise ValueError(f'config.tasks.feature_distill trains a CLIP image tower; model.name={config.model.name!r}')
    if len(config.tasks) != 1:
      raise ValueError('config.tasks.feature_distill has its own forward (image embeddings only); use it alone, '
                       f'not with {sorted(k for k in config.tasks if k != "feature_distill")}')

  def loss(self, outputs, batch):
    s, t = outputs['image_features'], outputs['teacher_features']
    cosine = (s * t).sum(-1)
    return (2.0 - 2.0 * cosine).mean(), {'cosine': cosine.mean()}

  def evaluate(self, model, variables, config):
    from clip_jax.evaluate import digits as digits_eval  # pylint: disable=g-import-not-at-top
    student = {k: v for k, v in variables.items() if k != frozen_lib.TEACHER}
    return digits_eval.evaluate(model, student, config)


def feature_distill(config, options) -> FeatureDistillTask:
  unknown = sorted(set(options) - {'weight'})
  if unknown:
    raise ValueError(f'config.tasks.feature_distill: unknown options {unknown}; it takes only `weight`')
  return FeatureDistillTask()
