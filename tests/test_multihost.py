"""Two JAX processes on 127.0.0.1 (4 CPU devices each) train exactly like one 8-device process.

Covers what only a multi-host run exercises: `jax.distributed`, per-process data shards
assembled with `jax.make_array_from_process_local_data`, Orbax/Grain checkpoints written
by several processes, and the retrieval stage serving each process's rows from that process's
own copy of the index (stratified PAFM with noisy neighbours).
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pafm_jax import train
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow  # trains, or spawns processes


WORKER = textwrap.dedent('''
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from pafm_jax import train
    from tests.test_train import tiny_config
    from tests.test_multihost import retrieval
    config = tiny_config(sys.argv[3], total_steps=2, **retrieval(sys.argv[5]))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    train.train_and_evaluate(config, sys.argv[4])
    print('WORKER_OK', jax.process_index())
''')


def retrieval(index_dir: str) -> dict:
  """Stratified PAFM with 4 noisy neighbours from an exact index at index_dir."""
  return {'objective.pafm.sources': 'batch+retrieved', 'objective.pafm.stratified': True,
          'retrieval.mode': 'noisy', 'retrieval.k': 4, 'retrieval.backend': 'exact',
          'retrieval.index_dir': index_dir}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(fmnist_tfds_dir, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS='')
  multi_dir = str(tmp_path / 'multi')
  address = f'127.0.0.1:{_free_port()}'
  # Each "host" builds and reads its own local index directory.
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, address, str(i), fmnist_tfds_dir,
                             multi_dir, str(tmp_path / f'index_host{i}')], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f'WORKER_OK {i}' in out, out[-4000:]

  # Each process saved its own data-iterator state next to the shared train state.
  data_files = set(os.listdir(os.path.join(multi_dir, 'checkpoints', '2', 'data')))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= data_files

  single = train.train_and_evaluate(
      tiny_config(fmnist_tfds_dir, total_steps=2, **retrieval(str(tmp_path / 'index_single'))),
      str(tmp_path / 'single'))
  # Restored onto this process's 8-device mesh through an abstract target.
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        single['state'])
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(multi_dir, 'checkpoints', '2', 'state'), target)
  assert int(restored['step']) == 2
  for (path, a), b in zip(jax.tree.leaves_with_path(single['state']['params']),
                          jax.tree.leaves(restored['params'])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
