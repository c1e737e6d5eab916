"""ViLD: a two-stage detector whose box head speaks CLIP's language (ViLD-text + ViLD-image, one step).

  python -m clip_jax.train --config configs/clip_digits.py --workdir runs/digits
  python -m clip_jax.train --config configs/clip_digits.py:vit --workdir runs/clip_vit
  python -m clip_jax.train --config configs/vild.py:digits --workdir runs/vild
  python -m clip_jax.train --config configs/vild.py:digits_text --workdir runs/vild_text
  python -m clip_jax.evaluate detect --workdir runs/vild --baseline runs/vild_text

digits: the backbone starts from the digits CLIP ViT (config.init); the
frozen teacher (config.teacher) is the main job's CLIP (runs/digits, a
ModifiedResNet, the best digits zero-shot model): its text tower embeds the
class prompts, its image tower the proposals' crops. Only boxes of the base digits
0-4 train (config.classes.train_ids); 5-9 are novel, their boxes never seen.
The objective is four weighted tasks over one forward: rpn, box_regression,
vild_text (supervised) and vild_image (distillation). `detect` scores both
runs on held-out scenes with pycocotools, base and novel AP / AP50 apart.
RESULTS (2-core CPU) are in the README's "LSeg and ViLD on digits" section: novel
AP50 0.192 with ViLD-image (ensemble scores), 0.137 without (digits_text).

Variants:
  digits        (default) ViLD-ensemble: a text branch (ViLD-text) and an image branch
                (ViLD-image), combined at inference
  digits_text   the ablation: the same run without ViLD-image (text branch only)
  tiny          a few steps of the tiny ViLD with a random tiny teacher (tests, smoke runs)
  vit_b16       the paper-scale shape: ViT-B/16 student and teacher from OpenAI / open_clip
                weights on TFDS coco/2017 (set config.init.open_clip, config.teacher.open_clip)
"""

import ml_collections

from clip_jax.data import pipeline
from clip_jax.evaluate import detection
from clip_jax.models import vild, zoo
from clip_jax.tasks import classes
from clip_jax.train import optim, pretrained

VARIANTS = ('digits', 'digits_text', 'tiny', 'vit_b16')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  variant = arg or 'digits'
  if variant not in VARIANTS:
    raise ValueError(f'configs/vild.py:{arg}: unknown variant; use one of {VARIANTS}')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 16
  c.total_steps = 400
  c.log_every_steps = 25
  c.max_bad_steps = 20
  c.tensorboard = True

  # Digits' ink boxes are 8-28 px, mostly portrait: anchors of 12-28 px at stride 8 on 64 px.
  c.model = vild.vild_config(zoo.get('digits-ViT'), neck_dim=64, anchor_sizes=(12, 20, 28),
                             aspect_ratios=(0.5, 1.0, 2.0), pre_nms_topk=200, post_nms_topk=12, nms_threshold=0.5,
                             head_dim=256, image_head=variant == 'digits')
  c.init = pretrained.default_init_config()
  c.init.workdir = 'runs/clip_vit'
  c.init.towers = ('vision',)
  # The main job's CLIP (configs/clip_digits.py, a ModifiedResNet: the best digits zero-shot model);
  # model=None reads its architecture from that run's checkpoint.
  c.teacher = ml_collections.ConfigDict(dict(model=None, workdir='runs/digits', open_clip='', step=None))
  c.classes = classes.digits_config(range(5))  # base 0-4, novel 5-9

  c.tasks = ml_collections.ConfigDict()
  c.tasks.rpn = dict(weight=1.0)
  c.tasks.box_regression = dict(weight=1.0)
  c.tasks.vild_text = dict(weight=1.0)
  # The teacher saw whole 64 px canvases with a 16-28 px digit, so a proposal's crop is taken
  # at 2.5x the box (the digit ~40 % of the crop, as in its training) rather than ViLD's 1x + 1.5x.
  c.tasks.vild_image = dict(weight=1.0, crop_scales=(2.5,))

  c.optim = optim.default_config()
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 25
  c.optim.weight_decay = 0.05

  c.data = pipeline.default_data_config()
  c.data.loader = 'grain'
  c.data.source = 'digits'
  c.data.digits.num_digits = (1, 3)
  c.data.augment.scale = (0.8, 1.0)

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=2))
  c.eval = ml_collections.ConfigDict(dict(every_steps=0, at_end=True, detection=detection.default_config()))

  if variant == 'digits_text':
    del c.tasks['vild_image']
  elif variant == 'tiny':
    c.batch_size = 8
    c.total_steps = 4
    c.log_every_steps = 1
    c.checkpoint.every_steps = 2
    c.optim.warmup_steps = 1
    c.model = vild.get('tiny')
    c.model.head.image_head = True
    c.init.workdir = ''
    c.teacher.model = zoo.get('tiny')  # 32 px ViT: random weights, the plumbing only
    c.teacher.model.text.context_length = 16
    c.teacher.workdir = ''
    c.tasks.vild_image.crop_scales = (1.0, 1.5)
    c.data.digits.num_train = 256
    c.eval.detection.num_images = 16
    c.eval.detection.batch_size = 8
  elif variant == 'vit_b16':
    c.model = vild.get('ViT-B/16')
    c.model.head.image_head = True
    c.init.workdir = ''
    c.init.open_clip = ''   # e.g. ViT-B-16.pt
    c.teacher.model = zoo.get('ViT-B/16')
    c.teacher.workdir = ''
    c.teacher.open_clip = ''
    c.tasks.vild_image.crop_scales = (1.0, 1.5)  # ViLD's crops of natural images
    c.batch_size = 64
    c.total_steps = 90_000
    c.data.loader = 'tfdata'
    c.data.source = 'tfds'
    c.data.tfds_name = 'coco/2017'
    c.data.eval_split = 'validation'
    c.data.caption_key = ''  # detection data (clip_jax.data.tfds_dense)
    c.data.boxes_key, c.data.labels_key, c.data.max_objects = 'objects/bbox', 'objects/label', 100
    c.classes = classes.default_config()  # set the 80 COCO names (label id order) and the base train_ids
    c.eval.detection.num_images = 0  # the digits evaluation does not apply
  return c
