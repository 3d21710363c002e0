"""Tests of the Fashion-MNIST ArrayRecord builder and the Grain train pipeline.

The truth for the data is the IDX files decoded here, independently, with numpy + gzip.
The dataset is built once per session by the `fmnist_tfds_dir` fixture (tests/conftest.py).
"""

import gzip
import os
import subprocess
import sys
import textwrap
import time

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pafm_jax.data import fashion_mnist
from pafm_jax.data import pipeline

IDX_DIR = '/usr/share/datasets/fashion-mnist'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- truth


def _decode_idx(path):
  """Independent IDX decoder: big-endian header (magic, dims...), then uint8 data."""
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  ndim = raw[3]
  assert raw[:2] == b'\x00\x00' and raw[2] == 0x08, 'IDX type must be unsigned byte'
  dims = np.frombuffer(raw, dtype='>u4', count=ndim, offset=4).astype(np.int64)
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope='module')
def idx_truth():
  out = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    images = _decode_idx(os.path.join(IDX_DIR, f'{prefix}-images-idx3-ubyte.gz'))
    labels = _decode_idx(os.path.join(IDX_DIR, f'{prefix}-labels-idx1-ubyte.gz'))
    out[split] = (images, labels)
  return out


def _data_config(tfds_dir, **overrides):
  c = ml_collections.ConfigDict()
  c.name = 'fashion_mnist'
  c.idx_dir = IDX_DIR
  c.tfds_dir = tfds_dir
  c.split = 'train'
  c.image_size = 28
  c.channels = 1
  c.num_classes = 10
  c.shuffle_seed = 0
  c.worker_count = 0
  c.prefetch_buffer_size = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def _index_epochs(num_batches, **kw):
  """First `num_batches` index batches of the train index stream (no data read)."""
  ds = pipeline.train_index_dataset(60_000, **kw)
  return np.stack([ds[i] for i in range(num_batches)])


# ----------------------------------------------------------------------------- builder


@pytest.mark.parametrize('split,n', [('train', 60_000), ('test', 10_000)])
def test_builder_matches_idx_files(fmnist_tfds_dir, idx_truth, split, n):
  images, labels = idx_truth[split]
  assert images.shape == (n, 28, 28) and labels.shape == (n,)

  builder = fashion_mnist.prepare(fmnist_tfds_dir, IDX_DIR)
  assert builder.name == 'fashion_mnist_idx'
  assert builder.info.splits[split].num_examples == n
  assert builder.info.features['label'].names[0] == 'T-shirt/top'
  np.testing.assert_array_equal(fashion_mnist.class_sizes(split, builder=builder),
                                np.bincount(labels, minlength=10))
  np.testing.assert_array_equal(fashion_mnist.class_sizes(split, fmnist_tfds_dir),
                                np.bincount(labels, minlength=10))

  source = fashion_mnist.load_source(fmnist_tfds_dir, IDX_DIR, split)
  assert len(source) == n
  # Every label and id, read in chunks.
  got_labels, got_ids = [], []
  for start in range(0, n, 5000):
    recs = source.__getitems__(list(range(start, min(n, start + 5000))))
    got_labels += [r['label'] for r in recs]
    got_ids += [r['id'] for r in recs]
  np.testing.assert_array_equal(np.asarray(got_labels), labels)
  np.testing.assert_array_equal(np.asarray(got_ids), np.arange(n))
  # A sample of images (plus both ends), compared bit for bit.
  rng = np.random.default_rng(0)
  sample = np.concatenate([[0, n - 1], rng.choice(n, size=300, replace=False)])
  for i in sample:
    rec = source[int(i)]
    assert rec['image'].dtype == np.uint8 and rec['image'].shape == (28, 28, 1)
    np.testing.assert_array_equal(rec['image'][..., 0], images[i])


def test_prepare_is_idempotent(fmnist_tfds_dir, monkeypatch):
  def _fail(*a, **k):
    raise AssertionError('prepare() rebuilt an existing dataset')
  monkeypatch.setattr(fashion_mnist.FashionMnistIdx, 'download_and_prepare', _fail)
  start = time.perf_counter()
  builder = fashion_mnist.prepare(fmnist_tfds_dir, IDX_DIR)
  assert time.perf_counter() - start < 2.0
  assert builder.is_prepared()


