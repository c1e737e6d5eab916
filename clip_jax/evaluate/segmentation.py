"""Zero-shot semantic segmentation: GroupViT's grouping, and a CLIP patch-similarity baseline.

GroupViT (NVlabs' GroupViTSegInference, on a batch):

  1. the stages' soft assignment maps [G_i, L_i] are chained (patches -> stage-1
     groups -> ... -> final segments): a [patches, G] map, upsampled bilinearly
     (half-pixel centres, as torch's align_corners=False) to the output size;
     each pixel goes to its argmax segment;
  2. each segment is labelled by its text similarity: with s the model's own
     logit scale (capped at 100; NVlabs' clamp(logit_scale.exp(), max=100)),
     p = softmax(s * segment @ classes), restricted to the image's `top_k`
     classes by softmax(s * image @ classes) (a second softmax over only
     those, times p: NVlabs' `group_affinity_mat *= pre_group_affinity_mat`);
  3. a pixel is background where its segment's best class probability is below
     min(bg_thresh, the image's largest one), else that class.

The CLIP baseline is the same procedure with every patch its own segment: its
feature is the ViT's patch token after ln_post through the image projection,
and the image-level restriction uses the pooled (CLS) embedding.

Scores are over the digits test split (scans never seen in training): class 0
is background, 1 + d is digit d, the `digits` mask encoding. `confusion` and
`miou` accumulate IoU over the whole set, as mmseg does: per class
TP / (TP + FP + FN), averaged over the classes that occur (in truth or
prediction).
"""

import dataclasses
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np

from clip_jax.data import augment
from clip_jax.data import digits as digits_data
from clip_jax.evaluate import embed, zeroshot

NUM_CLASSES = 1 + digits_data.NUM_CLASSES
CLASS_NAMES = ('background',) + digits_data.DIGIT_NAMES


def default_config() -> ml_collections.ConfigDict:
  """`config.eval.segmentation` (num_images=0 turns it off during training)."""
  return ml_collections.ConfigDict(dict(
      num_images=500,          # held-out multi-digit canvases
      num_digits=(2, 3),
      seed=4321,
      top_k=5,                 # image-level classes a segment may take (NVlabs: 5)
      bg_thresh=0.95,          # NVlabs' default
      # None: the model's own learned scale, capped at 100, as NVlabs (100 for their trained models, lower
      # for a short run, which flattens the class probabilities the threshold reads); a number overrides.
      logit_scale=config_dict.placeholder(float),
      batch_size=64,
  ))


@dataclasses.dataclass(frozen=True)
class Settings:
  top_k: int = 5
  bg_thresh: float = 0.95
  logit_scale: Optional[float] = None  # None: the model's own
  batch_size: int = 64

  def __post_init__(self):
    if not (isinstance(self.top_k, int) and self.top_k >= 1):
      raise ValueError(f'segmentation top_k={self.top_k!r} must be an int >= 1 (classes kept per image)')
    if not 0.0 <= self.bg_thresh <= 1.0:
      raise ValueError(f'segmentation bg_thresh={self.bg_thresh} must be in [0, 1] (a class probability)')
    if self.logit_scale is not None and not self.logit_scale > 0:
      raise ValueError(f'segmentation logit_scale={self.logit_scale} must be positive (or None: the model\'s own)')
    if self.batch_size < 1:
      raise ValueError(f'segmentation batch_size={self.batch_size} must be >= 1')


def method_name(model_config) -> str:
  """'groupvit' or 'clip-patch'; a ValueError for models the baseline cannot read."""
  if model_config.name == 'groupvit':
    return 'groupvit'
  if model_config.name == 'clip' and model_config.vision.get('kind') == 'vit':
    return 'clip-patch'
  raise ValueError(f'zero-shot segmentation needs a GroupViT or a CLIP ViT (patch-similarity baseline); '
                   f'model.name={model_config.name!r} with vision kind {model_config.vision.get("kind")!r} has '
                   'no patch grid to label')


