"""python -m clip_jax.train --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]

Trains, or resumes the run already in DIR. Logic lives in clip_jax.train.trainer.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics.jsonl, TensorBoard events.', required=True)
flags.DEFINE_bool('progress', True, 'Show a progress bar on process 0.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).', lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Our own messages at INFO; library chatter (orbax, jax backend probing) only from WARNING up.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger('clip_jax').setLevel(logging.INFO)
  from clip_jax.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    results = trainer.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  except (ValueError, trainer.TrainingError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'final: step={results["step"]}, loss={float(results.get("loss", float("nan"))):.4f}', flush=True)
  for key in sorted(results):
    if any(tag in key for tag in ('zeroshot', '_R')):
      print(f'{key}: {results[key]:.4f}', flush=True)


if __name__ == '__main__':
  app.run(main)
