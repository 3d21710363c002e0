"""Several JAX processes on 127.0.0.1 (launch/local.sh, gloo) train exactly like one, and a
run resumes on another topology: 2 processes → 1, 8 devices → 4.

Covers what only a multi-process run exercises: `jax.distributed`, per-process data shards
assembled with `jax.make_array_from_process_local_data`, Orbax/Grain checkpoints written by
several processes, the retrieval stage serving each process's rows (stratified PAFM with noisy
neighbours), and the data position re-derived from the step when the saved iterator state
belongs to another process count.
"""

import os
import shutil

import jax
import pytest

from pafm_jax import train
from pafm_jax.retrieval import dataset_index
from tests import runs
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow  # spawns processes

RETRIEVAL = {'objective.pafm.sources': 'batch+retrieved', 'objective.pafm.stratified': True,
             'retrieval.mode': 'noisy', 'retrieval.k': 4, 'retrieval.backend': 'exact'}


def test_two_processes_match_one_and_runs_resume_on_other_topologies(fmnist_tfds_dir, tmp_path,
                                                                     caplog):
  # One exact index, read by every process of every run (each host reads its own copy on a pod).
  index_dir = str(tmp_path / 'index')
  settings = dict(RETRIEVAL, **{'retrieval.index_dir': index_dir, 'keep_checkpoints': 5})
  dataset_index.build(tiny_config(fmnist_tfds_dir, **settings), str(tmp_path / 'unused'))

  def run(name, processes, devices, **overrides):
    workdir = str(tmp_path / name)
    runs.run_local(processes, devices, runs.tiny_flags(fmnist_tfds_dir, workdir, **settings,
                                                       **overrides), str(tmp_path / f'{name}_logs'))
    return workdir, runs.read(str(tmp_path / f'{name}_logs' / 'process_0.log'))

  one, one_log = run('one', 1, 4)
  two, two_log = run('two', 2, 2)
  # Same global batch and seed: the same per-step losses and final state.
  losses_one, losses_two = runs.logged_losses(one_log), runs.logged_losses(two_log)
  assert sorted(losses_one) == [1, 2, 3, 4]
  for step, loss in losses_one.items():
    assert abs(losses_two[step] - loss) <= 1e-5 * abs(loss), (step, losses_two[step], loss)
  expected = runs.saved_state(one, 4)
  runs.assert_states_close(runs.saved_state(two, 4), expected, rtol=1e-5, atol=1e-6)
  # Each process saved its own data-iterator state next to the shared train state.
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(
      os.listdir(os.path.join(two, 'checkpoints', '2', 'data')))

  # 2 processes → 1 (this process, 8 devices): the saved iterator states do not fit, so the
  # data position is re-derived from the step; the state is resharded onto 8 devices.
  shutil.copytree(two, tmp_path / 'two_to_one')
  shutil.rmtree(tmp_path / 'two_to_one' / 'checkpoints' / '4')
  resumed = train.train_and_evaluate(tiny_config(fmnist_tfds_dir, **settings),
                                     str(tmp_path / 'two_to_one'))
  assert 're-derived from the step' in caplog.text
  runs.assert_states_close(jax.device_get(resumed['state']), expected, rtol=1e-5, atol=1e-6)

  # 8 devices (this process) → 4 devices in another: resharded onto the smaller mesh.
  eight = str(tmp_path / 'eight_to_four')
  train.train_and_evaluate(tiny_config(fmnist_tfds_dir, **settings, total_steps=2), eight)
  _, log = run('eight_to_four', 1, 4)
  assert 'restoring checkpoint at step 2' in log
  runs.assert_states_close(runs.saved_state(eight, 4), expected, rtol=1e-5, atol=1e-6)