def _groupvit_dense(module, images):
  """Chained soft maps [B, h, w, G], segment features [B, G, D], image features [B, D], the logit scale."""
  image, aux = module.encode_image(images, normalize=True, return_attentions=True)
  maps = None
  for soft in aux['soft']:  # [B, G_i, L_i] -> chain over the stages: [B, L_0, G_last]
    step = jnp.swapaxes(soft, 1, 2)
    maps = step if maps is None else maps @ step
  b, n, g = maps.shape
  side = int(round(n ** 0.5))
  return dict(maps=maps.reshape(b, side, side, g), segments=aux['group_features'], image=image,
              scale=module.scale())


def _clip_dense(module, images):
  """Every patch a segment: one-hot maps [B, h, w, h*w], projected patch tokens, the pooled embedding, the scale."""
  pooled, tokens = module.vision(images, return_tokens=True)
  proj = nn.unbox(module.vision.variables['params']['proj'])
  patches = tokens[:, 1:].astype(jnp.float32) @ jnp.asarray(proj, jnp.float32)
  b, n, _ = patches.shape
  side = int(round(n ** 0.5))
  maps = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32).reshape(1, side, side, n), (b, side, side, n))
  normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return dict(maps=maps, segments=normalize(patches), image=normalize(pooled.astype(jnp.float32)),
              scale=module.scale_and_bias()[0])


_DENSE = {'groupvit': _groupvit_dense, 'clip-patch': _clip_dense}


@functools.partial(jax.jit, static_argnames=('out_size', 'top_k'))
def label_pixels(maps, segments, image, classes, *, out_size: int, top_k: int, bg_thresh, logit_scale):
  """(segmentation [B, S, S] int32: 0 background, 1 + class; segment index per pixel [B, S, S]).

  maps [B, h, w, G] soft assignments of the patch grid to G segments; segments [B, G, D] and image
  [B, D] L2-normalised features; classes [C, D] L2-normalised class embeddings.
  """
  b, _, _, g = maps.shape
  up = jax.image.resize(maps.astype(jnp.float32), (b, out_size, out_size, g), 'bilinear')
  group = jnp.argmax(up, axis=-1)
  logits = logit_scale * jnp.einsum('bgd,cd->bgc', segments.astype(jnp.float32), classes)
  prior = jax.nn.softmax(logits, axis=-1)
  image_probs = jax.nn.softmax(logit_scale * image.astype(jnp.float32) @ classes.T, axis=-1)
  _, top = jax.lax.top_k(image_probs, min(top_k, classes.shape[0]))
  allowed = jnp.zeros(image_probs.shape, bool).at[jnp.arange(b)[:, None], top].set(True)
  affinity = jax.nn.softmax(jnp.where(allowed[:, None, :], logits, -jnp.inf), axis=-1) * prior  # [B, G, C]
  per_pixel = jnp.take_along_axis(affinity, group.reshape(b, -1, 1), axis=1)  # [B, S*S, C]
  best, cls = per_pixel.max(-1), per_pixel.argmax(-1)
  thresh = jnp.minimum(bg_thresh, affinity.max(axis=(1, 2)))[:, None]
  seg = jnp.where(best < thresh, 0, cls + 1).reshape(b, out_size, out_size)
  return seg.astype(jnp.int32), group.astype(jnp.int32)


def class_embeddings(model, variables, classnames: Sequence[str], templates: Sequence[str],
                     context_length: int) -> np.ndarray:
  """[C, D] L2-normalised class embeddings (CLIP's template ensemble)."""
  return np.asarray(zeroshot.build_classifier(zeroshot.text_encoder(model, variables), classnames, templates,
                                              context_length=context_length)).T


def model_input(images: np.ndarray, image_size: int) -> np.ndarray:
  """Canvases -> the model's input size, with the eval pipeline's geometry (short side, centre crop)."""
  if images.shape[1:3] == (image_size, image_size):
    return images
  return np.stack([augment.center_crop(x, image_size)[0] for x in images])


