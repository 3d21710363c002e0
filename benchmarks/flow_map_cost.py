"""What a flow-map step costs against the FM step of the same model and batch.

  .venv/bin/python -m benchmarks.flow_map_cost [--teacher_workdir=runs/fmnist_sit] [--rounds=5]

configs/fmnist_sit.py's model and global batch on random data, in-batch targets (no
retrieval), compiled once per variant and timed in alternating rounds in one process: FM, the
flow-map losses meanflow (one jvp through φ), psd (two extra forward passes), lsd (reverse
mode through the jvp tangent of ∂_t X), and, with --teacher_workdir, lmd and meanflow against
a CFG-guided teacher (the distillation of configs/fmnist_flowmap.py). Prints each variant's
median step time, its ratio to FM, and XLA's FLOP count of the step.
"""

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from benchmarks import common
from pafm_jax import config_checks

config_flags.DEFINE_config_file('config', 'configs/fmnist_sit.py', 'Config of the model.')
flags.DEFINE_string('teacher_workdir', '', 'A trained velocity run, for the distillation rows.')
flags.DEFINE_integer('rounds', 5, 'Alternating timing rounds.')
flags.DEFINE_integer('steps_per_round', 5, 'Steps timed per variant and round.')
FLAGS = flags.FLAGS


def variants(teacher: str) -> dict[str, dict]:
  out = {'fm': {'objective.name': 'fm'}}
  for loss in ('meanflow', 'psd', 'lsd'):
    out[f'{loss} (fm diagonal)'] = {'objective.name': 'flow_map', 'objective.flow_map.loss': loss}
  if teacher:
    for loss in ('meanflow', 'lmd'):
      out[f'{loss} (guided teacher)'] = {
          'objective.name': 'flow_map', 'objective.flow_map.loss': loss,
          'objective.flow_map.diagonal_target': 'teacher',
          'objective.flow_map.diagonal_fraction': 0.25,
          'objective.flow_map.teacher_workdir': teacher,
          'objective.flow_map.teacher_cfg_scale': 1.5}
  return out


def main(_):
  base = FLAGS.config
  rng = np.random.default_rng(0)
  b, s, c = base.global_batch_size, base.data.image_size, base.data.channels
  batch = {'image': rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32),
           'label': rng.integers(0, base.data.num_classes, (b,)).astype(np.int32),
           'id': np.arange(b, dtype=np.int32)}
  runs = {}
  for name, overrides in variants(FLAGS.teacher_workdir).items():
    config = base.copy_and_resolve_references()
    with config.unlocked():
      config.retrieval.mode = 'none'
      config.objective.pafm.sources = 'batch'
      config.objective.pafm.stratified = False
      config.sample.cfg_scale = 1.0
      for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split('.')
        for p in parents:
          node = node[p]
        node[leaf] = value
    mesh = config_checks.validated_mesh(config)
    runs[name] = common.prepare_run(config, mesh, batch)
    print(f'{name}: compiled; {runs[name]["flops"] / 1e9:.2f} GFLOP per step', flush=True)

  common.time_alternating(runs, FLAGS.rounds, FLAGS.steps_per_round)
  base_t = common.median_time(runs['fm'])
  print(f'\n{base.model.name}, global batch {b}, {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}')
  print(f'{"variant":<26}{"ms/step":>10}{"vs fm":>8}{"GFLOP":>9}{"FLOP vs fm":>12}')
  for name, run in runs.items():
    t = common.median_time(run)
    print(f'{name:<26}{t * 1e3:>10.1f}{t / base_t:>8.2f}{run["flops"] / 1e9:>9.2f}'
          f'{run["flops"] / runs["fm"]["flops"]:>12.2f}')


if __name__ == '__main__':
  app.run(main)
