"""ViLD's student: a compact two-stage open-vocabulary detector (Gu et al. 2022, tensorflow/tpu vild).

  images -> CLIP ViT (last block's tokens, before ln_post) -> neck: LayerNorm, 1x1 conv,
            [x upsample transposed conv], ReLU, 3x3 conv -> one feature map F, stride patch / upsample
  RPN (single level, anchor-based, class-agnostic; torchvision's RPNHead):
            3x3 conv + ReLU -> objectness logit and 4 deltas per anchor (A anchors per cell)
  proposals (no gradient): decode deltas on the anchors, clip to the image, drop boxes thinner
            than min_size, top pre_nms_topk, NMS, top post_nms_topk (padded, with a mask)
  box head on RoIAlign(F, rois) (roi_size^2, sampling_ratio, aligned=True):
            flatten -> fc6 -> ReLU -> fc7 -> ReLU -> project_to_clip -> L2-normalise = region embedding
                                                  -> box_predict: 4 class-agnostic deltas (weights 10, 10, 5, 5)
  background: one learned embedding, normalised where used (ViLD's 'background-class-predict')

ViLD-text scores region embeddings against frozen CLIP text embeddings of
the classes plus the background at temperature 0.01 (`vild_text_logits`);
ViLD-image pulls region embeddings of proposals towards the CLIP image
embeddings of their crops (an L1 loss; the losses live with the tasks). With
`image_head=True` a second fc6/fc7/projection branch gives separate
`image_embeddings` for that loss (ViLD-ensemble's 'double_branch'), and
`vild_ensemble_scores` combines the two at inference.

The paper's student is Mask R-CNN on a ResNet-FPN; this one keeps the parts
that make ViLD (proposals, RoIAlign, an embedding box head, class-agnostic
refinement) on the CLIP ViT this library already has, at a single level.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clip_jax.layers.initializers import normal, param_with_axes
from clip_jax.layers.norms import LayerNorm
from clip_jax.layers.resample import PatchUpsample, constrain_map, conv
from clip_jax.layers.roi_align import roi_align
from clip_jax.models import boxes as box_ops
from clip_jax.models import transfer, zoo
from clip_jax.models.clip import l2_normalize

TEMPERATURE = 0.01


def _dense(features, name, axes, init, dtype, param_dtype):
  return nn.Dense(features, name=name, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class EmbeddingBranch(nn.Module):
  """fc6 -> ReLU -> fc7 -> ReLU -> Dense(embed_dim) -> L2-normalise; also returns the fc7 features."""
  head_dim: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.lecun_normal()
    h = nn.relu(_dense(self.head_dim, 'fc6', ('embed', 'mlp'), init, **kw)(x))
    h = nn.relu(_dense(self.head_dim, 'fc7', ('mlp', 'embed'), init, **kw)(h))
    emb = _dense(self.embed_dim, 'project_to_clip', ('embed', 'joint'), init, **kw)(h)
    return l2_normalize(emb), h


class ViLD(nn.Module):
  """`apply(variables, images [B, S, S, 3], extra_rois=None)` -> dict of detector outputs.

  Outputs (N = anchors, P = post_nms_topk, R = P + extra rois, D = embed_dim):
    objectness [B, N], rpn_deltas [B, N, 4]       RPN logits and deltas, anchors in `anchors()`
    proposals [B, P, 4], proposal_scores [B, P], proposal_valid [B, P]
    rois [B, R, 4], roi_valid [B, R]              proposals then `extra_rois` (e.g. ground truth
                                                  boxes in training, as Detectron appends them)
    region_embeddings [B, R, D]                   unit norm
    box_deltas [B, R, 4], boxes [B, R, 4]         refinement deltas and the refined, clipped boxes
    image_embeddings [B, R, D]                    only with image_head
    background_embedding [D]                      the learned background, unit norm
  """
  vision: nn.Module
  embed_dim: int
  anchor_sizes: Sequence[float]
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  neck_dim: int = 256
  neck_upsample: int = 1
  pre_nms_topk: int = 1000
  post_nms_topk: int = 100
  nms_threshold: float = 0.7
  min_size: float = 1e-3
  roi_size: int = 7
  sampling_ratio: int = 2
  head_dim: int = 1024
  image_head: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @property
  def stride(self) -> float:
    return self.vision.patch_size / self.neck_upsample

  @property
  def num_anchors_per_cell(self) -> int:
    return len(self.anchor_sizes) * len(self.aspect_ratios)

  def anchors(self) -> np.ndarray:
    """[grid^2 * A, 4] anchors in the order of `objectness` / `rpn_deltas`."""
    grid = self.vision.grid_size * self.neck_upsample
    return box_ops.make_anchors(grid, grid, self.stride, self.anchor_sizes, self.aspect_ratios)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.neck_ln = LayerNorm(**kw)
    self.neck_proj = conv(self.neck_dim, 1, **kw)
    if self.neck_upsample > 1:
      self.neck_up = PatchUpsample(self.neck_dim, self.neck_upsample, **kw)
    self.neck_conv = conv(self.neck_dim, 3, **kw)
    rpn_init = normal(0.01)  # torchvision RPNHead
    self.rpn_conv = conv(self.neck_dim, 3, kernel_init=rpn_init, **kw)
    self.rpn_logits = conv(self.num_anchors_per_cell, 1, kernel_init=rpn_init, **kw)
    self.rpn_bbox = conv(4 * self.num_anchors_per_cell, 1, kernel_init=rpn_init, **kw)
    self.text_branch = EmbeddingBranch(self.head_dim, self.embed_dim, **kw)
    # ViLD: box-predict kernel ~ N(0, 0.001), so refinement starts near the identity.
    self.box_predict = _dense(4, None, ('embed', None), normal(0.001), **kw)
    if self.image_head:
      self.image_branch = EmbeddingBranch(self.head_dim, self.embed_dim, **kw)
    self.background = param_with_axes(self, 'background', normal(0.01), (self.embed_dim,), self.param_dtype,
                                      ('joint',))

  def _check_images(self, images):
    s = self.vision.image_size
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1:3] != (s, s):
      raise ValueError(f'images must be float NHWC [batch, {s}, {s}, 3] (model.vision.image_size); '
                       f'got shape {tuple(images.shape)}')

  def features(self, images):
    """The detector's feature map [B, g * neck_upsample, g * neck_upsample, neck_dim]."""
    self._check_images(images)
    (tokens,) = self.vision(images, hooks=(self.vision.layers - 1,))
    g = self.vision.grid_size
    x = self.neck_ln(tokens[:, 1:]).reshape(tokens.shape[0], g, g, tokens.shape[-1])
    x = self.neck_proj(x)
    if self.neck_upsample > 1:
      x = self.neck_up(x)
    return constrain_map(self.neck_conv(nn.relu(x)))

  def rpn(self, features):
    """Objectness logits [B, N] and deltas [B, N, 4], N = cells * A (anchor-minor)."""
    b = features.shape[0]
    x = nn.relu(self.rpn_conv(features))
    return self.rpn_logits(x).reshape(b, -1), self.rpn_bbox(x).reshape(b, -1, 4)

  def propose(self, objectness, deltas):
    """(boxes [B, P, 4], scores [B, P], valid [B, P]): NMS'd proposals, best first, no gradient.

    Scores are objectness logits; invalid (padding) slots score -inf.
    """
    anchors = jnp.asarray(self.anchors())
    size = float(self.vision.image_size)
    k = min(self.pre_nms_topk, anchors.shape[0])

    def one(logits, dl):
      boxes = box_ops.clip_boxes(box_ops.decode_boxes(dl, anchors), size, size)
      wide = ((boxes[:, 2] - boxes[:, 0]) >= self.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_size)
      scores, idx = jax.lax.top_k(jnp.where(wide, logits, -jnp.inf), k)
      candidates = boxes[idx]
      keep, valid = box_ops.nms(candidates, scores, self.nms_threshold, self.post_nms_topk)
      return candidates[keep], jnp.where(valid, scores[keep], -jnp.inf), valid

    objectness, deltas = jax.lax.stop_gradient((objectness.astype(jnp.float32), deltas.astype(jnp.float32)))
    return jax.vmap(one)(objectness, deltas)

  def embed_regions(self, features, rois):
    """Box-head outputs for rois [B, R, 4]: region_embeddings, box_deltas, boxes[, image_embeddings]."""
    pooled = roi_align(features, rois, self.roi_size, spatial_scale=1.0 / self.stride,
                       sampling_ratio=self.sampling_ratio)
    x = pooled.reshape(pooled.shape[0], pooled.shape[1], -1)
    x = nn.with_logical_constraint(x, ('act_batch', None, None))
    emb, h = self.text_branch(x)
    deltas = self.box_predict(h).astype(jnp.float32)
    size = float(self.vision.image_size)
    refined = box_ops.decode_boxes(deltas, jax.lax.stop_gradient(rois), box_ops.HEAD_WEIGHTS)
    out = dict(region_embeddings=emb, box_deltas=deltas, boxes=box_ops.clip_boxes(refined, size, size))
    if self.image_head:
      out['image_embeddings'] = self.image_branch(x)[0]
    return out

  def __call__(self, images, extra_rois=None, extra_valid=None, *, train: bool = False):
    del train  # no dropout or batch statistics
    if extra_rois is not None and (extra_rois.ndim != 3 or extra_rois.shape[0] != images.shape[0]
                                   or extra_rois.shape[-1] != 4):
      raise ValueError(f'extra_rois must be [batch={images.shape[0]}, num_rois, 4] (x1, y1, x2, y2 in '
                       f'pixels); got shape {tuple(extra_rois.shape)}')
    features = self.features(images)
    objectness, rpn_deltas = self.rpn(features)
    proposals, scores, valid = self.propose(objectness, rpn_deltas)
    rois, roi_valid = proposals, valid
    if extra_rois is not None:
      if extra_valid is None:
        extra_valid = jnp.ones(extra_rois.shape[:2], bool)
      rois = jnp.concatenate([proposals, extra_rois.astype(proposals.dtype)], axis=1)
      roi_valid = jnp.concatenate([valid, extra_valid.astype(bool)], axis=1)
    out = dict(objectness=objectness, rpn_deltas=rpn_deltas, proposals=proposals, proposal_scores=scores,
               proposal_valid=valid, rois=rois, roi_valid=roi_valid,
               background_embedding=l2_normalize(self.background), **self.embed_regions(features, rois))
    return out


