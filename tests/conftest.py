"""Test setup: 8 fake CPU devices (set before JAX is imported), parsed absl flags, and the
Fashion-MNIST array_record dataset built once per session."""

import os
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402
import pytest  # noqa: E402

# Grain's worker processes read absl flags, which only `app.run` would otherwise parse.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: trains, builds an index or spawns processes; left out of make test-fast')


@pytest.fixture(scope='session')
def fmnist_tfds_dir(tmp_path_factory):
  """tfds data_dir holding the prepared `fashion_mnist_idx` dataset (built once, ~6 s).

  Reuses $PAFM_TFDS_DIR when set (building there only if missing); otherwise builds into a
  fresh session temp dir. Without the Debian IDX files the tests that need real data fail
  (not skip): `make test` installs them, and a silent skip would hide a broken set-up.
  """
  from pafm_jax.data import fashion_mnist
  data_dir = os.environ.get('PAFM_TFDS_DIR') or str(tmp_path_factory.mktemp('tfds'))
  start = time.perf_counter()
  fashion_mnist.prepare(data_dir, fashion_mnist.DEFAULT_IDX_DIR)
  print(f'\n[fmnist_tfds_dir] prepare({data_dir}) took {time.perf_counter() - start:.1f}s')
  return data_dir
