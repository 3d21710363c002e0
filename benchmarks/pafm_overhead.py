"""What PAFM costs over FM: timed on the default job, counted by XLA at paper scale.

  .venv/bin/python -m benchmarks.pafm_overhead [--rounds=7] [--paper_scale=true]

(a) configs/fmnist_sit.py, same model and global batch, FM against PAFM over the global batch
    plus 16 retrieved neighbours per sample (the neighbours are real same-class Fashion-MNIST
    items fed as batch fields, as the retrieval stage will deliver them). The two compiled
    steps run in alternating rounds in one process; reported: the median step times, their
    ratio, and each step's peak memory from XLA's buffer assignment.
(b) configs/sit_b2.py and configs/sit_xl2.py at their real global batch (256) on 32×32×4
    latents: the same two steps are lowered and compiled from abstract shapes (nothing runs),
    and XLA's cost analysis gives the ratio of their FLOPs and bytes accessed.

The last line printed is the timed ratio of (a). Targets: ≤ 1.05 for (a), ≤ 1.02 for (b).
"""

import resource

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from benchmarks import common
from configs import sit_b2, sit_xl2
from pafm_jax import config_checks, sharding, train, train_state
from pafm_jax.data import pipeline

config_flags.DEFINE_config_file('config', 'configs/fmnist_sit.py', 'Config of the timed part.')
flags.DEFINE_integer('rounds', 7, 'Alternating timing rounds.')
flags.DEFINE_integer('steps_per_round', 10, 'Steps timed per variant and round.')
flags.DEFINE_integer('neighbours', 16, 'Retrieved neighbours per sample in the PAFM step.')
flags.DEFINE_bool('paper_scale', True, 'Also compile SiT-B/2 and SiT-XL/2 for part (b).')
flags.DEFINE_bool('synthetic', False, 'Time on random data of the config\'s shape (for configs '
                  'whose dataset is not on this machine, e.g. configs/sit_b2.py on a GPU).')
FLAGS = flags.FLAGS


def variant(base, objective: str, k: int):
  """FM, or PAFM over the global batch plus k retrieved neighbours; nothing else changes."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.objective.name = objective
    config.objective.pafm.stratified = False
    config.retrieval.mode = 'none'
    config.objective.pafm.sources = 'batch'
    if objective == 'pafm':
      config.objective.pafm.sources = 'batch+retrieved'
      config.retrieval.mode = 'clean'
      config.retrieval.k = k
  return config


def fmnist_batch(config, k: int, seed: int = 0) -> dict:
  """One real global batch with each sample's k neighbours drawn from its own class."""
  images, labels = pipeline.load_arrays(config.data)
  rng = np.random.default_rng(seed)
  ids = rng.choice(len(images), config.global_batch_size, replace=False)
  by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
  nbr = np.stack([rng.choice(by_class[labels[i]], k, replace=False) for i in ids])
  return {'image': images[ids], 'label': labels[ids], 'id': ids.astype(np.int32),
          'neighbours': images[nbr], 'neighbour_labels': labels[nbr],
          'neighbour_ids': nbr.astype(np.int32)}


def synthetic_batch(config, k: int, seed: int = 0) -> dict:
  """A global batch of the config's shape in [−1, 1], neighbours drawn from a pool of 4 096."""
  rng = np.random.default_rng(seed)
  b, s, c = config.global_batch_size, config.data.image_size, config.data.channels
  pool = rng.uniform(-1, 1, (4096, s, s, c)).astype(np.float32)
  pool_labels = rng.integers(0, config.data.num_classes, 4096).astype(np.int32)
  ids = rng.choice(4096, b, replace=False)
  nbr = rng.integers(0, 4096, (b, k))
  return {'image': pool[ids], 'label': pool_labels[ids], 'id': ids.astype(np.int32),
          'neighbours': pool[nbr], 'neighbour_labels': pool_labels[nbr],
          'neighbour_ids': nbr.astype(np.int32)}


def compiled_ratio(base, k: int) -> dict[str, float]:
  """PAFM/FM ratios of FLOPs, bytes accessed and peak memory of the compiled steps."""
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  costs = {}
  for objective in ('fm', 'pafm'):
    config = variant(base, objective, k)
    compiled = train.compile_step(train_state.TrainSetup.create(config, mesh))
    costs[objective] = common.step_cost(config, compiled)
  return {key: costs['pafm'][key] / costs['fm'][key] for key in costs['fm']} | {
      'fm_flops': costs['fm']['flops'], 'fm_bytes': costs['fm']['bytes']}


def main(_):
  base, k = FLAGS.config, FLAGS.neighbours
  mesh = config_checks.validated_mesh(base)
  batch = synthetic_batch(base, k) if FLAGS.synthetic else fmnist_batch(base, k)
  runs = {}
  for objective in ('fm', 'pafm'):
    runs[objective] = common.prepare_run(variant(base, objective, k), mesh, batch)
    print(f'{objective}: compiled; {runs[objective]["flops"] / 1e9:.2f} GFLOP, peak '
          f'{runs[objective]["peak_bytes"] / 2**20:.1f} MiB per step', flush=True)
  common.time_alternating(runs, FLAGS.rounds, FLAGS.steps_per_round)

  if FLAGS.paper_scale:
    print('\n(b) compiled cost at paper scale (lowered from abstract shapes, nothing run)')
    print(f'{"config":<10}{"FM TFLOP":>10}{"FM GB":>8}{"FLOPs":>9}{"bytes":>9}{"peak mem":>10}')
    for module in (sit_b2, sit_xl2):
      config = module.get_config()
      r = compiled_ratio(config, k)
      print(f'{config.model.name:<10}{r["fm_flops"] / 1e12:>10.1f}{r["fm_bytes"] / 1e9:>8.1f}'
            f'{r["flops"]:>8.4f}x{r["bytes"]:>8.4f}x{r["peak_bytes"]:>9.4f}x', flush=True)

  fm_t, pafm_t = common.median_time(runs['fm']), common.median_time(runs['pafm'])
  b = base.global_batch_size
  print(f'\n(a) {base.model.name}, global batch {b}, PAFM = global batch + {k} neighbours, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}; peak RSS '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')
  for name, run in runs.items():
    t = common.median_time(run)
    print(f'{name:<6}{t * 1e3:>8.1f} ms/step  {b / t:>7.1f} img/s  peak '
          f'{run["peak_bytes"] / 2**20:>6.1f} MiB  rounds(ms) ' + ' '.join(f'{x * 1e3:.0f}' for x in run['times']))
  print(f'PAFM/FM step time (median of {FLAGS.rounds} alternating rounds): '
        f'{pafm_t / fm_t:.3f}x')


if __name__ == '__main__':
  app.run(main)