def vild_text_logits(region_emb, class_text_emb, background_emb, temperature: float = TEMPERATURE):
  """ViLD-text logits [..., 1 + C]: [background, classes] cosines / temperature.

  region_emb [..., D], class_text_emb [C, D] (CLIP text embeddings of the
  class prompts), background_emb [D]. All three are L2-normalised here (the
  ViLD head normalises the visual features and each classifier column), so
  raw embeddings are fine. Column 0 is the background.
  """
  classifier = jnp.concatenate([l2_normalize(background_emb)[None], l2_normalize(class_text_emb)], axis=0)
  return jnp.einsum('...d,cd->...c', l2_normalize(region_emb), classifier) / temperature


def vild_ensemble_scores(text_logits, image_logits, is_base, weight: float = 2 / 3):
  """ViLD-ensemble class probabilities [..., C] (background column dropped).

  p_t, p_i = softmax of the text- and image-branch logits ([..., 1 + C], as
  `vild_text_logits` gives). Base classes trust the text branch, novel ones
  the image branch: p = p_t^w p_i^(1-w) for base, p_t^(1-w) p_i^w for novel,
  w = 2/3 (SYSTEMS.md; the geometric weighting is from the paper).
  """
  p_t = jax.nn.softmax(text_logits.astype(jnp.float32), axis=-1)[..., 1:]
  p_i = jax.nn.softmax(image_logits.astype(jnp.float32), axis=-1)[..., 1:]
  w = jnp.where(jnp.asarray(is_base, bool), weight, 1 - weight)
  return p_t ** w * p_i ** (1 - w)


