"""Test setup: 8 fake CPU devices (set before JAX is imported), one XLA compilation cache for
the session, parsed absl flags, and the Fashion-MNIST array_record dataset built once per
session."""

import os
import shutil
import tempfile
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Many tests compile the same program several times: a run and its resumption, an
# uninterrupted twin, a subprocess or a notebook doing it again. JAX's persistent compilation
# cache lets them compile it once per `make test`. It stores executables, never results, so
# every comparison still computes both sides. The pytest process sets it before its xdist
# workers start; they inherit it, as does every subprocess a test starts. A size limit turns
# on JAX's file lock, so that processes can share the directory. JAX's own thresholds stay
# (only compilations of ≥ 1 s are stored). Storing every small eager-op executable as well
# made each store scan thousands of entries under that lock (JAX's LRU eviction), the likely
# reason why an Inception test that runs many small programs ran 4.7× slower in that set-up.
# PAFM_TESTS_XLA_CACHE=0 turns it off; the directory is removed when the session ends.
_OWN_XLA_CACHE = ('JAX_COMPILATION_CACHE_DIR' not in os.environ and
                  os.environ.get('PAFM_TESTS_XLA_CACHE', '1') != '0')
if _OWN_XLA_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='pafm_jax_tests_xla_')
  os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(4 << 30)

from absl import flags  # noqa: E402
import pytest  # noqa: E402

# Grain's worker processes read absl flags, which only `app.run` would otherwise parse.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: trains, builds an index or spawns processes; left out of make test-fast')


# The test files that take longest (their tests and fixtures summed, from `make test`'s
# --durations on the 2-core machine), longest first. The Makefile's xdist hands out whole
# files in collection order (--no-loadscope-reorder; xdist's own order puts the files with
# most tests first, which left a 3-minute file running alone at the end). Starting the long
# files first lets the many short ones fill in around them. A file missing here only runs
# later; a stale entry only costs balance.
_LONGEST_FILES = ('test_notebooks.py', 'test_train.py', 'test_flow_maps.py',
                  'test_fault_tolerance.py', 'test_retrieval.py', 'test_text_workflow.py',
                  'test_multihost.py', 'test_repa.py', 'test_fm_vs_pafm.py', 'test_cli.py',
                  'test_eval_modes.py', 'test_text_pafm.py', 'test_config_checks.py',
                  'test_statistics.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


def pytest_sessionfinish(session):
  # Only the process that made the cache removes it: an xdist worker inherits the directory
  # (so _OWN_XLA_CACHE is False there) and ends before the pytest process does.
  if _OWN_XLA_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


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
