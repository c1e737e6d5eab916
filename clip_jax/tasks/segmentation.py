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

  config.tasks.pixel_distill = dict(weight=1.0, window=24, stride=12, crop_scale=2.5)   optional

adds a distillation objective in the same step (PixelDistillTask): a frozen CLIP
teacher's (config.teacher) crop embeddings taught to windows of the pixel embeddings.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import models
from clip_jax.data import transforms
from clip_jax.losses import dense
from clip_jax.losses import detection as det_losses
from clip_jax.models.clip import l2_normalize
from clip_jax.tasks import classes as classes_lib
from clip_jax.tasks import detection
from clip_jax.tasks.base import Task, mutable_collections
from clip_jax.train import frozen as frozen_lib
from clip_jax.train import pretrained



def _lseg_logits(module, images, class_tokens, train, return_pixels=False):
  return module(images, module.encode_text(class_tokens), train=train, return_pixels=return_pixels)


def lseg_forward_for(config):
  """(forward, batch keys) of an LSeg run: the training classes' prompts are fixed at build time.

  With config.tasks.pixel_distill the forward also gives the windows' pooled pixel embeddings and
  config.teacher's embeddings of the same windows' crops (see PixelDistillTask).
  """
  vocab = classes_lib.from_config(config)
  class_tokens = jnp.asarray(vocab.tokens(vocab.train_ids, models.context_length(config.model)))
  distill = config.get('tasks', {}).get('pixel_distill')
  if distill:
    opts = _distill_options(distill)
    teacher = models.build(pretrained.required_teacher_config(
        config, 'config.tasks.pixel_distill needs config.teacher (the frozen CLIP whose crop embeddings the pixel '
        'embeddings learn)'))
    size = config.model.vision.image_size
    windows, membership = distill_windows(size, opts['window'], opts['stride'])

  def forward(model, variables, batch, *, train: bool, rngs: dict):
    """LSeg on uint8 images (normalised here, on device): {'logits': [B, S, S, K]}."""
    del rngs  # no dropout
    variables = dict(variables)
    teacher_variables = variables.pop(frozen_lib.TEACHER, None)
    images = transforms.normalize(batch['image'])
    mutable = mutable_collections(variables, train)
    args = (images, class_tokens, train, bool(distill))
    if mutable:
      out, updates = model.apply(variables, *args, method=_lseg_logits, mutable=mutable)
    else:
      out, updates = model.apply(variables, *args, method=_lseg_logits), {}
    if not distill:
      return {'logits': out}, updates
    logits, pixels = out
    pixels_in = batch['image'].astype(jnp.float32)
    student, ink = pool_windows(pixels, pixels_in, membership, opts['ink_threshold'])
    rois = jnp.broadcast_to(jnp.asarray(windows), (pixels_in.shape[0],) + windows.shape)
    target = detection.crop_embeddings(teacher, teacher_variables, pixels_in, rois, (opts['crop_scale'],))
    return {'logits': logits, 'window_embeddings': student, 'teacher_embeddings': jax.lax.stop_gradient(target),
            'window_valid': ink >= opts['min_ink']}, updates

  return forward, ('image',)


# --- pixel_distill: ViLD-image's distillation, on windows of LSeg's pixel embeddings ---------------

_DISTILL_DEFAULTS = dict(weight=1.0, window=24, stride=12, crop_scale=2.5, ink_threshold=0.2, min_ink=0.02)


def _distill_options(options) -> dict:
  unknown = sorted(set(options) - set(_DISTILL_DEFAULTS))
  if unknown:
    raise ValueError(f'config.tasks.pixel_distill: unknown options {unknown}; it takes {sorted(_DISTILL_DEFAULTS)}')
  opts = {k: options.get(k, v) for k, v in _DISTILL_DEFAULTS.items()}
  if not (opts['window'] >= 2 and opts['stride'] >= 1 and opts['crop_scale'] > 0):
    raise ValueError(f'config.tasks.pixel_distill: window={opts["window"]} (>= 2 px), stride={opts["stride"]} '
                     f'(>= 1 px) and crop_scale={opts["crop_scale"]} (> 0) are out of range')
  return opts


