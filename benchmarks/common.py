"""What every benchmark here shares: compile a config's step, read XLA's cost and memory
analysis, and time variants in alternating rounds so they all see the same machine state."""

import statistics
import time

import jax
import numpy as np
from pafm_jax import batch_contract, sharding, train, train_state


def step_flops(config) -> float:
  """FLOPs of one train step of `config`, counted by XLA in the lowered program on the host CPU.

  Counted there on every backend: once compiled for a GPU the matmuls are cuBLAS calls, which
  the compiled module's cost analysis reports as 0 FLOPs, and the GPU client gives no
  analysis of the lowered program.
  """
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices('cpu')[:1])
  setup = train_state.TrainSetup.create(config, mesh)
  return float(train.lower_step(setup).cost_analysis()['flops'])


def step_cost(config, compiled) -> dict[str, float]:
  """FLOPs (see `step_flops`), bytes accessed and peak memory of a compiled step."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  peak = getattr(mem, 'peak_memory_in_bytes', 0) or (
      mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes)
  return {'flops': step_flops(config), 'bytes': float(cost.get('bytes accessed', 0.0)),
          'peak_bytes': float(peak)}


def prepare_run(config, mesh, local_batch: dict) -> dict:
  """Compiles the config's step, initialises its state and runs one warm-up step."""
  setup = train_state.TrainSetup.create(config, mesh)
  compiled = train.compile_step(setup)
  batch = train.to_global_batch(local_batch, setup.batch_spec, mesh)
  state, metrics = compiled(setup.init(), batch)
  jax.block_until_ready(metrics)
  return {'step': compiled, 'state': state, 'batch': batch, 'times': [],
          **step_cost(config, compiled)}


def time_alternating(runs: dict[str, dict], rounds: int, steps_per_round: int) -> None:
  """Appends each run's mean step time of every round to run['times'], variants interleaved."""
  for r in range(rounds):
    for run in runs.values():
      t0 = time.perf_counter()
      for _ in range(steps_per_round):
        run['state'], metrics = run['step'](run['state'], run['batch'])
      jax.block_until_ready(metrics)
      run['times'].append((time.perf_counter() - t0) / steps_per_round)
    print(f'round {r + 1}/{rounds} done', flush=True)


def median_time(run: dict) -> float:
  return statistics.median(run['times'])


def random_batch(config, seed: int = 0) -> dict:
  """A global batch with every field the config's step reads (batch_contract.batch_spec),
  random but of the right shape, dtype and range: enough to time a step."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, (shape, dtype) in batch_contract.batch_spec(config).items():
    if name in (batch_contract.LABEL, batch_contract.NEIGHBOUR_LABELS):
      out[name] = rng.integers(0, config.data.num_classes, shape).astype(dtype)
    elif np.issubdtype(dtype, np.integer):
      out[name] = rng.integers(0, 1000, shape).astype(dtype)
    elif name == batch_contract.T:
      out[name] = rng.uniform(0, 1, shape).astype(dtype)
    elif name == batch_contract.EPS:
      out[name] = rng.standard_normal(shape).astype(dtype)
    else:
      out[name] = rng.uniform(-1, 1, shape).astype(dtype)
  return out
