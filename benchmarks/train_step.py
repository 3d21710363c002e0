"""Train-step throughput of a config, and the cost of its options, measured side by side.

  .venv/bin/python -m benchmarks.train_step [--config=configs/fmnist_sit.py] [--rounds=5]
  python -m benchmarks.train_step --config=configs/sit_xl2.py --config.global_batch_size=64

Compiles the step for the baseline (fp32, XLA attention, no remat) and for each option (bf16
compute; the backend's fused attention kernel, models/attention.py; remat per block with
each policy; their combinations), then times them in alternating rounds in one process, so
every variant sees the same machine state. Prints images/s, achieved FLOP/s from XLA's cost
analysis, MFU (against --peak_tflops, or the bf16 dense peak of a known accelerator), and
each variant's median step time relative to the baseline. Variants that cannot run on this
backend (cuDNN off GPU, Pallas off TPU) are left out and named.
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from benchmarks import common
from pafm_jax import config_checks
from pafm_jax.models import attention

config_flags.DEFINE_config_file('config', 'configs/fmnist_sit.py', 'Config to benchmark.')
flags.DEFINE_integer('rounds', 5, 'Alternating timing rounds.')
flags.DEFINE_integer('steps_per_round', 10, 'Steps timed per variant and round.')
flags.DEFINE_float('peak_tflops', 0.0, 'Device peak TFLOP/s for MFU (0: from PEAK_TFLOPS by '
                   'device kind; not reported for unknown devices).')
flags.DEFINE_list('variants', [], 'Variants to time (default: all that run on this backend).')
FLAGS = flags.FLAGS

BASE = {'dtype': 'float32', 'attention': 'xla', 'remat': False}
VARIANTS = {
    'fp32': {},
    'bf16': {'dtype': 'bfloat16'},
    'bf16+fused': {'dtype': 'bfloat16', 'attention': 'auto'},
    'remat(nothing)': {'remat': True, 'remat_policy': 'nothing'},
    'remat(dots)': {'remat': True, 'remat_policy': 'dots'},
    'bf16+fused+remat(dots)': {'dtype': 'bfloat16', 'attention': 'auto', 'remat': True,
                               'remat_policy': 'dots'},
}
# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets (MFU's denominator).
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'TPU v4': 275.0,
               'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0, 'TPU v6 lite': 918.0,
               'TPU v6e': 918.0}


def peak_tflops() -> float:
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), 0.0)


def runnable(overrides: dict) -> bool:
  """Whether the variant's attention kernel exists on this backend ('auto' always does)."""
  return attention.resolve(overrides.get('attention', 'xla'),
                           overrides.get('dtype', 'float32')) in ('xla', 'reference') or (
      jax.devices()[0].platform in ('gpu', 'tpu'))


def main(_):
  base = FLAGS.config
  mesh = config_checks.validated_mesh(base)
  b = base.global_batch_size
  batch = common.random_batch(base)

  runs = {}
  for name in FLAGS.variants or VARIANTS:
    model_overrides = {**BASE, **VARIANTS[name]}
    if not runnable(model_overrides):
      print(f'{name}: left out (its attention kernel needs a GPU or TPU)')
      continue
    config = base.copy_and_resolve_references()
    with config.unlocked():
      config.model.update(model_overrides)
    runs[name] = common.prepare_run(config, mesh, batch)
    kernel = attention.resolve(config.model.attention, config.model.dtype)
    print(f'{name}: compiled (attention {kernel}); {runs[name]["flops"] / 1e9:.2f} GFLOP per '
          'step', flush=True)

  common.time_alternating(runs, FLAGS.rounds, FLAGS.steps_per_round)

  baseline = next(iter(runs))
  base_t = common.median_time(runs[baseline])
  peak = peak_tflops()
  print(f'\n{base.model.name}, global batch {b}, {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}')
  print(f'{"variant":<24}{"ms/step":>10}{"img/s":>10}{"GFLOP/s":>10}{"MFU":>8}'
        f'{"vs " + baseline:>12}')
  for name, run in runs.items():
    t = common.median_time(run)
    achieved = run['flops'] / t
    mfu = f'{achieved / (peak * 1e12 * jax.device_count()):.1%}' if peak else '-'
    print(f'{name:<24}{t * 1e3:>10.1f}{b / t:>10.1f}{achieved / 1e9:>10.1f}{mfu:>8}'
          f'{t / base_t:>11.2f}x')
  ratios = ', '.join(f'{n} {common.median_time(r) / base_t:.2f}x'
                     for n, r in runs.items() if n != baseline)
  print(f'{baseline} {b / base_t:.1f} img/s; step time relative to {baseline}: {ratios}')


if __name__ == '__main__':
  app.run(main)