def distill_windows(image_size: int, window: int, stride: int):
  """(windows [R, 4] x1 y1 x2 y2 in image pixels, membership [R, (S/2)^2] 0/1 of the stride-2 cells).

  Square windows of `window` px on a grid of `stride` px, all inside the image.
  """
  if window > image_size:
    raise ValueError(f'config.tasks.pixel_distill.window={window} exceeds the image size {image_size}')
  starts = np.arange(0, image_size - window + 1, stride)
  side = image_size // 2
  centres = (np.arange(side) + 0.5) * 2  # stride-2 cell centres in image pixels
  boxes, member = [], []
  for y in starts:
    for x in starts:
      boxes.append((x, y, x + window, y + window))
      inside_y = (centres >= y) & (centres < y + window)
      inside_x = (centres >= x) & (centres < x + window)
      member.append((inside_y[:, None] & inside_x[None, :]).reshape(-1))
  return np.asarray(boxes, np.float32), np.asarray(member, np.float32)


def pool_windows(pixels, images, membership, ink_threshold: float):
  """(unit ink-weighted means [B, R, D] of the pixel embeddings [B, h, w, D] in each window, the windows'
  ink fractions [B, R]). Ink is read from the image alone ([B, S, S, 3] 0..255: the brightest channel
  above ink_threshold * 255, the canvases being black), so no label enters."""
  b, h, w, d = pixels.shape
  ink = (images.max(-1) > ink_threshold * 255.0).astype(jnp.float32)
  ink = ink.reshape(b, h, ink.shape[1] // h, w, ink.shape[2] // w).mean((2, 4)).reshape(b, h * w)
  m = jnp.asarray(membership)
  weights = (ink[:, None, :] + 1e-3) * m[None]  # [B, R, hw]; never all zero (no NaN in the gradient)
  pooled = jnp.einsum('brp,bpd->brd', weights, pixels.reshape(b, h * w, d).astype(jnp.float32))
  fraction = (ink[:, None, :] * m[None]).sum(-1) / m.sum(-1)[None]
  return l2_normalize(pooled), fraction


@dataclasses.dataclass(frozen=True)
class PixelDistillTask(Task):
  """`config.tasks.pixel_distill`: the L1 distance (ViLD-image's, clip_jax.losses.detection) between
  the ink-weighted mean LSeg pixel embedding of each window and config.teacher's image embedding of a
  crop around it (crop_scale x the window, same centre), over the windows with ink.

  Windows are a fixed grid and ink is read from the image: no box and no label enters, so the unseen
  digits of a training scene are distilled like the seen ones (as ViLD's proposals distill novel
  objects). It teaches LSeg's pixel embeddings the teacher's image-text alignment for shapes whose
  names never labelled a pixel. Not in lang-seg: a departure for training with few seen classes.
  """
  name: str = 'pixel_distill'

  def check(self, config):
    if config.model.name != 'lseg':
      raise ValueError(f'config.tasks.pixel_distill distills into LSeg; model.name={config.model.name!r}')
    if 'pixel_ce' not in config.tasks:
      raise ValueError('config.tasks.pixel_distill runs beside config.tasks.pixel_ce (LSeg\'s forward)')

  def loss(self, outputs, batch):
    student, target, valid = outputs['window_embeddings'], outputs['teacher_embeddings'], outputs['window_valid']
    loss = det_losses.distillation_loss(student, target, valid)
    cosine = (student * target).sum(-1)
    return loss, {'cosine': (cosine * valid).sum() / valid.sum().clip(1), 'windows': valid.sum() / valid.shape[0]}


def pixel_distill(config, options) -> PixelDistillTask:
  _distill_options(options)
  return PixelDistillTask()


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
    student = {k: v for k, v in variables.items() if k != frozen_lib.TEACHER}
    return lseg_eval.evaluate(model, student, config)


def pixel_ce(config, options) -> PixelCETask:
  unknown = sorted(set(options) - {'weight'})
  if unknown:
    raise ValueError(f'config.tasks.pixel_ce: unknown options {unknown}; it takes only `weight` (the classes '
                     'are config.classes)')
  return PixelCETask(lookup=tuple(classes_lib.from_config(config).train_lookup().tolist()))
