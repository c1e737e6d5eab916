"""Zero-shot classification: a text classifier from class names x prompts.

CLIP's recipe: for each class, fill every prompt template with the class
name, embed the prompts with the text tower, L2-normalise each embedding,
average over templates and L2-normalise again. The classifier is the [D, C]
matrix of those class embeddings; an image's logits are
100 * normalise(image_features) @ classifier.

`encode_text` is any callable from int32 tokens [N, L] to unnormalised text
features [N, D]; `text_encoder(model, variables)` builds one from a clip_jax
model (`model.apply(variables, tokens, method=model.encode_text)`).
"""

import importlib.resources
import json
import string
from typing import Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.data import tokenizer
from clip_jax.evaluate import embed

LOGIT_SCALE = 100.0  # CLIP's trained temperature is clamped at 100; zero-shot uses it as is


def _read_asset(name: str):
  return json.loads(importlib.resources.files('clip_jax').joinpath('assets', name).read_text('utf-8'))


def load_imagenet_classnames() -> list:
  """The 1000 ImageNet class names in label order (OpenAI's cleaned names)."""
  return _read_asset('imagenet_classnames.json')


def load_templates(name: str = 'openai') -> list:
  """Prompt templates: format strings with one '{}' for the class name.

  'openai' is the 80-template ImageNet ensemble from the CLIP paper. Further
  sets are picked up from clip_jax/assets/<name>_templates.json.
  """
  path = importlib.resources.files('clip_jax').joinpath('assets', f'{name}_templates.json')
  if not path.is_file():
    available = sorted(p.name[:-len('_templates.json')]
                       for p in importlib.resources.files('clip_jax').joinpath('assets').iterdir()
                       if p.name.endswith('_templates.json'))
    raise ValueError(f'unknown template set {name!r}; available: {available}')
  return json.loads(path.read_text('utf-8'))


def check_templates(templates: Sequence[str]) -> None:
  if isinstance(templates, str) or not templates:
    raise ValueError('templates must be a non-empty sequence of format strings such as "a photo of a {}."')
  for i, template in enumerate(templates):
    if not isinstance(template, str):
      raise TypeError(f'templates[{i}] is {type(template).__name__}, expected str')
    # Exactly one replacement field, and it must be the bare '{}' (literal
    # braces are fine when doubled, as format() expects).
    try:
      fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
      raise ValueError(f'templates[{i}] {template!r} is not a valid format string: {e}') from None
    if fields != ['']:
      raise ValueError(f"templates[{i}] {template!r} must contain exactly one '{{}}' for the class name")


def _l2_normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@jax.jit
def _accumulate(sums, features, class_ids):
  """sums[c] += normalised features of every prompt of class c.

  Padding rows carry class id C (out of range) and are dropped.
  """
  return sums.at[class_ids].add(_l2_normalize(features.astype(jnp.float32)), mode='drop')


def build_classifier(encode_text: Callable, classnames: Sequence[str], templates: Sequence[str],
                     context_length: int = tokenizer.DEFAULT_CONTEXT_LENGTH,
                     batch_size: int = 256) -> jnp.ndarray:
  """Zero-shot classifier weights, float32 [embed_dim, num_classes].

  Prompts are embedded batch_size at a time; only one batch of features and
  the [C, D] running sums are alive at once. Every call to encode_text sees
  the same batch shape (the last batch is padded), so a jitted encoder
  compiles once.
  """
  if isinstance(classnames, str) or not classnames:
    raise ValueError('classnames must be a non-empty sequence of strings')
  check_templates(templates)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  num_classes, num_templates = len(classnames), len(templates)
  prompts = [t.format(c) for c in classnames for t in templates]  # class-major: row // T is the class
  tokens = tokenizer.tokenize(prompts, context_length)
  batch = min(batch_size, len(prompts))

  sums = None
  for start in range(0, len(prompts), batch):
    chunk = tokens[start:start + batch]
    class_ids = np.arange(start, start + len(chunk)) // num_templates
    if len(chunk) < batch:
      pad = batch - len(chunk)
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
      class_ids = np.concatenate([class_ids, np.full(pad, num_classes)])
    features = encode_text(chunk)
    if features.ndim != 2 or features.shape[0] != batch:
      raise ValueError(f'encode_text must map tokens [{batch}, {context_length}] to features '
                       f'[{batch}, D], got shape {features.shape}')
    if sums is None:
      sums = jnp.zeros((num_classes, features.shape[1]), jnp.float32)
    sums = _accumulate(sums, features, jnp.asarray(class_ids, jnp.int32))
  return _l2_normalize(sums / num_templates).T


def text_encoder(model, variables) -> Callable:
  """encode_text for build_classifier from a clip_jax model and its variables (jitted once per
  model; host numpy in and out, on any mesh and any number of processes)."""
  return embed.encoder(model, variables, 'encode_text')


def predict(image_features, classifier, k: int = 5) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """(top-k class indices [N, k], best first; logits [N, C])."""
  num_classes = classifier.shape[-1]
  if not 1 <= k <= num_classes:
    raise ValueError(f'k must be in [1, {num_classes}] (the number of classes), got {k}')
  if image_features.shape[-1] != classifier.shape[0]:
    raise ValueError(f'image_features {image_features.shape} and classifier {classifier.shape} '
                     'disagree on the embedding dimension')
  logits = LOGIT_SCALE * _l2_normalize(jnp.asarray(image_features, jnp.float32)) @ classifier
  _, indices = jax.lax.top_k(logits, k)
  return indices, logits


def count_correct(topk_indices, labels, ks: Sequence[int] = (1, 5)) -> Dict[str, int]:
  """Number of rows whose label is among the first k predictions, per k.

  Counts (not fractions) so that batches can be summed before dividing.
  """
  topk_indices = np.asarray(topk_indices)
  labels = np.asarray(labels)
  if topk_indices.ndim != 2 or labels.shape != topk_indices.shape[:1]:
    raise ValueError(f'expected topk_indices [N, k] and labels [N], got {topk_indices.shape} and {labels.shape}')
  for k in ks:
    if not 1 <= k <= topk_indices.shape[1]:
      raise ValueError(f'k={k} needs at least k predictions per row; topk_indices has {topk_indices.shape[1]}')
  hits = topk_indices == labels[:, None]
  return {f'top{k}': int(hits[:, :k].any(axis=1).sum()) for k in ks}


def accuracy(topk_indices, labels, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
  """Top-k accuracy per k, as fractions in [0, 1]: {'top1': ..., 'top5': ...}."""
  counts = count_correct(topk_indices, labels, ks)
  n = len(labels)
  if n == 0:
    raise ValueError('accuracy of an empty batch is undefined')
  return {name: count / n for name, count in counts.items()}
