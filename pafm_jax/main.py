"""Entry point: python -m pafm_jax.main --config=configs/fmnist_sit.py --workdir=DIR [--mode=M].

Modes: train (default; resumes by itself), sample (grid PNG + .npz from the latest
checkpoint), eval (metrics of config.eval.num_samples samples → eval.json), train_classifier
(the domain classifier whose features the Fréchet distance uses), build_index (the ScaNN or
exact retrieval index of config.retrieval; training builds a missing one by itself),
train_lit (the image tower of text PAFM's image–text term and of caption alignment scores,
pafm_jax/text/lit.py), train_autoencoder (the small KL autoencoder whose latents a latent model
trains on, pafm_jax/models/autoencoder.py).
"""

import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from pafm_jax import logs, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'train_classifier', 'build_index',
                                    'train_lit', 'train_autoencoder'],
                  'What to do with the config and workdir.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (multi-host TPU pods and GPU clusters). '
                  'On a TPU pod or under SLURM it finds its peers by itself; elsewhere give the '
                  'three flags below (launch/local.sh does).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (with --distributed).')
flags.DEFINE_integer('num_processes', None, 'How many processes the job has (with --distributed).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (with --distributed).')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed(config) -> None:
  """Joins the job's processes; a peer silent for config.fault.heartbeat_timeout_s is declared
  dead, which ends the others too (fault_tolerance.Watchdog covers steps that hang without
  that)."""
  # CPU processes (launch/local.sh, tests) run their collectives over gloo; accelerators use
  # their own, and this setting does not touch them.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                             heartbeat_timeout_seconds=int(config.fault.heartbeat_timeout_s))


def train_or_exit_at_once(config, workdir) -> None:
  """A multi-process run that fails ends its process at once, status 1.

  Its peers may be dead (that is often why it failed), and JAX's exit handler would wait
  for them in a shutdown barrier until the heartbeat timeout. The train loop has already
  waited for its checkpoint saves by then.
  """
  try:
    train.train_and_evaluate(config, workdir)
  except BaseException:  # pylint: disable=broad-except
    logging.exception('process %d: training failed; exiting without waiting for the other '
                      'processes.', jax.process_index())
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_info()
  if FLAGS.distributed:
    initialize_distributed(FLAGS.config)
  if FLAGS.mode == 'train':
    if jax.process_count() > 1:
      train_or_exit_at_once(FLAGS.config, FLAGS.workdir)
    else:
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    return
  if FLAGS.mode == 'build_index':
    from pafm_jax.retrieval import dataset_index  # pylint: disable=g-import-not-at-top
    index = dataset_index.build(FLAGS.config, FLAGS.workdir, overwrite=True)
    meta = index.metadata
    print(f'retrieval index: {meta["num_items"]:,} items, {meta["num_partitions"]} '
          f'partition(s), backend {meta["backend"]}, key {meta["key"]}, built in '
          f'{meta["build_seconds"]} s, peak memory {meta["build_peak_memory_mib"]} MiB → '
          f'{index.directory}', flush=True)
    return
  if FLAGS.mode == 'train_lit':
    from pafm_jax.text import lit  # pylint: disable=g-import-not-at-top
    info = lit.train(FLAGS.config, FLAGS.workdir)
    print(f'LiT image tower: zero-shot test accuracy {info["zero_shot_accuracy"]:.4f}, mean '
          f'image–caption cosine {info["test_alignment"]:.4f} on test, fingerprint '
          f'{info["fingerprint"]} → {FLAGS.workdir}/{lit.SUBDIR} (set config.data.lit_dir='
          f'{FLAGS.workdir})', flush=True)
    return
  if FLAGS.mode == 'train_autoencoder':
    from pafm_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
    autoencoder.run_train_autoencoder(FLAGS.config, FLAGS.workdir)
    return
  from pafm_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  {'sample': runner.run_sample, 'eval': runner.run_eval,
   'train_classifier': runner.run_train_classifier}[FLAGS.mode](FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
