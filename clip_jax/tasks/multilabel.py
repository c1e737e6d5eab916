"""GroupViT's multi-label contrastive objective, and the forward that feeds it.

`config.tasks.multi_label` pairs each image with prompts made from its
caption's nouns (`config.data.prompts`; the batch fields prompt_tokens /
prompt_valid) and adds clip_jax.losses.multilabel's loss. GroupViT trains on
it next to the image-caption contrastive task, both over one forward:

  config.tasks.contrastive = dict(weight=1.0, loss='softmax')
  config.tasks.multi_label = dict(weight=1.0)
  config.data.prompts.max_prompts = 3

The forward encodes each caption together with its K prompts in one
text-tower call ([B, 1 + K] rows): GroupViT's projection heads use
BatchNorm, and NVlabs normalises captions and prompts as one batch.
"""

import dataclasses

import jax.numpy as jnp

from clip_jax.data import prompts as prompts_lib
from clip_jax.data import transforms
from clip_jax.losses import grouping, multilabel
from clip_jax.tasks.base import Task, mutable_collections


def _captions_and_prompts(tokens, prompt_tokens):
  """[B, L] + [B, K, L] -> [B * (1 + K), L], each caption followed by its prompts."""
  b, k, length = prompt_tokens.shape
  return jnp.concatenate([tokens[:, None], prompt_tokens], axis=1).reshape(b * (1 + k), length)


def _groupvit_outputs(module, images, tokens, prompt_tokens, train):
  image, aux = module.encode_image(images, train=train, normalize=True, return_attentions=True)
  # config.tasks.group_balance's loss, and the share of the tokens in the largest group (a collapse
  # shows as 1), each averaged over the grouping stages.
  maps = list(zip(aux['soft'], aux['hard']))
  mean = lambda xs: sum(xs) / len(xs) if xs else jnp.zeros((), jnp.float32)
  out = dict(image_features=image, logit_scale=module.scale(),
             group_balance=mean([grouping.load_balance(soft, hard) for soft, hard in maps]),
             largest_group=mean([grouping.largest_group_share(hard) for _, hard in maps]))
  if prompt_tokens is None:
    out['text_features'] = module.encode_text(tokens, train=train, normalize=True)
    return out
  b, k, _ = prompt_tokens.shape
  text = module.encode_text(_captions_and_prompts(tokens, prompt_tokens), train=train, normalize=True)
  text = text.reshape(b, 1 + k, -1)
  out.update(text_features=text[:, 0], prompt_features=text[:, 1:],
             multi_label_logit_scale=module.multi_label_scale())
  return out


def groupvit_forward(model, variables, batch, *, train: bool, rngs: dict):
  """GroupViT on uint8 images (normalised here, on device), captions and, when the batch has them, prompts.

  Training samples the grouping's Gumbel noise from the step's 'gumbel' stream and updates the
  projection heads' BatchNorm statistics.
  """
  images = transforms.normalize(batch['image'])
  args = (images, batch['tokens'], batch.get('prompt_tokens'), train)
  if not train:
    return model.apply(variables, *args, method=_groupvit_outputs), {}
  return model.apply(variables, *args, method=_groupvit_outputs, rngs={'gumbel': rngs['gumbel']},
                     mutable=['batch_stats'])


def _clip_outputs(module, images, tokens, prompt_tokens, train):
  image = module.encode_image(images, train=train, normalize=True)
  out = dict(zip(('logit_scale', 'logit_bias'), module.scale_and_bias()), image_features=image)
  if prompt_tokens is None:
    out['text_features'] = module.encode_text(tokens, normalize=True)
    return out
  b, k, _ = prompt_tokens.shape
  text = module.encode_text(_captions_and_prompts(tokens, prompt_tokens), normalize=True).reshape(b, 1 + k, -1)
  out.update(text_features=text[:, 0], prompt_features=text[:, 1:])
  return out


def clip_prompts_forward(model, variables, batch, *, train: bool, rngs: dict):
  """CLIP with the prompts encoded too (the multi-label task on a CLIP model, e.g. GroupViT's baseline)."""
  del rngs  # no dropout in the CLIP towers
  images = transforms.normalize(batch['image'])
  args = (images, batch['tokens'], batch.get('prompt_tokens'), train)
  mutable = mutable_collections(variables, train)
  if mutable:
    return model.apply(variables, *args, method=_clip_outputs, mutable=mutable)
  return model.apply(variables, *args, method=_clip_outputs), {}


@dataclasses.dataclass(frozen=True)
class MultiLabelTask(Task):
  """`config.tasks.multi_label`: GroupViT's multi-label contrastive loss (clip_jax.losses.multilabel).

  The temperature is the model's `multi_label_logit_scale` (GroupViT); a model without one (CLIP)
  shares its image-text `logit_scale`, NVlabs' `share_temperature` option. Evaluation: zero-shot
  segmentation mIoU of held-out digits canvases when config.eval.segmentation.num_images > 0
  (clip_jax.evaluate.segmentation).
  """
  name: str = 'multi_label'
  batch_keys = ('prompt_tokens', 'prompt_valid')

  def check(self, config):
    if prompts_lib.settings(config.data) is None:
      raise ValueError('config.tasks.multi_label needs the caption nouns as prompts in the batch: set '
                       'config.data.prompts.max_prompts (e.g. 3) and config.data.prompts.vocabulary')

  def loss(self, outputs, batch):
    if 'prompt_features' not in outputs:
      raise ValueError('tasks.multi_label: the model forward returned no prompt_features (is '
                       'config.data.prompts.max_prompts > 0?)')
    scale = outputs.get('multi_label_logit_scale', outputs['logit_scale'])
    loss = multilabel.multi_label_loss(outputs['image_features'], outputs['prompt_features'],
                                       batch['prompt_valid'], scale)
    metrics = {'logit_scale': scale, 'prompts_per_image': batch['prompt_valid'].sum(axis=1).mean()}
    if 'largest_group' in outputs:  # GroupViT: 1 when one group takes every token (a collapsed grouping)
      metrics['largest_group'] = outputs['largest_group']
    return loss, metrics

  def evaluate(self, model, variables, config):
    seg = config.eval.get('segmentation')
    if not seg or not seg.num_images:
      return {}
    from clip_jax.evaluate import segmentation  # pylint: disable=g-import-not-at-top
    return segmentation.evaluate(model, variables, config)


@dataclasses.dataclass(frozen=True)
class GroupBalanceTask(Task):
  """`config.tasks.group_balance`: keeps GroupViT's grouping stages from putting every token in one group.

  The loss is clip_jax.losses.grouping.load_balance averaged over the grouping stages (1 when the
  tokens spread evenly over the groups, G when one group takes them all). A training aid, not part
  of NVlabs' objective; it reads no labels.
  """
  name: str = 'group_balance'

  def check(self, config):
    if config.model.name != 'groupvit':
      raise ValueError(f'config.tasks.group_balance balances GroupViT\'s grouping stages; model.name='
                       f'{config.model.name!r} has none: remove the task or use a GroupViT model')
    if not any(config.model.vision.num_group_tokens):
      raise ValueError('config.tasks.group_balance: model.vision.num_group_tokens has no grouping stage')

  def loss(self, outputs, batch):
    return outputs['group_balance'], {}