def test_missing_idx_dir_fails_fast(tmp_path):
  missing = tmp_path / 'no-such-dir'
  data_dir = tmp_path / 'tfds'
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError) as exc:
    fashion_mnist.prepare(str(data_dir), str(missing))
  assert time.perf_counter() - start < 2.0
  msg = str(exc.value)
  assert str(missing / 'train-images-idx3-ubyte.gz') in msg
  assert 'sudo apt-get install dataset-fashion-mnist' in msg
  assert 'config.data.idx_dir' in msg
  assert not (data_dir / 'fashion_mnist_idx').exists()

  # The same error through the pipeline entry point.
  cfg = _data_config(str(data_dir), idx_dir=str(missing))
  with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
    pipeline.create_train_iterator(cfg, local_batch_size=8, process_index=0,
                                   process_count=1, seed=0)
  assert not (data_dir / 'fashion_mnist_idx').exists()


def test_interrupted_build_is_not_mistaken_for_complete(tmp_path, monkeypatch):
  original = fashion_mnist.FashionMnistIdx._generate_examples

  def _crash_midway(self, split):
    for i, ex in enumerate(original(self, split)):
      if i == 1000:
        raise RuntimeError('simulated crash mid-build')
      yield ex
  monkeypatch.setattr(fashion_mnist.FashionMnistIdx, '_generate_examples', _crash_midway)
  data_dir = tmp_path / 'tfds'
  with pytest.raises(RuntimeError, match='simulated crash'):
    fashion_mnist.prepare(str(data_dir), IDX_DIR)
  assert not fashion_mnist.get_builder(str(data_dir)).is_prepared()
  assert not (data_dir / 'fashion_mnist_idx' / '1.0.0').exists()
  # TFDS built into `incomplete.*` and removed it on failure.
  leftovers = list((data_dir / 'fashion_mnist_idx').glob('*')) if (
      data_dir / 'fashion_mnist_idx').exists() else []
  assert leftovers == []


def test_reading_needs_no_tensorflow(fmnist_tfds_dir):
  """load_source + reads work in a process where `import tensorflow` fails."""
  code = textwrap.dedent(f"""
      import sys
      from importlib.machinery import PathFinder
      class _Hide(PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
          if name.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'):
            return None
          return PathFinder.find_spec(name, path, target)
      sys.meta_path[:] = [_Hide if f is PathFinder else f for f in sys.meta_path]
      from pafm_jax.data import fashion_mnist
      src = fashion_mnist.load_source({fmnist_tfds_dir!r}, {IDX_DIR!r}, 'test', build=False)
      r = src[7]
      assert r['id'] == 7 and r['image'].shape == (28, 28, 1), r
      assert 'tensorflow' not in sys.modules
      print('OK')
  """)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=env, timeout=120)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------- pipeline


def test_train_batches_are_the_right_examples(fmnist_tfds_dir, idx_truth):
  images, labels = idx_truth['train']
  for p, n in ((0, 1), (1, 2)):
    it = pipeline.create_train_iterator(_data_config(fmnist_tfds_dir), local_batch_size=64,
                                        process_index=p, process_count=n, seed=5)
    assert isinstance(it, grain.DatasetIterator)
    expected_ids = _index_epochs(3, local_batch_size=64, process_index=p,
                                 process_count=n, seed=5)
    for want_ids in expected_ids:
      b = next(it)
      assert b['image'].dtype == np.float32 and b['image'].shape == (64, 28, 28, 1)
      assert b['label'].dtype == np.int32 and b['label'].shape == (64,)
      assert b['id'].dtype == np.int64 and b['id'].shape == (64,)
      np.testing.assert_array_equal(b['id'], want_ids)
      np.testing.assert_array_equal(b['label'], labels[b['id']])
      want = images[b['id']][..., None].astype(np.float32) / 127.5 - 1.0
      np.testing.assert_allclose(b['image'], want, atol=1e-6)
      assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0


