"""Train-step throughput of a config, and the cost of its options, measured side by side.

  .venv/bin/python -m benchmarks.train_step [--config=configs/fmnist_sit.py] [--rounds=5]

Compiles the step for the baseline (fp32, no remat) and for each option (bf16 compute, remat
per block, both), then times them in alternating rounds in one process, so every variant sees
the same machine state. Prints images/s, achieved FLOP/s from XLA's cost analysis (and MFU
when --peak_tflops is given), and each variant's median step time relative to the baseline.
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from benchmarks import common
from pafm_jax import config_checks

config_flags.DEFINE_config_file('config', 'configs/fmnist_sit.py', 'Config to benchmark.')
flags.DEFINE_integer('rounds', 5, 'Alternating timing rounds.')
flags.DEFINE_integer('steps_per_round', 10, 'Steps timed per variant and round.')
flags.DEFINE_float('peak_tflops', 0.0, 'Device peak TFLOP/s for MFU (0: not reported).')
FLAGS = flags.FLAGS

VARIANTS = {
    'fp32': {},
    'bf16': {'dtype': 'bfloat16'},
    'remat': {'remat': True},
    'bf16+remat': {'dtype': 'bfloat16', 'remat': True},
}


def main(_):
  base = FLAGS.config
  mesh = config_checks.validated_mesh(base)
  b = base.global_batch_size
  batch = common.random_batch(base)

  runs = {}
  for name, model_overrides in VARIANTS.items():
    config = base.copy_and_resolve_references()
    with config.unlocked():
      config.model.update(model_overrides)
    runs[name] = common.prepare_run(config, mesh, batch)
    print(f'{name}: compiled; {runs[name]["flops"] / 1e9:.2f} GFLOP per step', flush=True)

  common.time_alternating(runs, FLAGS.rounds, FLAGS.steps_per_round)

  base_t = common.median_time(runs['fp32'])
  print(f'\n{base.model.name}, global batch {b}, {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}')
  print(f'{"variant":<12}{"ms/step":>10}{"img/s":>10}{"GFLOP/s":>10}{"MFU":>8}{"vs fp32":>9}')
  for name, run in runs.items():
    t = common.median_time(run)
    achieved = run['flops'] / t
    mfu = f'{achieved / (FLAGS.peak_tflops * 1e12 * jax.device_count()):.1%}' if (
        FLAGS.peak_tflops) else '-'
    print(f'{name:<12}{t * 1e3:>10.1f}{b / t:>10.1f}{achieved / 1e9:>10.1f}{mfu:>8}'
          f'{t / base_t:>8.2f}x')
  ratios = ', '.join(f'{n} {common.median_time(r) / base_t:.2f}x'
                     for n, r in runs.items() if n != 'fp32')
  print(f'fp32 {b / base_t:.1f} img/s; step time relative to fp32: {ratios}')


if __name__ == '__main__':
  app.run(main)
