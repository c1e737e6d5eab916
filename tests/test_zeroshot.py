"""Zero-shot classifier, prediction and accuracy against hand and numpy computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.data import tokenizer
from clip_jax.evaluate import zeroshot

EMBED_DIM = 16
TABLE = np.random.default_rng(0).normal(size=(tokenizer.VOCAB_SIZE, EMBED_DIM)).astype(np.float32)
CLASSNAMES = ['tench', 'goldfish', 'great white shark', 'crème brûlée', '東京タワー', 'dog', 'cat']
TEMPLATES = ['a photo of a {}.', 'a bad photo of the {}.', 'itap of a {}.', '{}', 'art of the {{curly}} {}.']


def fake_encode_text(tokens):
  """Deterministic text 'tower': sum of fixed random embeddings of the tokens."""
  return jnp.asarray(TABLE)[tokens].sum(axis=1)


def numpy_classifier(classnames, templates):
  """CLIP's recipe written out plainly in float64, one class at a time."""
  table = TABLE.astype(np.float64)
  columns = []
  for name in classnames:
    emb = table[tokenizer.tokenize([t.format(name) for t in templates])].sum(axis=1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.mean(axis=0)
    columns.append(mean / np.linalg.norm(mean))
  return np.stack(columns, axis=1)


@pytest.mark.parametrize('batch_size', [4, 7, 1000])
def test_build_classifier_matches_numpy(batch_size):
  shapes = []

  def encode(tokens):
    shapes.append(tokens.shape)
    return fake_encode_text(tokens)

  weights = zeroshot.build_classifier(encode, CLASSNAMES, TEMPLATES, batch_size=batch_size)
  assert weights.shape == (EMBED_DIM, len(CLASSNAMES)) and weights.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(weights), numpy_classifier(CLASSNAMES, TEMPLATES), rtol=0, atol=1e-6)
  # 35 prompts: every call has the same shape (the last batch is padded).
  assert len(set(shapes)) == 1
  assert shapes[0] == (min(batch_size, 35), 77)
  assert len(shapes) == -(-35 // min(batch_size, 35))


def test_build_classifier_context_length_and_single_template():
  weights = zeroshot.build_classifier(fake_encode_text, ['dog', 'cat'], ['a {}'], context_length=8)
  table = TABLE.astype(np.float64)
  expected = table[tokenizer.tokenize(['a dog', 'a cat'], context_length=8)].sum(axis=1)
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(weights), expected.T, rtol=0, atol=1e-6)


def test_text_encoder_from_flax_model():

  class TinyText(nn.Module):
    """Stands in for the CLIP model: only the encode_text method is used."""

    def setup(self):
      self.embed = nn.Embed(tokenizer.VOCAB_SIZE, EMBED_DIM)

    def __call__(self, tokens):
      return self.encode_text(tokens)

    def encode_text(self, tokens):
      return self.embed(tokens).sum(axis=1)

  model = TinyText()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
  weights = zeroshot.build_classifier(zeroshot.text_encoder(model, variables), CLASSNAMES, TEMPLATES, batch_size=8)
  table = np.asarray(variables['params']['embed']['embedding'], np.float64)
  features = table[tokenizer.tokenize([t.format(c) for c in CLASSNAMES for t in TEMPLATES])].sum(axis=1)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  expected = features.reshape(len(CLASSNAMES), len(TEMPLATES), EMBED_DIM).mean(axis=1)
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(weights), expected.T, rtol=0, atol=1e-6)


def test_predict_and_accuracy_hand_computed():
  classifier = jnp.eye(3)  # class c is the unit vector e_c
  features = jnp.array([[3.0, 4.0, 0.0],    # normalised (0.6, 0.8, 0) -> logits (60, 80, 0)
                        [0.0, -1.0, 2.0],   # / sqrt(5) -> (0, -44.72, 89.44)
                        [5.0, 0.0, 1.0]])   # / sqrt(26) -> (98.06, 0, 19.61)
  top, logits = zeroshot.predict(features, classifier, k=2)
  np.testing.assert_array_equal(np.asarray(top), [[1, 0], [2, 0], [0, 2]])
  np.testing.assert_allclose(np.asarray(logits[0]), [60.0, 80.0, 0.0], atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits[1]), [0.0, -100 / 5 ** 0.5, 200 / 5 ** 0.5], atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits[2]), [500 / 26 ** 0.5, 0.0, 100 / 26 ** 0.5], atol=1e-4)

  labels = np.array([1, 0, 1])
  # top1: row 0 right, rows 1-2 wrong; top2: row 1's label 0 is second.
  assert zeroshot.accuracy(top, labels, ks=(1, 2)) == pytest.approx({'top1': 1 / 3, 'top2': 2 / 3})
  assert zeroshot.count_correct(top, labels, ks=(1, 2)) == {'top1': 1, 'top2': 2}


def test_assets():
  names = zeroshot.load_imagenet_classnames()
  templates = zeroshot.load_templates()
  assert len(names) == 1000 and len(templates) == 80
  assert names[0] == 'tench' and names[999] == 'toilet paper'
  assert templates[0] == 'a bad photo of a {}.'
  assert all(t.count('{}') == 1 for t in templates)
  zeroshot.check_templates(templates)
  metadata = pytest.importorskip('open_clip.zero_shot_metadata')
  assert names == list(metadata.IMAGENET_CLASSNAMES)
  assert templates == [t('{}') for t in metadata.OPENAI_IMAGENET_TEMPLATES]


def test_errors():
  with pytest.raises(ValueError, match=r"templates\[1\] 'a photo' must contain exactly one"):
    zeroshot.build_classifier(fake_encode_text, ['dog'], ['a {}', 'a photo'])
  with pytest.raises(ValueError, match='exactly one'):
    zeroshot.build_classifier(fake_encode_text, ['dog'], ['{} and {}'])
  with pytest.raises(ValueError, match='not a valid format string'):
    zeroshot.build_classifier(fake_encode_text, ['dog'], ['a {'])
  with pytest.raises(ValueError, match='non-empty sequence'):
    zeroshot.build_classifier(fake_encode_text, ['dog'], [])
  with pytest.raises(ValueError, match='classnames must be a non-empty'):
    zeroshot.build_classifier(fake_encode_text, [], TEMPLATES)
  with pytest.raises(ValueError, match='classnames must be a non-empty'):
    zeroshot.build_classifier(fake_encode_text, 'dog', TEMPLATES)
  with pytest.raises(ValueError, match=r'features \[2, D\]'):
    zeroshot.build_classifier(lambda t: jnp.zeros((1, 4)), ['dog', 'cat'], ['{}'])
  with pytest.raises(ValueError, match='unknown template set'):
    zeroshot.load_templates('nope')
  with pytest.raises(ValueError, match='k must be in'):
    zeroshot.predict(jnp.ones((2, 3)), jnp.eye(3), k=4)
  with pytest.raises(ValueError, match='embedding dimension'):
    zeroshot.predict(jnp.ones((2, 4)), jnp.eye(3), k=1)
  with pytest.raises(ValueError, match='empty'):
    zeroshot.accuracy(np.zeros((0, 5), int), np.zeros((0,), int))
  with pytest.raises(ValueError, match='k=5 needs'):
    zeroshot.accuracy(np.zeros((2, 1), int), np.zeros((2,), int))
  with pytest.raises(ValueError, match='labels'):
    zeroshot.accuracy(np.zeros((2, 5), int), np.zeros((3,), int))