def test_same_seed_same_batches_different_seed_different(fmnist_tfds_dir):
  cfg = _data_config(fmnist_tfds_dir)
  kw = dict(local_batch_size=32, process_index=0, process_count=1)
  a = pipeline.create_train_iterator(cfg, seed=1, **kw)
  b = pipeline.create_train_iterator(cfg, seed=1, **kw)
  c = pipeline.create_train_iterator(cfg, seed=2, **kw)
  for _ in range(3):
    x, y, z = next(a), next(b), next(c)
    for k in ('image', 'label', 'id'):
      np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(x['id'], z['id'])
  # seed defaults to config.data.shuffle_seed.
  d = pipeline.create_train_iterator(_data_config(fmnist_tfds_dir, shuffle_seed=1), **kw)
  e = pipeline.create_train_iterator(cfg, seed=1, **kw)
  np.testing.assert_array_equal(next(d)['id'], next(e)['id'])


def test_neighbouring_seeds_do_not_replay_each_others_epochs():
  # Grain seeds epoch e with seed + e; the pipeline hashes the seed first.
  s0 = _index_epochs(2, local_batch_size=30_000, process_index=0, process_count=1, seed=0)
  s1 = _index_epochs(1, local_batch_size=30_000, process_index=0, process_count=1, seed=1)
  assert not np.array_equal(s0[1], s1[0])


@pytest.mark.slow
@pytest.mark.parametrize('process_count', [2, 3])
def test_process_shards_partition_each_epoch(process_count):
  b = 500
  per_process = 60_000 // process_count
  n_batches = per_process // b  # one epoch, no remainder
  for epoch in (0, 1):
    shards = []
    for p in range(process_count):
      ds = pipeline.train_index_dataset(60_000, local_batch_size=b, process_index=p,
                                        process_count=process_count, seed=11)
      shards.append(np.concatenate(
          [ds[i] for i in range(epoch * n_batches, (epoch + 1) * n_batches)]))
    for p in range(process_count):
      assert len(np.unique(shards[p])) == per_process
      for q in range(p + 1, process_count):
        assert np.intersect1d(shards[p], shards[q]).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(60_000))


def test_global_batch_does_not_depend_on_process_count():
  """Process slices, concatenated in process order, are the single-process global batch."""
  single = pipeline.train_index_dataset(60_000, local_batch_size=48, process_index=0,
                                        process_count=1, seed=2)
  for n in (2, 4):
    parts = [pipeline.train_index_dataset(60_000, local_batch_size=48 // n, process_index=p,
                                          process_count=n, seed=2) for p in range(n)]
    for k in (0, 1, 1249, 1250, 3000):  # 1250 batches per epoch: across the epoch boundary
      np.testing.assert_array_equal(np.concatenate([d[k] for d in parts]), single[k])


@pytest.mark.slow
def test_uneven_process_count_gives_equal_disjoint_shards():
  process_count, b = 7, 1000  # 60000 // 7 = 8571 per process -> 8 batches per epoch
  shards = []
  for p in range(process_count):
    ds = pipeline.train_index_dataset(60_000, local_batch_size=b, process_index=p,
                                      process_count=process_count, seed=0)
    assert len(ds) > 10**12  # infinite
    shards.append(np.concatenate([ds[i] for i in range(8)]))
  allids = np.concatenate(shards)
  assert allids.size == len(np.unique(allids)) == 56_000


def test_second_epoch_is_a_new_permutation():
  e = _index_epochs(120, local_batch_size=1000, process_index=0, process_count=1, seed=3)
  epoch1, epoch2 = e[:60].ravel(), e[60:].ravel()
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(60_000))
  np.testing.assert_array_equal(np.sort(epoch2), np.arange(60_000))
  assert np.mean(epoch1 == epoch2) < 0.01
  assert not np.array_equal(epoch1, np.arange(60_000))


@pytest.mark.parametrize('async_save', [False, True])
def test_resume_through_orbax_checkpoint_manager(fmnist_tfds_dir, tmp_path, async_save):
  cfg = _data_config(fmnist_tfds_dir)
  kw = dict(local_batch_size=64, process_index=0, process_count=1, seed=7)

  reference = pipeline.create_train_iterator(cfg, **kw)
  expected = [next(reference) for _ in range(8)]

  it = pipeline.create_train_iterator(cfg, **kw)
  for _ in range(5):
    next(it)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True)
  with ocp.CheckpointManager(
      tmp_path / 'ckpt', options=options,
      item_handlers={'data': pipeline.iterator_checkpoint_handler()}) as mngr:
    assert mngr.save(5, args=ocp.args.Composite(data=pipeline.iterator_save_args(it)))
    # The iterator state must have been captured inside save(), not later.
    next(it)
    next(it)
    mngr.wait_until_finished()

  fresh = pipeline.create_train_iterator(cfg, **kw)
  with ocp.CheckpointManager(
      tmp_path / 'ckpt', options=options,
      item_handlers={'data': pipeline.iterator_checkpoint_handler()}) as mngr:
    assert mngr.latest_step() == 5
    restored = mngr.restore(5, args=ocp.args.Composite(
        data=pipeline.iterator_restore_args(fresh)))
  assert restored['data'] is fresh
  for want in expected[5:]:
    got = next(fresh)
    for k in ('image', 'label', 'id'):
      np.testing.assert_array_equal(got[k], want[k])


