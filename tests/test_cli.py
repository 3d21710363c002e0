"""The command line a user runs: `python -m pafm_jax.main --config=... --workdir=...`."""

import os
import subprocess
import sys

import pytest


def _run(repo, workdir, tfds_dir, *extra):
  cmd = [sys.executable, '-m', 'pafm_jax.main', '--config=configs/fmnist_sit.py',
         f'--workdir={workdir}', f'--config.data.tfds_dir={tfds_dir}',
         '--config.model.name=SiT-T/4', '--config.global_batch_size=8',
         '--config.total_steps=2', '--config.log_every_steps=1',
         '--config.checkpoint_every_steps=1', '--config.sample.num_steps=2',
         '--config.sample.per_class=1', *extra]
  env = dict(os.environ, XLA_FLAGS='')  # one CPU device, as on a user's laptop
  return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_trains_checkpoints_and_does_nothing_when_finished(fmnist_tfds_dir, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = tmp_path / 'run'
  first = _run(repo, workdir, fmnist_tfds_dir, '--config.objective.path=cosine')
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  assert os.listdir(workdir / 'samples') == ['samples_00000002.png']
  assert 'loss_t0.0-0.2' in first.stderr  # per-t-bucket losses are logged
  second = _run(repo, workdir, fmnist_tfds_dir, '--config.objective.path=cosine')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'nothing to do' in second.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']


def test_cli_rejects_unknown_override(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = _run(repo, tmp_path / 'run', '/nonexistent', '--config.objective.nmae=fm')
  assert out.returncode != 0
  assert 'nmae' in out.stderr
