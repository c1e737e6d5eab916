"""GroupViT trained from captions alone on the embedded digits scenes; zero-shot segmentation.

  python -m clip_jax.train --config configs/clip_digits.py --workdir runs/digits
  python -m clip_jax.train --config configs/groupvit.py:digits --workdir runs/groupvit
  python -m clip_jax.train --config configs/groupvit.py:clip_baseline --workdir runs/groupvit_clip
  python -m clip_jax.evaluate segment --workdir runs/groupvit --baseline runs/groupvit_clip

The objective is GroupViT's, image-caption contrastive plus the multi-label
contrastive loss over the caption's nouns ("a photo of a seven."), with a
third term in the same step: the image and text embeddings are pulled toward
the main job's CLIP (config.teacher, runs/digits; clip_jax.tasks.distill).
Two training choices keep the grouping from collapsing in a run this short
(every patch in one group, so one segment per image): the assignment takes
the noise-free argmax (model.vision.gumbel=False; NVlabs' option, with the
same straight-through gradients; inference is unchanged) and a fourth term,
config.tasks.group_balance, penalises a stage whose tokens pile into few
groups (clip_jax.losses.grouping). Neither reads a label.
Captions alone teach a ViT these digits slowly: a GroupViT trained without the
teacher was at chance zero-shot at step 300 and its segments scored 0.003
digit mIoU at step 500. The teacher also learned from captions only,
so no masks are used anywhere; the segment command scores held-out
multi-digit canvases (test-split scans) against their masks and prints the
all-background and CLIP patch-similarity baselines beside it. Figures: the
README's GroupViT section.

Variants:
  digits          (default) the GroupViT run
  clip_baseline   a CLIP ViT of the same width, depth and patch grid, trained the same way (the
                  multi-label task shares CLIP's temperature)
  tiny            a few steps of a tiny GroupViT (tests, smoke runs)
"""

import ml_collections

from clip_jax.data import pipeline
from clip_jax.evaluate import digits as digits_eval
from clip_jax.evaluate import segmentation
from clip_jax.models import groupvit_zoo, zoo
from clip_jax.train import optim

# The canvases' 64 px (the teacher's input) with 8 px patches: an 8 x 8 grid.
_IMAGE = 64
_PATCH = 8
_WIDTH = 64
_HEADS = 4
_CONTEXT = 24  # captions are <= 16 tokens


def _text():
  return dict(width=_WIDTH, layers=2, heads=_HEADS, context_length=_CONTEXT)


def groupvit_model() -> ml_collections.ConfigDict:
  # 64 patches -> 8 segments, then a plain stage over the 8: room for up to three digits and
  # the background.
  vision = groupvit_zoo.groupvit_vision(_IMAGE, _PATCH, _WIDTH, _HEADS, depths=(3, 2),
                                        num_group_tokens=(8, 0), num_output_groups=(8, 8), gumbel=False)
  return groupvit_zoo.groupvit_config(128, vision, groupvit_zoo.groupvit_text(**_text()),
                                      projection_mlp_dim=256)


def clip_model() -> ml_collections.ConfigDict:
  # As many transformer blocks as GroupViT's stages, the same width and patch grid.
  return zoo.clip_config(embed_dim=128, vision=zoo.vit_vision(_IMAGE, _PATCH, _WIDTH, 5, _HEADS),
                         text=zoo.text_tower(**_text()), act='quick_gelu')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  variant = arg or 'digits'
  if variant not in ('digits', 'clip_baseline', 'tiny'):
    raise ValueError(f"configs/groupvit.py:{arg}: unknown variant; use 'digits', 'clip_baseline' or 'tiny'")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64
  c.total_steps = 3000
  c.log_every_steps = 100
  c.max_bad_steps = 20
  c.tensorboard = True

  c.model = clip_model() if variant == 'clip_baseline' else groupvit_model()

  c.tasks = ml_collections.ConfigDict()
  c.tasks.contrastive = dict(weight=1.0, loss='softmax')
  c.tasks.multi_label = dict(weight=1.0)
  c.tasks.feature_distill = dict(weight=1.0, text=True)
  if variant == 'digits':
    # Not in `tiny`: there the 8-device and single-device losses part by 2.8e-4 by step 10 with it
    # (measured; the hard-assignment shares it reads flip with rounding); the term has its own tests.
    c.tasks.group_balance = dict(weight=0.2)
  c.teacher = ml_collections.ConfigDict(dict(model=None, workdir='runs/digits', open_clip='', step=None))

  c.optim = optim.default_config()
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.05

  c.data = pipeline.default_data_config()
  c.data.loader = 'grain'
  c.data.source = 'digits'
  c.data.digits.num_digits = (1, 3)
  # Half the captions without colours, so that colour alone cannot solve the image-caption task.
  c.data.digits.drop_color_prob = 0.5
  c.data.augment.scale = (0.8, 1.0)
  c.data.prompts.max_prompts = 3     # up to three digits per scene
  c.data.prompts.vocabulary = 'digits'

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2))
  c.eval = digits_eval.default_config()
  c.eval.num_retrieval = 0
  c.eval.segmentation = segmentation.default_config()

  if variant == 'tiny':
    c.batch_size = 16
    c.total_steps = 4
    c.log_every_steps = 1
    c.checkpoint.every_steps = 2
    c.optim.warmup_steps = 1
    c.model = groupvit_zoo.get('tiny')
    del c.tasks.feature_distill
    del c.teacher
    c.model.text.context_length = _CONTEXT
    c.data.digits.num_train = 512
    c.eval.num_zeroshot = 40
    c.eval.segmentation.num_images = 16
    c.eval.segmentation.batch_size = 16
  return c
