"""ViLD evaluation: COCO-style AP / AP50 (pycocotools), base and novel classes apart, on held-out digits.

Inference (ViLD's): the proposals of each image go through the box head; the
refined (class-agnostic) boxes are scored against [learned background, the
teacher's text embeddings of ALL class prompts] / temperature, softmax. With
an image branch (model.head.image_head) the scores are ViLD-ensemble's
geometric mix (base classes trust the text branch, novel ones the image
branch: clip_jax.models.vild.vild_ensemble_scores). Then, per class, boxes
scoring at least `score_threshold` go through NMS at `nms_iou` and each
image keeps its `max_detections` best, as Mask R-CNN's post-processing.

AP is pycocotools' COCOeval ('bbox'), the standard: the same ground truth
(every object of every scene) evaluated twice, with params.catIds set to the
base and to the novel classes. AP averages IoU 0.50:0.95, AP50 is IoU 0.5.
A class set with no ground truth scores NaN (pycocotools' -1).
"""

import contextlib
import functools
import io
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from clip_jax import models
from clip_jax.data import digits as digits_data
from clip_jax.data import transforms
from clip_jax.evaluate import embed
from clip_jax.evaluate import segmentation as seg_metrics
from clip_jax.models import vild as vild_lib
from clip_jax.tasks import classes as classes_lib
from clip_jax.train import frozen as frozen_lib
from clip_jax.train import pretrained


def default_config() -> ml_collections.ConfigDict:
  """`config.eval.detection` (num_images=0 turns it off during training)."""
  return ml_collections.ConfigDict(dict(num_images=500, num_digits=(1, 3), seed=4321, batch_size=50,
                                        score='auto', score_threshold=0.01, nms_iou=0.5, max_detections=100))


SCORES = ('auto', 'text', 'ensemble')


@functools.lru_cache(maxsize=8)
def _detect_fn(model, teacher, mesh, ensemble: bool, temperature: float, base: tuple):
  out_sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())

  def detect(variables, teacher_variables, images, class_tokens):
    classes = teacher.apply(teacher_variables, class_tokens, method='encode_text', normalize=True)
    out = model.apply(variables, transforms.normalize(images))
    text = vild_lib.vild_text_logits(out['region_embeddings'], classes, out['background_embedding'], temperature)
    if ensemble:
      image = vild_lib.vild_text_logits(out['image_embeddings'], classes, out['background_embedding'], temperature)
      is_base = jnp.zeros((classes.shape[0],), bool).at[jnp.asarray(base, jnp.int32)].set(True)
      probs = vild_lib.vild_ensemble_scores(text, image, is_base)
    else:
      probs = jax.nn.softmax(text, axis=-1)[..., 1:]
    return out['boxes'], probs, out['proposal_valid']

  return jax.jit(detect, out_shardings=out_sharding)


def nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
  """Indices kept by greedy NMS (IoU strictly above `iou` suppresses), best first."""
  order = np.argsort(-scores, kind='stable')
  keep = []
  while order.size:
    i = order[0]
    keep.append(i)
    rest = order[1:]
    lt = np.maximum(boxes[i, :2], boxes[rest, :2])
    rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area(boxes[i]) + area(boxes[rest]) - inter
    order = rest[~(inter / np.where(union > 0, union, 1) > iou)]
  return np.asarray(keep, np.int64)


def postprocess(boxes, probs, valid, score_threshold: float, nms_iou: float, max_detections: int):
  """One image's (boxes [K, 4], labels [K], scores [K]) from per-RoI boxes [R, 4] and probs [R, C]."""
  out_b, out_l, out_s = [], [], []
  boxes, probs = boxes[valid], probs[valid]
  for c in range(probs.shape[1]):
    idx = np.nonzero(probs[:, c] >= score_threshold)[0]
    if idx.size == 0:
      continue
    kept = idx[nms_numpy(boxes[idx], probs[idx, c], nms_iou)]
    out_b.append(boxes[kept])
    out_l.append(np.full(len(kept), c))
    out_s.append(probs[kept, c])
  if not out_b:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0,), np.float32)
  b, l, s = np.concatenate(out_b), np.concatenate(out_l), np.concatenate(out_s)
  top = np.argsort(-s, kind='stable')[:max_detections]
  return b[top].astype(np.float32), l[top], s[top].astype(np.float32)


def detect(model, variables, teacher, teacher_variables, images: np.ndarray, vocab: classes_lib.Vocabulary,
           settings, temperature: float, context_length: int) -> list:
  """[(boxes, labels, scores)] per uint8 image [N, S, S, 3]; labels index vocab.names."""
  if settings.score not in SCORES:
    raise ValueError(f'detection score={settings.score!r}: choose one of {SCORES}')
  ensemble = settings.score == 'ensemble' or (settings.score == 'auto' and model.image_head)
  if ensemble and not model.image_head:
    raise ValueError("score='ensemble' needs ViLD's image branch (model.head.image_head=True); use 'text'")
  mesh = embed.mesh_of(variables)
  fn = _detect_fn(model, teacher, mesh, bool(ensemble), float(temperature), tuple(vocab.train_ids))
  tokens = jnp.asarray(vocab.tokens(range(len(vocab.names)), context_length))
  results = []
  bs = int(settings.batch_size)
  for start in range(0, len(images), bs):
    chunk = images[start:start + bs]
    n = len(chunk)
    if n < bs:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
    boxes, probs, valid = jax.device_get(fn(variables, teacher_variables, embed.place(chunk, mesh), tokens))
    for i in range(n):
      results.append(postprocess(boxes[i], probs[i], valid[i], float(settings.score_threshold),
                                 float(settings.nms_iou), int(settings.max_detections)))
  return results


