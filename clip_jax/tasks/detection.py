"""ViLD's objectives over one forward: RPN, box regression, ViLD-text (supervised), ViLD-image (distill).

  config.model      a ViLD config (clip_jax.models.vild)
  config.teacher    the frozen CLIP (clip_jax.train.pretrained): its text tower embeds the class
                    prompts, its image tower the proposal crops
  config.classes    the label set; train_ids are the base classes, the rest novel
  config.tasks.rpn = dict(weight=1.0)              objectness + anchor deltas
  config.tasks.box_regression = dict(weight=1.0)   class-agnostic refinement of foreground RoIs
  config.tasks.vild_text = dict(weight=1.0)        RoIs vs [learned background, base text embeddings] / T
  config.tasks.vild_image = dict(weight=1.0, crop_scales=(1.0, 1.5))   clip_jax.tasks.distill

The forward runs the student once, on the proposals plus the ground-truth
boxes (as Detectron appends them, so every box has a foreground RoI), embeds
the base classes' prompts with the teacher, matches anchors and RoIs to the
boxes, and, when ViLD-image is on, embeds each proposal's crops with the
teacher. Novel classes never enter training: their names are not in the
classifier and their boxes are removed from the ground truth, so their
objects are background to ViLD-text, as in the paper.

Ground-truth boxes are checked on device, where nothing can raise: a box
reaching outside the image is clipped to it (counted, `rpn/clipped_boxes`),
one with x2 <= x1 or y2 <= y1 after clipping is dropped (`rpn/dropped_boxes`),
and one whose label is not a class id is dropped (`rpn/invalid_labels`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from clip_jax import models
from clip_jax.data import transforms
from clip_jax.layers.roi_align import roi_align
from clip_jax.losses import detection as losses
from clip_jax.models import boxes as box_ops
from clip_jax.models import vild as vild_lib
from clip_jax.tasks import classes as classes_lib
from clip_jax.tasks.base import Task
from clip_jax.train import frozen as frozen_lib
from clip_jax.train import pretrained


def sanitize_boxes(boxes, labels, num_objects, image_size: int, lookup):
  """(boxes clipped [B, M, 4], class index among train_ids [B, M], valid [B, M], counts) of the batch."""
  m = boxes.shape[1]
  real = jnp.arange(m)[None, :] < num_objects[:, None]
  boxes = boxes.astype(jnp.float32)
  clipped = box_ops.clip_boxes(boxes, float(image_size), float(image_size))
  was_clipped = real & jnp.any(clipped != boxes, axis=-1)
  degenerate = real & ((clipped[..., 2] - clipped[..., 0] < 1.0) | (clipped[..., 3] - clipped[..., 1] < 1.0))
  lut = jnp.asarray(lookup, jnp.int32)
  in_range = (labels >= 0) & (labels < lut.shape[0])
  cls = jnp.where(in_range, lut[jnp.clip(labels, 0, lut.shape[0] - 1)], classes_lib.INVALID)
  valid = real & ~degenerate & (cls >= 0)
  counts = {'clipped_boxes': was_clipped.sum(), 'dropped_boxes': degenerate.sum(),
            'invalid_labels': (real & ~degenerate & (cls == classes_lib.INVALID)).sum(),
            'held_out_boxes': (real & ~degenerate & (cls == classes_lib.HELD_OUT)).sum()}
  return clipped, jnp.maximum(cls, 0), valid, counts


def crop_embeddings(teacher, teacher_variables, pixels, rois, scales):
  """The teacher's unit image embeddings [B, R, D] of `rois` [B, R, 4] cropped from `pixels`
  [B, S, S, 3] (0..255 floats), at each of `scales` (x box size, same centre), summed and renormalised.

  Crops are resampled with RoIAlign (bilinear, 2x2 samples per output pixel) to the teacher's
  input size before its normalisation, so area outside the image reads as black, the canvas.
  """
  b, r, _ = rois.shape
  size = teacher.image_size
  total = 0.0
  for scale in scales:
    cx, cy = (rois[..., 0] + rois[..., 2]) / 2, (rois[..., 1] + rois[..., 3]) / 2
    hw, hh = (rois[..., 2] - rois[..., 0]) * scale / 2, (rois[..., 3] - rois[..., 1]) * scale / 2
    boxes = jnp.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=-1)
    crops = roi_align(pixels, boxes, size, sampling_ratio=2).reshape(b * r, size, size, 3)
    emb = teacher.apply(teacher_variables, transforms.normalize(crops / 255.0), method='encode_image',
                        normalize=True)
    total = total + emb
  return vild_lib.l2_normalize(total).reshape(b, r, -1)


def vild_forward_for(config):
  """(forward, batch keys) of a ViLD run; the teacher module and the base prompts are fixed here."""
  vocab = classes_lib.from_config(config)
  teacher_config = pretrained.required_teacher_config(
      config, 'a ViLD run needs config.teacher (the frozen CLIP whose text tower embeds the class names and whose '
      'image tower ViLD-image distills)')
  teacher = models.build(teacher_config)
  base_tokens = jnp.asarray(vocab.tokens(vocab.train_ids, teacher_config.text.context_length))
  lookup = vocab.train_lookup()
  distill = config.tasks.get('vild_image')
  scales = tuple(float(s) for s in distill.get('crop_scales', (1.0, 1.5))) if distill else ()
  size = config.model.vision.image_size

  def forward(model, variables, batch, *, train: bool, rngs: dict):
    del rngs  # no dropout
    variables = dict(variables)
    teacher_variables = variables.pop(frozen_lib.TEACHER)
    images = transforms.normalize(batch['image'])
    gt, cls, valid, counts = sanitize_boxes(batch['boxes'], batch['labels'], batch['num_objects'], size, lookup)
    out = model.apply(variables, images, extra_rois=gt, extra_valid=valid, train=train)
    out['class_embeddings'] = jax.lax.stop_gradient(
        teacher.apply(teacher_variables, base_tokens, method='encode_text', normalize=True))
    out['anchors'] = jnp.asarray(model.anchors())
    out.update(gt_boxes=gt, gt_valid=valid, **{f'gt_{k}': v for k, v in counts.items()})
    roi_classes, matched = jax.vmap(losses.match_rois)(out['rois'], out['roi_valid'], gt, valid, cls)
    out.update(roi_classes=roi_classes, roi_matched=matched)
    if scales:
      pixels = batch['image'].astype(jnp.float32)
      out['teacher_embeddings'] = jax.lax.stop_gradient(
          crop_embeddings(teacher, teacher_variables, pixels, out['proposals'], scales))
    return out, {}

  return forward, ('image', 'boxes', 'labels', 'num_objects')


def _check_vild(config, task):
  if config.model.name != 'vild':
    raise ValueError(f'config.tasks.{task} trains ViLD; model.name={config.model.name!r}')


@dataclasses.dataclass(frozen=True)
class RPNTask(Task):
  """`config.tasks.rpn`: objectness (positives and negatives weighed equally) + smooth-L1 anchor deltas.

  Also reports the ground-truth checks of the batch (boxes clipped, dropped, invalid labels).
  """
  name: str = 'rpn'

  def check(self, config):
    _check_vild(config, self.name)

  def loss(self, outputs, batch):
    obj, box, metrics = losses.rpn_losses(outputs['objectness'], outputs['rpn_deltas'], outputs['anchors'],
                                          outputs['gt_boxes'], outputs['gt_valid'])
    metrics.update(objectness=obj, box=box, **{k[3:]: v for k, v in outputs.items() if k.startswith('gt_') and
                                               k not in ('gt_boxes', 'gt_valid')})
    return obj + box, metrics


@dataclasses.dataclass(frozen=True)
class BoxRegressionTask(Task):
  """`config.tasks.box_regression`: class-agnostic refinement of the foreground RoIs."""
  name: str = 'box_regression'

  def check(self, config):
    _check_vild(config, self.name)

  def loss(self, outputs, batch):
    return losses.box_regression_loss(outputs['box_deltas'], outputs['rois'], outputs['roi_matched'],
                                      outputs['roi_classes']), {}


@dataclasses.dataclass(frozen=True)
class ViLDTextTask(Task):
  """`config.tasks.vild_text`: RoI embeddings vs [background, base-class text embeddings] / temperature.

  Evaluation (config.eval.detection.num_images > 0): AP / AP50 of base and novel classes on
  held-out digits scenes (clip_jax.evaluate.detection).
  """
  temperature: float = vild_lib.TEMPERATURE
  name: str = 'vild_text'

  def check(self, config):
    _check_vild(config, self.name)

  def loss(self, outputs, batch):
    logits = vild_lib.vild_text_logits(outputs['region_embeddings'], outputs['class_embeddings'],
                                       outputs['background_embedding'], self.temperature)
    return losses.text_classification_loss(logits, outputs['roi_classes'])

  def evaluate(self, model, variables, config):
    e = config.eval.get('detection')
    if not e or not e.num_images:
      return {}
    from clip_jax.evaluate import detection  # pylint: disable=g-import-not-at-top
    return detection.evaluate(model, variables, config)


def _no_options(name, options):
  unknown = sorted(set(options) - {'weight'})
  if unknown:
    raise ValueError(f'config.tasks.{name}: unknown options {unknown}; it takes only `weight`')


def rpn(config, options):
  _no_options('rpn', options)
  return RPNTask()


def box_regression(config, options):
  _no_options('box_regression', options)
  return BoxRegressionTask()


def vild_text(config, options):
  _no_options('vild_text', options)
  return ViLDTextTask(temperature=float(config.model.get('temperature', vild_lib.TEMPERATURE)))
