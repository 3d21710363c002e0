"""Test setup: 8 fake CPU devices (set before JAX is imported) and parsed absl flags."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # noqa: E402

# Grain's worker processes read absl flags, which only `app.run` would otherwise parse.
flags.FLAGS.mark_as_parsed()


# --- Fashion-MNIST ArrayRecord dataset, built once per test session (tests/test_data.py) ---
import time  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def fmnist_tfds_dir(tmp_path_factory):
  """tfds data_dir holding the prepared `fashion_mnist_idx` dataset (built once, ~6 s).

  Reuses $PAFM_TFDS_DIR when set (building there only if missing); otherwise builds into a
  fresh session temp dir. Skips when the Debian IDX files are not installed.
  """
  from pafm_jax.data import fashion_mnist
  data_dir = os.environ.get('PAFM_TFDS_DIR') or str(tmp_path_factory.mktemp('tfds'))
  try:
    fashion_mnist.check_idx_files(fashion_mnist.DEFAULT_IDX_DIR)
  except FileNotFoundError as e:
    if not fashion_mnist.get_builder(data_dir).is_prepared():
      pytest.skip(str(e))
  start = time.perf_counter()
  fashion_mnist.prepare(data_dir, fashion_mnist.DEFAULT_IDX_DIR)
  print(f'\n[fmnist_tfds_dir] prepare({data_dir}) took {time.perf_counter() - start:.1f}s')
  return data_dir