def coco_ap(truth: Sequence[tuple], detections: Sequence[tuple], class_ids: Sequence[int],
            num_classes: int) -> dict:
  """{'AP', 'AP50'} of pycocotools' COCOeval over `class_ids` (NaN with no ground truth there).

  truth: per image (boxes [K, 4] x1 y1 x2 y2, labels [K]); detections: per image (boxes, labels, scores).
  """
  try:
    from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('detection AP needs pycocotools: pip install pycocotools (or the [detection] extra)') from e
  if len(truth) != len(detections):
    raise ValueError(f'{len(truth)} images of ground truth but {len(detections)} of detections')
  xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
  annotations, results = [], []
  for image_id, ((gt_boxes, gt_labels), (boxes, labels, scores)) in enumerate(zip(truth, detections)):
    for box, label in zip(np.asarray(gt_boxes).reshape(-1, 4), np.asarray(gt_labels).reshape(-1)):
      _check_box(box, label, num_classes, f'ground truth of image {image_id}')
      annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=int(label) + 1,
                              bbox=xywh(box), area=float((box[2] - box[0]) * (box[3] - box[1])), iscrowd=0))
    for box, label, score in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(labels).reshape(-1),
                                 np.asarray(scores).reshape(-1)):
      _check_box(box, label, num_classes, f'detections of image {image_id}')
      results.append(dict(image_id=image_id, category_id=int(label) + 1, bbox=xywh(box), score=float(score)))
  if not any(int(a['category_id']) - 1 in class_ids for a in annotations):
    return {'AP': float('nan'), 'AP50': float('nan')}
  if not results:
    return {'AP': 0.0, 'AP50': 0.0}
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
    gt = COCO()
    gt.dataset = dict(images=[dict(id=i) for i in range(len(truth))],
                      categories=[dict(id=c + 1, name=str(c)) for c in range(num_classes)], annotations=annotations)
    gt.createIndex()
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, 'bbox')
    ev.params.catIds = [int(c) + 1 for c in class_ids]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  nan = lambda v: float('nan') if v < 0 else float(v)
  return {'AP': nan(ev.stats[0]), 'AP50': nan(ev.stats[1])}


def _check_box(box, label, num_classes, where):
  if not 0 <= int(label) < num_classes:
    raise ValueError(f'{where}: class id {int(label)} is outside [0, {num_classes}) (config.classes.names)')
  if not (box[2] >= box[0] and box[3] >= box[1]):
    raise ValueError(f'{where}: box {np.asarray(box).tolist()} has x2 < x1 or y2 < y1; boxes are (x1, y1, x2, y2)')


def test_scenes(e, canvas_size: int, image_size: int):
  """(images uint8 [N, S, S, 3], [(boxes, labels)]) of held-out digits scenes at the model's size."""
  source = digits_data.DigitsSource('test', num_examples=int(e.num_images), seed=int(e.seed),
                                    canvas_size=canvas_size, num_digits=tuple(e.num_digits))
  scenes = [source[i] for i in range(int(e.num_images))]
  images = np.stack([s['image'] for s in scenes])
  scale = image_size / canvas_size  # square canvases: the eval geometry is a plain resize
  truth = [(s['boxes'][:s['num_objects']] * scale, s['labels'][:s['num_objects']]) for s in scenes]
  return seg_metrics.model_input(images, image_size), truth


def score(model, variables, teacher, teacher_variables, config, e, images, truth) -> tuple[dict, list]:
  """({'base/AP', 'base/AP50', 'novel/AP', 'novel/AP50'}, detections) of one ViLD run."""
  vocab = classes_lib.from_config(config)
  dets = detect(model, variables, teacher, teacher_variables, images, vocab, e,
                config.model.get('temperature', vild_lib.TEMPERATURE),
                pretrained.teacher_config(config).text.context_length)
  out = {}
  for split, ids in (('base', vocab.train_ids), ('novel', vocab.held_out_ids)):
    for k, v in coco_ap(truth, dets, ids, len(vocab.names)).items():
      out[f'{split}/{k}'] = v
  return out, dets


def evaluate(model, variables, config, settings: Optional[ml_collections.ConfigDict] = None) -> dict:
  """Base / novel AP and AP50 on config.eval.detection's scenes (the trainer's eval); variables
  carry the teacher's under 'teacher' (clip_jax.train.frozen.model_variables)."""
  e = settings or config.eval.detection
  variables = dict(variables)
  teacher_variables = variables.pop(frozen_lib.TEACHER)
  teacher = models.build(pretrained.teacher_config(config))
  images, truth = test_scenes(e, config.data.digits.canvas_size, config.model.vision.image_size)
  return score(model, variables, teacher, teacher_variables, config, e, images, truth)[0]
