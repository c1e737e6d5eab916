"""Held-out evaluation on the embedded digits test split.

Zero-shot: single-digit canvases made from test scans, classified among the
ten digit words with prompt templates. Retrieval: multi-digit test scenes
against their own captions. Test scans never appear in training scenes.
"""

import functools

import ml_collections
import numpy as np

from clip_jax.data import digits as digits_data
from clip_jax.data import tokenizer
from clip_jax.evaluate import embed, retrieval, zeroshot

# The digit word in each palette colour, phrased as the training captions are; averaging the
# ensemble (CLIP's recipe) gives a colour-invariant digit classifier.
TEMPLATES = tuple(f"a photo of {'an' if c == 'orange' else 'a'} {c} {{}}." for c in digits_data.COLOR_NAMES)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      every_steps=0,          # 0: only at the end
      at_end=True,
      num_zeroshot=1000,      # single-digit test canvases
      num_retrieval=1000,     # multi-digit test scenes
      seed=1234,
      batch_size=256,
  ))


@functools.lru_cache(maxsize=4)
def _test_set(kind: str, n: int, seed: int, canvas_size: int):
  num_digits = (1, 1) if kind == 'zeroshot' else (1, 3)
  source = digits_data.DigitsSource('test', num_examples=n, seed=seed, canvas_size=canvas_size,
                                    num_digits=num_digits)
  examples = [source[i] for i in range(n)]
  images = np.stack([e['image'] for e in examples])
  return images, [e['caption'] for e in examples], np.array([e['labels'][0] for e in examples])


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1] == size:
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC)) for x in images])


def evaluate(model, variables, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Zero-shot top-1/top-5 and retrieval R@1/5/10 on the digits test split."""
  e = config.eval
  canvas = config.data.digits.canvas_size
  size = config.model.vision.image_size
  context = config.model.text.context_length
  results = {}
  if e.num_zeroshot:
    images, _, labels = _test_set('zeroshot', e.num_zeroshot, e.seed, canvas)
    feats = embed.image_features(model, variables, _resize(images, size), e.batch_size)
    classifier = zeroshot.build_classifier(zeroshot.text_encoder(model, variables), digits_data.DIGIT_NAMES,
                                           TEMPLATES, context_length=context, batch_size=e.batch_size)
    topk, _ = zeroshot.predict(feats, classifier, k=5)
    counts = zeroshot.count_correct(topk, labels, ks=(1, 5))
    results.update({f'zeroshot_top{k}': counts[f'top{k}'] / len(labels) for k in (1, 5)})
  if e.num_retrieval:
    images, captions, _ = _test_set('retrieval', e.num_retrieval, e.seed + 1, canvas)
    img = embed.image_features(model, variables, _resize(images, size), e.batch_size)
    txt = embed.text_features(model, variables, tokenizer.tokenize(captions, context), e.batch_size)
    results.update(retrieval.recall_at_k(img, txt))
  return results