def test_worker_processes_give_the_same_stream(fmnist_tfds_dir):
  kw = dict(local_batch_size=64, process_index=0, process_count=1, seed=4)
  inproc = pipeline.create_train_iterator(_data_config(fmnist_tfds_dir), **kw)
  mp = pipeline.create_train_iterator(_data_config(fmnist_tfds_dir, worker_count=2), **kw)
  try:
    for _ in range(4):
      a, b = next(inproc), next(mp)
      for k in ('image', 'label', 'id'):
        np.testing.assert_array_equal(a[k], b[k])
  finally:
    mp.close()


def test_eval_iterator_covers_test_split_in_order(fmnist_tfds_dir, idx_truth):
  _, labels = idx_truth['test']
  cfg = _data_config(fmnist_tfds_dir)
  src = pipeline.create_eval_source(cfg)
  assert len(src) == 10_000 and src[123]['id'] == 123
  ids, labs = [], []
  for p in range(2):
    for b in pipeline.create_eval_iterator(cfg, local_batch_size=3000, process_index=p,
                                           process_count=2):
      ids.append(b['id'])
      labs.append(b['label'])
  ids, labs = np.concatenate(ids), np.concatenate(labs)
  np.testing.assert_array_equal(np.sort(ids), np.arange(10_000))
  np.testing.assert_array_equal(labs, labels[ids])


@pytest.mark.parametrize('kwargs,match', [
    (dict(local_batch_size=0), 'local_batch_size'),
    (dict(local_batch_size=8, process_index=2, process_count=2), 'process_index'),
    (dict(local_batch_size=8, seed=-1), 'seed'),
    (dict(local_batch_size=8.0), 'local_batch_size'),
])
def test_bad_arguments_fail_before_any_work(tmp_path, kwargs, match):
  # A nonexistent idx_dir and empty tfds_dir: a ValueError (not FileNotFoundError)
  # proves validation ran before any build or read.
  cfg = _data_config(str(tmp_path / 'tfds'), idx_dir=str(tmp_path / 'none'))
  kwargs = dict(dict(process_index=0, process_count=1, seed=0), **kwargs)
  with pytest.raises(ValueError, match=match):
    pipeline.create_train_iterator(cfg, **kwargs)
  assert not (tmp_path / 'tfds').exists()


def test_config_mismatch_and_missing_seed_are_errors(fmnist_tfds_dir):
  with pytest.raises(ValueError, match='image_size'):
    pipeline.create_train_iterator(_data_config(fmnist_tfds_dir, image_size=32),
                                   local_batch_size=8, seed=0)
  cfg = _data_config(fmnist_tfds_dir)
  cfg.shuffle_seed = None
  with pytest.raises(ValueError, match='shuffle_seed'):
    pipeline.create_train_iterator(cfg, local_batch_size=8)
  with pytest.raises(ValueError, match='larger than'):
    pipeline.create_train_iterator(_data_config(fmnist_tfds_dir), local_batch_size=40_000,
                                   process_index=0, process_count=2, seed=0)


def test_tfds_dir_resolution(monkeypatch):
  monkeypatch.delenv(pipeline.TFDS_DIR_ENV, raising=False)
  assert pipeline.resolve_tfds_dir(_data_config('')) == os.path.expanduser(
      '~/.cache/pafm_jax/tfds')
  monkeypatch.setenv(pipeline.TFDS_DIR_ENV, '/tmp/elsewhere')
  assert pipeline.resolve_tfds_dir(_data_config('')) == '/tmp/elsewhere'
  assert pipeline.resolve_tfds_dir(_data_config('/x/y')) == '/x/y'
