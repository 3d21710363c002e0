"""Helpers for tests that run `python -m pafm_jax.main` (or launch/local.sh) as a user would:
the tiny job's flags, starting and reading runs, and reading their checkpoints back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_flags(tfds_dir: str, workdir: str, **overrides) -> list[str]:
  """pafm_jax.main's flags for the tiny job of tests/test_train.tiny_config (in-batch PAFM,
  SiT-T/4, batch 16, no retrieval, no worker processes), with --config.<k>=<v> overrides."""
  values = {'model.name': 'SiT-T/4', 'global_batch_size': 16, 'total_steps': 4,
            'log_every_steps': 1, 'checkpoint_every_steps': 2, 'sample_every_steps': 100_000,
            'sample.num_steps': 2, 'sample.per_class': 1, 'objective.pafm.sources': 'batch',
            'objective.pafm.stratified': False, 'retrieval.mode': 'none',
            'data.worker_count': 0, 'data.tfds_dir': tfds_dir, **overrides}
  return ['--config=configs/fmnist_sit.py', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in values.items())]


def main_command(flags: list[str]) -> list[str]:
  return [sys.executable, '-m', 'pafm_jax.main', *flags]


def env(devices: int) -> dict:
  """The environment of a run on `devices` CPU devices."""
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def run_local(processes: int, devices_per_process: int, flags: list[str], log_dir: str,
              timeout: float = 400) -> subprocess.CompletedProcess:
  """launch/local.sh with `processes` × `devices_per_process`; fails the test if it fails."""
  out = subprocess.run(
      [os.path.join(REPO, 'launch', 'local.sh'), str(processes), *flags], cwd=REPO,
      env=dict(env(devices_per_process), DEVICES_PER_PROCESS=str(devices_per_process),
               LOG_DIR=log_dir, PYTHON=sys.executable),
      capture_output=True, text=True, timeout=timeout)
  logs = '\n'.join(read(os.path.join(log_dir, f)) for f in sorted(os.listdir(log_dir)))
  assert out.returncode == 0, (out.stderr[-2000:], logs[-6000:])
  return out


def read(path: str) -> str:
  with open(path, errors='replace') as f:
    return f.read()


def logged_losses(log: str) -> dict[int, float]:
  """{step: loss} of the metric lines a run logs (`[step] ... loss=value, ...`)."""
  return {int(m.group(1)): float(m.group(2))
          for m in re.finditer(r'\] \[(\d+)\] .*?\bloss=([-+0-9.eE]+|nan)', log)}


def saved_state(workdir: str, step: int) -> dict:
  """The train state of checkpoint `step` as numpy arrays (read onto one device)."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata.tree)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def _flat(tree) -> dict[str, np.ndarray]:
  """{'a/0/b': leaf}: list indices and dict keys spelled alike (a restored checkpoint has
  string keys where the live state has ints)."""
  def name(k) -> str:
    for attribute in ('key', 'idx', 'name'):
      if hasattr(k, attribute):
        return str(getattr(k, attribute))
    return str(k)
  return {'/'.join(name(k) for k in path): np.asarray(v)
          for path, v in jax.tree.leaves_with_path(tree)}


def assert_states_close(actual: dict, expected: dict, rtol: float, atol: float) -> None:
  got, want = _flat(actual), _flat(expected)
  assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:10]
  for path, b in want.items():
    np.testing.assert_allclose(got[path], b, rtol=rtol, atol=atol, err_msg=path)


def assert_states_equal(actual: dict, expected: dict) -> None:
  got, want = _flat(actual), _flat(expected)
  assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:10]
  for path, b in want.items():
    np.testing.assert_array_equal(got[path], b, err_msg=path)
