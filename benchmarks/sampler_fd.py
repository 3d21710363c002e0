"""Fréchet distance against the number of velocity evaluations, for every sampler.

  python -m benchmarks.sampler_fd --config=configs/fmnist_sit.py --workdir=runs/fmnist_sit \
      --num_samples=2000

Restores the latest checkpoint of the run (EMA weights), draws the same noise and the same
class-balanced labels for every sampler setting, and scores the samples with the domain
classifier (FD, conditional accuracy, precision/recall). Prints a Markdown table and writes
sampler_fd.json into the workdir. The classifier must exist (--mode=train_classifier).
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from pafm_jax import checkpointing, sampling
from pafm_jax.evaluation import runner

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'A trained run.')
flags.DEFINE_integer('num_samples', 2000, 'Samples per sampler setting.')
flags.DEFINE_list('only', [], 'Run only the settings whose label starts with one of these.')
flags.mark_flags_as_required(['config', 'workdir'])

# (label, SamplerOptions fields). StableVS keeps the base grid's points with t ≥ 0.85 and
# crosses t < 0.85 in 9 steps.
SETTINGS = (
    [(f'euler {n}', dict(method='euler', num_steps=n)) for n in (8, 12, 16, 20, 32, 64)]
    + [(f'heun {n}', dict(method='heun', num_steps=n)) for n in (4, 8, 16, 32)]
    + [('dopri5 rtol 1e-2', dict(method='dopri5', rtol=1e-2, atol=1e-3)),
       ('dopri5 rtol 1e-3', dict(method='dopri5', rtol=1e-3, atol=1e-6))]
    + [(f'stablevs {n}', dict(method='stablevs', num_steps=n)) for n in (16, 32, 64)]
    + [('sde 32', dict(method='sde', num_steps=32))]
)
# A flow-map run (config.objective.name='flow_map') also jumps in k steps; its diagonal is a
# velocity, so the ODE samplers above run on it too.
FLOW_MAP_SETTINGS = [(f'flow_map {k}', dict(method='flow_map', num_steps=k)) for k in (1, 2, 4, 8)]


def main(argv):
  del argv
  config = FLAGS.config
  mesh, net, params, step = runner.restore_sampling_params(config, FLAGS.workdir)
  extractor = runner.create_feature_extractor(config)
  reference = runner.reference_statistics(config, extractor)
  rng = jax.random.fold_in(jax.random.key(config.seed), 0xFD)
  rows = []
  settings = SETTINGS
  if config.objective.name == 'flow_map':
    settings = FLOW_MAP_SETTINGS + SETTINGS
  for label, fields in settings:
    if FLAGS.only and not any(label.startswith(p) for p in FLAGS.only):
      continue
    options = sampling.SamplerOptions.from_config(config.sample, **fields)
    generate = runner.make_generator(config, net, mesh, options)
    t0 = time.time()
    images, labels, nfe = generate(params, rng, FLAGS.num_samples)
    seconds = time.time() - t0
    metrics = runner.compute_metrics(config, images, labels, extractor, reference, None)
    rows.append({'sampler': label, 'nfe': nfe, 'seconds': round(seconds, 1), **metrics,
                 'options': dataclasses.asdict(options)})
    logging.info('%s: %s', label, rows[-1])
    print(f'{label}: NFE {nfe:.1f}, FD {metrics["fd"]:.3f}, accuracy {metrics["accuracy"]:.3f},'
          f' {seconds:.0f} s', flush=True)

  print(f'\nstep {step}, {FLAGS.num_samples} samples per row, CFG {config.sample.cfg_scale} '
        f'on t ∈ {tuple(config.sample.guidance_interval)}, features {extractor.fingerprint}\n')
  print('| sampler | NFE | FD | accuracy | precision | recall | seconds |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["sampler"]} | {r["nfe"]:.1f} | {r["fd"]:.2f} | {r["accuracy"]:.3f} | '
          f'{r["precision"]:.3f} | {r["recall"]:.3f} | {r["seconds"]:.0f} |')
  out = checkpointing.workdir_path(FLAGS.workdir) / 'sampler_fd.json'
  out.write_text(json.dumps({'step': step, 'num_samples': FLAGS.num_samples,
                             'features': extractor.fingerprint, 'rows': rows}, indent=2))


if __name__ == '__main__':
  app.run(main)