def segment(model, variables, method: str, images: np.ndarray, classes: np.ndarray, image_size: int,
            settings: Settings = Settings()):
  """(predicted masks [N, S, S] uint8, segment index per pixel [N, S, S]) for uint8 canvases [N, S, S, 3].

  Works on any mesh the variables live on (inputs are split over its batch axes, outputs replicated).
  """
  if method not in _DENSE:
    raise ValueError(f'segmentation method {method!r}: use one of {sorted(_DENSE)}')
  dense = embed.jitted(model, _DENSE[method], embed.mesh_of(variables), uint8_images=True)
  inputs = model_input(images, image_size)
  mesh = embed.mesh_of(variables)
  preds, groups = [], []
  for start in range(0, len(images), settings.batch_size):
    chunk = inputs[start:start + settings.batch_size]
    n = len(chunk)
    if n < settings.batch_size:  # one shape: one compile
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], settings.batch_size - n, axis=0)])
    out = dense(variables, embed.place(chunk, mesh))
    seg, group = label_pixels(out['maps'], out['segments'], out['image'], jnp.asarray(classes),
                              out_size=images.shape[1], top_k=settings.top_k, bg_thresh=settings.bg_thresh,
                              logit_scale=out['scale'] if settings.logit_scale is None else settings.logit_scale)
    preds.append(np.asarray(seg)[:n].astype(np.uint8))
    groups.append(np.asarray(group)[:n])
  return np.concatenate(preds), np.concatenate(groups)


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """[C, C] pixel counts, rows = truth, columns = prediction."""
  truth, pred = np.asarray(truth, np.int64).ravel(), np.asarray(pred, np.int64).ravel()
  if truth.shape != pred.shape:
    raise ValueError(f'truth and prediction differ in size: {truth.size} vs {pred.size} pixels')
  if truth.size and (min(truth.min(), pred.min()) < 0 or max(truth.max(), pred.max()) >= num_classes):
    raise ValueError(f'class ids must be in [0, {num_classes})')
  return np.bincount(truth * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou(conf: np.ndarray) -> np.ndarray:
  """Per-class IoU; NaN for a class absent from both truth and prediction."""
  tp = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, tp / union, np.nan)


def miou(conf: np.ndarray) -> float:
  return float(np.nanmean(iou(conf)))


@functools.lru_cache(maxsize=4)
def test_scenes(num_images: int, seed: int, canvas_size: int, num_digits: tuple):
  """(canvases uint8 [N, S, S, 3], masks uint8 [N, S, S]) of the digits test split."""
  if num_images < 1:
    raise ValueError(f'segmentation num_images={num_images} must be >= 1')
  source = digits_data.DigitsSource('test', num_examples=num_images, seed=seed, canvas_size=canvas_size,
                                    num_digits=tuple(num_digits))
  scenes = [source[i] for i in range(num_images)]
  return np.stack([s['image'] for s in scenes]), np.stack([s['mask'] for s in scenes])


def templates_of(config) -> tuple:
  """The prompt template the run trained its nouns with (the spec's 'a photo of a {}.' otherwise)."""
  p = config.data.get('prompts') if 'data' in config else None
  return (p.template,) if p else ('a photo of a {}.',)


def evaluate(model, variables, config, settings: Optional[Settings] = None) -> dict:
  """{'miou', 'iou_background', 'miou_digits'} on config.eval.segmentation's test canvases."""
  e = config.eval.segmentation
  settings = settings or Settings(e.top_k, e.bg_thresh, e.logit_scale, e.batch_size)
  images, masks = test_scenes(e.num_images, e.seed, config.data.digits.canvas_size, tuple(e.num_digits))
  classes = class_embeddings(model, variables, digits_data.DIGIT_NAMES, templates_of(config),
                             config.model.text.context_length)
  pred, _ = segment(model, variables, method_name(config.model), images, classes, config.model.vision.image_size,
                    settings)
  per_class = iou(confusion(masks, pred))
  return {'miou': float(np.nanmean(per_class)), 'iou_background': float(per_class[0]),
          'miou_digits': float(np.nanmean(per_class[1:]))}
