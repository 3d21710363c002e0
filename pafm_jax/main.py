"""Entry point: python -m pafm_jax.main --config=configs/fmnist_sit.py --workdir=DIR [--mode=M].

Modes: train (default; resumes by itself), sample (grid PNG + .npz from the latest
checkpoint), eval (metrics of config.eval.num_samples samples → eval.json), train_classifier
(the domain classifier whose features the Fréchet distance uses), build_index (the ScaNN or
exact retrieval index of config.retrieval; training builds a missing one by itself),
train_lit (the image tower of text PAFM's image–text term and of caption alignment scores,
pafm_jax/text/lit.py).
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from pafm_jax import logs, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'train_classifier', 'build_index',
                                    'train_lit'],
                  'What to do with the config and workdir.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (multi-host TPU pods and GPU clusters).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_info()
  if FLAGS.distributed:
    jax.distributed.initialize()
  if FLAGS.mode == 'train':
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
  from pafm_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  {'sample': runner.run_sample, 'eval': runner.run_eval,
   'train_classifier': runner.run_train_classifier}[FLAGS.mode](FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
