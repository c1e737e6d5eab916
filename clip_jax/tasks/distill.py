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
from clip_jax.tasks.base import Task, mutable_collections
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


# --- feature distillation: a student's image embeddings taught by a CLIP teacher's ---------------

def _teacher(config):
  return models.build(pretrained.required_teacher_config(
      config, 'config.tasks.feature_distill needs config.teacher (the CLIP whose image embeddings the model learns)'))


def with_teacher_features(forward, config):
  """`forward` plus the teacher's unit embeddings of the same batch, without gradient:

    teacher_features          of the images (resized to the teacher's input size when it differs)
    teacher_text_features     of the captions, when config.tasks.feature_distill.text is set
    teacher_prompt_features   of the prompts too, when the forward embeds them

  The wrapped forward sees the variables without the teacher's.
  """
  teacher = _teacher(config)
  text = bool(config.tasks.get('feature_distill', {}).get('text', False))

  def wrapped(model, variables, batch, *, train: bool, rngs: dict):
    variables = dict(variables)
    teacher_variables = variables.pop(frozen_lib.TEACHER)
    outputs, updates = forward(model, variables, batch, train=train, rngs=rngs)
    images = transforms.normalize(batch['image'])
    size = teacher.image_size
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, images.shape[:1] + (size, size, 3), 'bilinear')
    embed = lambda x, method: jax.lax.stop_gradient(teacher.apply(teacher_variables, x, method=method, normalize=True))
    extra = {'teacher_features': embed(images, 'encode_image')}
    if text:
      extra['teacher_text_features'] = embed(batch['tokens'], 'encode_text')
      if 'prompt_features' in outputs:
        b, k, length = batch['prompt_tokens'].shape
        extra['teacher_prompt_features'] = embed(batch['prompt_tokens'].reshape(b * k, length),
                                                 'encode_text').reshape(b, k, -1)
    return dict(outputs, **extra), updates

  return wrapped


def _image_only_forward(model, variables, batch, *, train: bool, rngs: dict):
  del rngs
  images = transforms.normalize(batch['image'])
  mutable = mutable_collections(variables, train)
  kw = dict(method='encode_image', train=train, normalize=True)
  if mutable:
    student, updates = model.apply(variables, images, mutable=mutable, **kw)
  else:
    student, updates = model.apply(variables, images, **kw), {}
  return {'image_features': student}, updates


def clip_distill_forward_for(config):
  """(forward, batch keys) of a run whose only task is feature_distill: the image tower alone runs
  (student and teacher); the text tower, copied and frozen, is not needed to train."""
  return with_teacher_features(_image_only_forward, config), ('image',)


@dataclasses.dataclass(frozen=True)
class FeatureDistillTask(Task):
  """`config.tasks.feature_distill`: mean squared distance between the student's and the teacher's unit
  image embeddings (= 2 - 2 cos).

  Alone (a CLIP student): with the teacher's text tower copied and frozen (config.init,
  config.frozen), the student's images land in the teacher's joint space: a CLIP of another image
  architecture without contrastive training; evaluation is then digits zero-shot / retrieval.
  Beside other tasks (GroupViT's contrastive + multi-label), it runs over their forward and pulls
  the image embeddings toward the teacher's, a dense signal where captions alone teach a ViT slowly;
  with `text=True` the caption and prompt embeddings too (the same distance, one mean over the
  captions and the valid prompts), so both towers land in the teacher's joint space. Those tasks
  evaluate.
  """
  alone: bool = True
  text: bool = False  # also the captions' (and prompts') embeddings toward the teacher's text tower's
  name: str = 'feature_distill'

  def check(self, config):
    if config.model.name not in ('clip', 'groupvit'):
      raise ValueError(f'config.tasks.feature_distill trains a CLIP or GroupViT image tower; '
                       f'model.name={config.model.name!r}')
    if self.alone and config.model.name != 'clip':
      raise ValueError('config.tasks.feature_distill alone trains a CLIP image tower; a GroupViT distills beside '
                       'its own tasks (add config.tasks.contrastive and config.tasks.multi_label)')

  def loss(self, outputs, batch):
    s, t = outputs['image_features'], outputs['teacher_features']
    cosine = (s * t).sum(-1)
    loss = (2.0 - 2.0 * cosine).mean()
    metrics = {'cosine': cosine.mean()}
    if 'teacher_text_features' in outputs:  # captions, then the valid prompts, one mean
      cos = (outputs['text_features'] * outputs['teacher_text_features']).sum(-1)
      total, count = (2.0 - 2.0 * cos).sum(), cos.shape[0]
      if 'teacher_prompt_features' in outputs:
        valid = batch['prompt_valid'].astype(cos.dtype)
        pcos = (outputs['prompt_features'] * outputs['teacher_prompt_features']).sum(-1)
        total, count = total + ((2.0 - 2.0 * pcos) * valid).sum(), count + valid.sum()
      text_loss = total / count
      loss = loss + text_loss
      metrics.update(text_loss=text_loss, text_cosine=cos.mean())
    return loss, metrics

  def evaluate(self, model, variables, config):
    if not self.alone:
      return {}
    from clip_jax.evaluate import digits as digits_eval  # pylint: disable=g-import-not-at-top
    student = {k: v for k, v in variables.items() if k != frozen_lib.TEACHER}
    return digits_eval.evaluate(model, student, config)


def feature_distill(config, options) -> FeatureDistillTask:
  unknown = sorted(set(options) - {'weight', 'text'})
  if unknown:
    raise ValueError(f'config.tasks.feature_distill: unknown options {unknown}; it takes `weight` and `text`')
  alone = len(config.tasks) == 1
  text = bool(options.get('text', False))
  if alone and text:
    raise ValueError('config.tasks.feature_distill.text=True distills a text tower trained beside other tasks; '
                     'alone, the student copies and freezes the teacher\'s text tower (config.init, config.frozen)')
  return FeatureDistillTask(alone=alone, text=text)
