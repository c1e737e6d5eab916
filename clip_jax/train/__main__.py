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
flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                  'Multi-process setup: auto = explicit coordinator if given, else JAX cluster detection '
                  '(SLURM / TPU pod variables), else one process; on = require JAX cluster detection; off = one process.')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 (env CLIP_JAX_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run (env CLIP_JAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (env CLIP_JAX_PROCESS_ID).')
flags.DEFINE_integer('init_timeout', 300, 'Seconds to wait for the other processes / the coordinator.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Our own messages at INFO; library chatter (orbax, jax backend probing) only from WARNING up.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger('clip_jax').setLevel(logging.INFO)
  from clip_jax import distributed  # pylint: disable=g-import-not-at-top
  from clip_jax.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    spec = distributed.resolve(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
    distributed.initialize(spec, FLAGS.init_timeout)  # before anything touches a device
    distributed.check_same_config(FLAGS.config)
    results = trainer.train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
  except (ValueError, trainer.TrainingError, distributed.DistributedError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'final: step={results["step"]}, loss={float(results.get("loss", float("nan"))):.4f}', flush=True)
  for key in sorted(results):
    if any(tag in key for tag in ('zeroshot', '_R', 'iou')):
      print(f'{key}: {results[key]:.4f}', flush=True)


if __name__ == '__main__':
  app.run(main)
