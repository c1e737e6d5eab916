"""Evaluation: retrieval recall, the digits evaluation, and the zero-shot CLI on an image folder."""

import numpy as np
import pytest
from PIL import Image

from clip_jax import checkpoint, models
from clip_jax.data import digits
from clip_jax.evaluate import __main__ as cli
from clip_jax.evaluate import digits as digits_eval
from clip_jax.evaluate import embed, retrieval, zeroshot
from clip_jax.train import trainer
from trainer_helpers import tiny_config


def test_recall_at_k_against_brute_force():
  rng = np.random.default_rng(0)
  img = rng.standard_normal((30, 8))
  txt = img + 0.9 * rng.standard_normal((30, 8))
  got = retrieval.recall_at_k(img, txt, ks=(1, 5))
  sim = img @ txt.T
  for k in (1, 5):
    i2t = np.mean([i in np.argsort(-sim[i])[:k] for i in range(30)])
    t2i = np.mean([t in np.argsort(-sim[:, t])[:k] for t in range(30)])
    assert got[f'i2t_R{k}'] == pytest.approx(i2t)
    assert got[f't2i_R{k}'] == pytest.approx(t2i)
  assert 0 < got['i2t_R1'] < got['i2t_R5'] <= 1


def test_recall_with_several_captions_per_image():
  img = np.eye(3)
  txt = np.array([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0, 0, 1]], float)
  got = retrieval.recall_at_k(img, txt, ks=(1,), image_ids_of_texts=np.array([0, 1, 0, 2]))
  assert got == {'i2t_R1': 1.0, 't2i_R1': 1.0}
  with pytest.raises(ValueError, match='pass image_ids_of_texts'):
    retrieval.recall_at_k(img, txt)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  trainer.train(tiny_config(total_steps=2), str(workdir), progress=False)
  return workdir


def test_zeroshot_cli_on_an_image_folder(tiny_run, tmp_path, capsys):
  source = digits.DigitsSource('test', num_examples=12, seed=3, num_digits=(1, 1))
  for i in range(len(source)):
    example = source[i]
    folder = tmp_path / digits.DIGIT_NAMES[example['labels'][0]]
    folder.mkdir(exist_ok=True)
    Image.fromarray(example['image']).save(folder / f'{i}.png')
  (tmp_path / 'seven').mkdir(exist_ok=True)
  (tmp_path / 'seven' / 'broken.png').write_bytes(b'not a png')
  assert cli.main(['zeroshot', '--workdir', str(tiny_run), '--images', str(tmp_path),
                   '--templates', 'a photo of a {}.', 'a drawing of a {}.']) == 0
  out = capsys.readouterr().out
  assert 'skipped 1 unreadable image(s)' in out

  # The printed accuracy is what the API gives on the same images.
  config, variables = checkpoint.load(str(tiny_run))
  model = models.build(config.model)
  classes = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
  images, labels = [], []
  for label, name in enumerate(classes):
    for file in sorted((tmp_path / name).glob('*.png')):
      if file.name != 'broken.png':
        images.append(np.asarray(Image.open(file)))
        labels.append(label)
  feats = embed.image_features(model, variables, np.stack(images))
  classifier = zeroshot.build_classifier(zeroshot.text_encoder(model, variables), classes,
                                         ['a photo of a {}.', 'a drawing of a {}.'], context_length=24)
  topk, _ = zeroshot.predict(feats, classifier, k=5)
  top1 = zeroshot.accuracy(topk, np.array(labels), ks=(1,))['top1']
  assert f'top1: {top1:.4f}' in out


def test_zeroshot_cli_errors(tiny_run, tmp_path, capsys):
  assert cli.main(['zeroshot', '--workdir', str(tiny_run), '--images', str(tmp_path / 'none')]) == 2
  assert 'is not a directory' in capsys.readouterr().err
  assert cli.main(['zeroshot', '--workdir', str(tmp_path), '--images', str(tmp_path)]) == 2
  assert 'no checkpoint in' in capsys.readouterr().err
  (tmp_path / 'cat').mkdir()
  assert cli.main(['zeroshot', '--workdir', str(tiny_run), '--images', str(tmp_path),
                   '--templates', 'no placeholder']) == 2
  assert '{}' in capsys.readouterr().err


def test_digits_evaluation_reports_every_metric(tiny_run):
  config, variables = checkpoint.load(str(tiny_run))
  config.eval.num_zeroshot, config.eval.num_retrieval = 20, 20
  results = digits_eval.evaluate(models.build(config.model), variables, config)
  assert set(results) == {'zeroshot_top1', 'zeroshot_top5', 'i2t_R1', 't2i_R1', 'i2t_R5', 't2i_R5',
                          'i2t_R10', 't2i_R10'}
  assert all(0.0 <= v <= 1.0 for v in results.values())
  assert results['zeroshot_top5'] >= results['zeroshot_top1']


def test_repeated_evaluation_compiles_once(tiny_run):
  config, variables = checkpoint.load(str(tiny_run))
  config.eval.num_zeroshot, config.eval.num_retrieval = 20, 20
  model = models.build(config.model)
  compiled = lambda: (embed.jitted(model, 'encode_image', None, uint8_images=True, normalize=True)._cache_size(),  # pylint: disable=protected-access
                      embed.jitted(model, 'encode_text', None)._cache_size())  # pylint: disable=protected-access
  digits_eval.evaluate(model, variables, config)
  first = compiled()
  digits_eval.evaluate(models.build(config.model), variables, config)  # an equal module: same cache entries
  assert compiled() == first and first[0] == 1