# --- configuration -----------------------------------------------------------------------------

def vild_config(clip='ViT-B/16', *, neck_dim: int = 256, neck_upsample: int = 1,
                anchor_sizes: Sequence[float] = (32, 64, 128, 256), aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                pre_nms_topk: int = 1000, post_nms_topk: int = 100, nms_threshold: float = 0.7,
                min_size: float = 1e-3, roi_size: int = 7, sampling_ratio: int = 2, head_dim: int = 1024,
                image_head: bool = False, temperature: float = TEMPERATURE) -> ml_collections.ConfigDict:
  """A ViLD model config whose backbone is a CLIP ViT config's image tower (zoo name or config).

  embed_dim is the CLIP joint width: the text embeddings the regions are scored against.
  """
  base = (zoo.get(clip) if isinstance(clip, str) else clip).to_dict()
  c = ml_collections.ConfigDict({k: base[k] for k in ('embed_dim', 'act', 'dtype', 'param_dtype',
                                                     'attn_implementation', 'remat', 'scan_layers', 'vision')})
  c.update(dict(name='vild', temperature=float(temperature),
                neck=dict(dim=neck_dim, upsample=neck_upsample),
                rpn=dict(anchor_sizes=tuple(float(s) for s in anchor_sizes),
                         aspect_ratios=tuple(float(r) for r in aspect_ratios), pre_nms_topk=pre_nms_topk,
                         post_nms_topk=post_nms_topk, nms_threshold=float(nms_threshold), min_size=float(min_size)),
                head=dict(roi_size=roi_size, sampling_ratio=sampling_ratio, dim=head_dim, image_head=image_head)))
  return c


