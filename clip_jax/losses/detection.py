"""Two-stage detector losses: anchor and RoI matching, RPN, box regression, ViLD-text, ViLD-image.

Matching follows torchvision's Faster R-CNN: an anchor is positive at IoU >=
0.7 with a ground-truth box, negative below 0.3, ignored between, and every
ground-truth box's best anchors (all anchors tying its highest IoU) are
positive too; an RoI is foreground at IoU >= 0.5 with its best box, else
background. Everything is per image over padded, masked arrays (vmap), and
every mean is over the global batch's counts, so the losses do not depend on
how the batch is split over devices.

Departures, all deliberate: the RPN does not sample 256 anchors per image
(random subsets would make a step depend on the sampling stream); its
objectness loss instead weighs positives and negatives equally, as a 1:1
sample would on average. Box losses are smooth L1 summed over the four
deltas and averaged over the positive anchors / foreground RoIs.
"""

import jax
import jax.numpy as jnp

from clip_jax.models import boxes as box_ops

RPN_FG_IOU, RPN_BG_IOU = 0.7, 0.3
ROI_FG_IOU = 0.5
RPN_BETA = 1.0 / 9  # torchvision's RPN smooth-L1 beta
HEAD_BETA = 1.0     # ViLD / Detectron's box head: Huber at 1 on (10, 10, 5, 5)-weighted deltas


def smooth_l1(x, beta: float):
  """torch's smooth_l1 elementwise: 0.5 x^2 / beta below beta, |x| - 0.5 beta above (beta=0: |x|)."""
  ax = jnp.abs(x)
  if beta == 0:
    return ax
  return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def match_anchors(anchors, gt_boxes, gt_valid):
  """One image: (labels [N] 1 / 0 / -1 ignore, matched box [N, 4]) of anchors [N, 4] to boxes [M, 4]."""
  iou = jnp.where(gt_valid[None, :], box_ops.box_iou(anchors, gt_boxes), -1.0)  # [N, M]
  best = iou.max(axis=1)
  idx = iou.argmax(axis=1)
  labels = jnp.where(best >= RPN_FG_IOU, 1, jnp.where(best < RPN_BG_IOU, 0, -1))
  # Low-quality matches: each valid box's best anchors (ties included) are positive.
  per_gt_best = iou.max(axis=0)  # [M]
  is_best = (iou == per_gt_best[None, :]) & gt_valid[None, :] & (per_gt_best[None, :] > 0)
  labels = jnp.where(is_best.any(axis=1), 1, labels)
  labels = jnp.where(gt_valid.any(), labels, 0)  # no boxes: every anchor is background
  return labels, gt_boxes[idx]


def rpn_losses(objectness, deltas, anchors, gt_boxes, gt_valid):
  """(objectness loss, box loss, metrics) for the batch: objectness [B, N], deltas [B, N, 4]."""
  labels, matched = jax.vmap(match_anchors, in_axes=(None, 0, 0))(anchors, gt_boxes, gt_valid)
  logits = objectness.astype(jnp.float32)
  bce = jnp.maximum(logits, 0) - logits * (labels == 1) + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  pos, neg = labels == 1, labels == 0
  num_pos, num_neg = pos.sum(), neg.sum()
  obj = 0.5 * (jnp.where(pos, bce, 0).sum() / jnp.maximum(num_pos, 1)
               + jnp.where(neg, bce, 0).sum() / jnp.maximum(num_neg, 1))
  targets = box_ops.encode_boxes(matched, jnp.broadcast_to(anchors, matched.shape), box_ops.RPN_WEIGHTS)
  per_anchor = smooth_l1(deltas.astype(jnp.float32) - targets, RPN_BETA).sum(-1)
  box = jnp.where(pos, per_anchor, 0).sum() / jnp.maximum(num_pos, 1)
  return obj, box, {'positive_anchors': num_pos / objectness.shape[0]}


def match_rois(rois, roi_valid, gt_boxes, gt_valid, gt_classes):
  """One image: (class [R]: 0 background / 1 + k class k / -1 not a RoI, matched box [R, 4])."""
  iou = jnp.where(gt_valid[None, :], box_ops.box_iou(rois, gt_boxes), -1.0)
  best, idx = iou.max(axis=1), iou.argmax(axis=1)
  cls = jnp.where(best >= ROI_FG_IOU, 1 + gt_classes[idx], 0)
  return jnp.where(roi_valid, cls, -1), gt_boxes[idx]


def text_classification_loss(logits, roi_classes):
  """ViLD-text: softmax CE of logits [B, R, 1 + K] (background first) over the valid RoIs."""
  valid = roi_classes >= 0
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.maximum(roi_classes, 0)[..., None], axis=-1)[..., 0]
  count = valid.sum()
  loss = -jnp.where(valid, picked, 0).sum() / jnp.maximum(count, 1)
  fg = roi_classes > 0
  correct = (logits.argmax(-1) == roi_classes) & valid
  return loss, {'accuracy': correct.sum() / jnp.maximum(count, 1),
                'foreground_accuracy': (correct & fg).sum() / jnp.maximum(fg.sum(), 1),
                'foreground_rois': fg.sum() / logits.shape[0]}


def box_regression_loss(box_deltas, rois, matched, roi_classes):
  """Class-agnostic refinement of the foreground RoIs towards their boxes, (10, 10, 5, 5)-weighted deltas."""
  fg = roi_classes > 0
  safe_rois = jnp.where(fg[..., None], rois, jnp.asarray([0.0, 0.0, 1.0, 1.0]))  # no log(0) off the foreground
  safe_boxes = jnp.where(fg[..., None], matched, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
  targets = box_ops.encode_boxes(safe_boxes, jax.lax.stop_gradient(safe_rois), box_ops.HEAD_WEIGHTS)
  per_roi = smooth_l1(box_deltas.astype(jnp.float32) - targets, HEAD_BETA).sum(-1)
  return jnp.where(fg, per_roi, 0).sum() / jnp.maximum(fg.sum(), 1)


def distillation_loss(region_embeddings, teacher_embeddings, valid):
  """ViLD-image: the L1 distance ||e_r - t_r||_1 averaged over the valid proposals (paper, eq. 3)."""
  per = jnp.abs(region_embeddings.astype(jnp.float32) - teacher_embeddings.astype(jnp.float32)).sum(-1)
  return jnp.where(valid, per, 0).sum() / jnp.maximum(valid.sum(), 1)