def _backbone_clip_config(config):
  # A CLIP config around ViLD's vision tower; the one-block text tower only makes it a valid CLIP
  # config for zoo.validate / the CLIP builder (ViLD creates no text parameters).
  c = zoo.clip_config(config.embed_dim, config.vision.to_dict(), zoo.text_tower(64, 1, heads=1), act=config.act)
  for field in ('dtype', 'param_dtype', 'attn_implementation', 'remat', 'scan_layers'):
    c[field] = config.get(field, c[field])
  return c


ZOO = {
    'ViT-B/16': lambda: vild_config('ViT-B/16'),
    # Tests and CPU runs: 64x64 images, an 8x8 grid at stride 8, 6 anchors per cell.
    'tiny': lambda: vild_config(zoo.clip_config(64, zoo.vit_vision(64, 8, 64, 2, heads=4),
                                                zoo.text_tower(64, 2, heads=4)),
                                neck_dim=32, anchor_sizes=(16, 32), pre_nms_topk=64, post_nms_topk=16, head_dim=64),
}


def get(name: str) -> ml_collections.ConfigDict:
  if name not in ZOO:
    raise ValueError(f'unknown ViLD variant {name!r}; choose one of {sorted(ZOO)}')
  return ZOO[name]()


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the fix for an inconsistent ViLD config."""
  if config.vision.get('kind') != 'vit':
    raise ValueError(f"model.vision.kind={config.vision.get('kind')!r}: ViLD's backbone here is a ViT; use kind='vit'")
  zoo.validate(_backbone_clip_config(config))
  n, r, h = config.neck, config.rpn, config.head
  if n.dim < 1 or n.upsample < 1 or n.upsample & (n.upsample - 1):
    raise ValueError(f'model.neck: dim={n.dim} must be >= 1 and upsample={n.upsample} a power of two (1, 2, 4)')
  if not r.anchor_sizes or not r.aspect_ratios or min(r.anchor_sizes) <= 0 or min(r.aspect_ratios) <= 0:
    raise ValueError(f'model.rpn.anchor_sizes={tuple(r.anchor_sizes)} / aspect_ratios={tuple(r.aspect_ratios)}: '
                     'give positive sizes (pixels) and ratios (height / width)')
  if not 1 <= r.post_nms_topk <= r.pre_nms_topk:
    raise ValueError(f'model.rpn: need 1 <= post_nms_topk ({r.post_nms_topk}) <= pre_nms_topk ({r.pre_nms_topk})')
  if not 0 < r.nms_threshold <= 1:
    raise ValueError(f'model.rpn.nms_threshold={r.nms_threshold}: use an IoU in (0, 1], e.g. 0.7')
  if h.roi_size < 1 or h.sampling_ratio < 1 or h.dim < 1:
    raise ValueError(f'model.head: roi_size={h.roi_size}, sampling_ratio={h.sampling_ratio} and dim={h.dim} must '
                     'be positive (sampling_ratio is static: the adaptive -1 of torchvision cannot be jitted)')
  if not config.temperature > 0:
    raise ValueError(f'model.temperature={config.temperature}: use a positive temperature (ViLD: 0.01)')


def build(config: ml_collections.ConfigDict) -> ViLD:
  """The ViLD module of a validated `config`, its ViT built exactly as CLIP's image tower."""
  validate(config)
  from clip_jax import models  # the CLIP builder; imported here as clip_jax.models imports this module
  vision = models.build(_backbone_clip_config(config)).vision
  n, r, h = config.neck, config.rpn, config.head
  return ViLD(vision=vision, embed_dim=config.embed_dim, anchor_sizes=tuple(r.anchor_sizes),
              aspect_ratios=tuple(r.aspect_ratios), neck_dim=n.dim, neck_upsample=n.upsample,
              pre_nms_topk=r.pre_nms_topk, post_nms_topk=r.post_nms_topk, nms_threshold=r.nms_threshold,
              min_size=r.min_size, roi_size=h.roi_size, sampling_ratio=h.sampling_ratio, head_dim=h.dim,
              image_head=h.image_head, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def init_from_clip(vild_variables, clip_variables):
  """`vild_variables` with the backbone copied from a CLIP variables tree of the same image tower.

  The neck reads the last block before ln_post, so CLIP's ln_post and proj are not used.
  """
  return transfer.copy_towers(vild_variables, clip_variables, ('vision',), 'ViLD',
                              'the CLIP config vild_config(...) was made from')
