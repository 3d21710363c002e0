"""Retrieval of posterior candidates: keys, the ScaNN/exact index, the Grain stage, bad input.

Truths: a full sort (exact search), brute-force likelihoods of the posterior module (noisy
neighbours are the top-likelihood candidates), exact search (ScaNN's recall), an unmoved index
(moved copy), an uninterrupted iterator (resume) and a single-process run (two processes).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist_sit
from pafm_jax import objectives, paths, posterior
from pafm_jax.retrieval import stage as retrieval_stage
from pafm_jax.data import pipeline
from pafm_jax.retrieval import dataset_index
from pafm_jax.retrieval import index as index_lib
from pafm_jax.retrieval import keys as keys_lib
from tests.test_train import apply_overrides

K = 16


def retrieval_config(tfds_dir, **overrides):
  c = fmnist_sit.get_config()
  c.data.tfds_dir = tfds_dir
  c.objective.pafm.sources = 'batch+retrieved'
  c.objective.pafm.stratified = True
  c.retrieval.mode = 'noisy'
  c.retrieval.k = K
  return apply_overrides(c, overrides)


@pytest.fixture(scope='module')
def fmnist(fmnist_tfds_dir):
  config = retrieval_config(fmnist_tfds_dir)
  images, labels = pipeline.load_arrays(config.data)
  return images, labels


@pytest.fixture(scope='module')
def built(fmnist_tfds_dir, tmp_path_factory):
  """(config, workdir) of a ScaNN index over Fashion-MNIST train, built once (~20 s)."""
  config = retrieval_config(fmnist_tfds_dir, **{'retrieval.backend': 'scann'})
  workdir = str(tmp_path_factory.mktemp('scann_run'))
  dataset_index.build(config, workdir)
  return config, workdir


def exact_class_neighbours(queries, labels, images, all_labels, k):
  """Dataset ids of the k nearest same-class images to each query, by a full sort."""
  flat = images.reshape(len(images), -1).astype(np.float64)
  out = np.zeros((len(queries), k), np.int64)
  for i, (q, y) in enumerate(zip(queries.reshape(len(queries), -1), labels)):
    members = np.flatnonzero(all_labels == y)
    d = np.sum((flat[members] - q) ** 2, axis=1)
    out[i] = members[np.argsort(d, kind='stable')[:k]]
  return out


# ------------------------------------------------------------------------------ keys


def test_key_transforms_are_linear_and_match_loops():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
  y = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
  pool = keys_lib.KeyTransform('avg_pool', (8, 8, 2), pool=4)
  want = np.array([[x[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4, c].mean() for i in range(2)
                    for j in range(2) for c in range(2)] for n in range(3)])
  np.testing.assert_allclose(pool(x), want, rtol=1e-5, atol=1e-6)
  proj = keys_lib.KeyTransform('random_projection', (8, 8, 2), key_dim=16, seed=3)
  assert proj(x).shape == (3, 16) and pool.dim == 8 and proj.dim == 16
  for transform in (pool, proj, keys_lib.KeyTransform('flatten', (8, 8, 2))):
    np.testing.assert_allclose(transform(2 * x - 3 * y), 2 * transform(x) - 3 * transform(y),
                               rtol=1e-4, atol=1e-4)
  # A pure function of the seed, also after pickling into a worker.
  import pickle
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(proj))(x), proj(x))
  other = keys_lib.KeyTransform('random_projection', (8, 8, 2), key_dim=16, seed=4)
  assert not np.allclose(other(x), proj(x))


@pytest.mark.parametrize('kwargs,match', [
    ({'kind': 'pca'}, 'config.retrieval.key'),
    ({'kind': 'avg_pool', 'pool': 3}, 'key_pool'),
    ({'kind': 'random_projection', 'key_dim': 0}, 'key_dim'),
])
def test_bad_key_transforms(kwargs, match):
  with pytest.raises(ValueError, match=match):
    keys_lib.KeyTransform(sample_shape=(8, 8, 2), **kwargs)


# ------------------------------------------------------------------------------ search


def test_exact_search_equals_full_sort():
  rng = np.random.default_rng(1)
  keys = rng.normal(size=(1000, 12)).astype(np.float32)
  queries = rng.normal(size=(37, 12)).astype(np.float32)
  ids, d2 = index_lib.exact_search(queries, keys, 9, block=128)  # several blocks
  full = ((queries[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(ids, np.argsort(full, axis=1)[:, :9])
  np.testing.assert_allclose(d2, np.sort(full, axis=1)[:, :9], rtol=1e-4, atol=1e-4)


def test_noisy_neighbours_are_the_highest_likelihood_candidates(fmnist):
  """Nearest to x_t/α_t in flattened pixels == top-k of the Gaussian log-likelihood that the
  PAFM weights use (posterior.in_batch_proximity_scores), at several t."""
  images, labels = fmnist
  cls = np.flatnonzero(labels == 7)[:2000]
  cand = images[cls]
  rng = np.random.default_rng(2)
  path = paths.LinearPath()
  for t_val in (0.2, 0.6, 0.9):
    x0 = images[cls[:8]]
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.full(8, t_val, np.float32)
    x_t = (1 - t_val) * x0 + t_val * eps
    scores = np.asarray(posterior.in_batch_proximity_scores(
        jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(cand), path))
    top_likelihood = np.argsort(-scores.astype(np.float64), axis=1)[:, :K]
    nearest, _ = index_lib.exact_search((x_t / (1 - t_val)).reshape(8, -1),
                                        cand.reshape(len(cand), -1), K)
    overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(top_likelihood, nearest)])
    assert overlap >= 0.99, (t_val, overlap)  # float32 ties at most


@pytest.mark.slow
def test_scann_recall_on_fashion_mnist_keys(built, fmnist):
  """ScaNN recall@16 against exact search ≥ 0.95, for clean queries (x0) and noisy posterior
  queries x_t/α_t at t ≤ 0.7, where retrieval carries the posterior mass."""
  config, workdir = built
  images, labels = fmnist
  index = index_lib.NeighbourIndex.load(dataset_index.index_directory(config, workdir))
  rng = np.random.default_rng(3)
  ids = rng.choice(len(images), 300, replace=False)
  x0 = images[ids]
  for t_val in (0.0, 0.3, 0.5, 0.7):
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    query = ((1 - t_val) * x0 + t_val * eps) / (1 - t_val)
    got = index.search(query.reshape(300, -1), labels[ids], K)
    want = exact_class_neighbours(query, labels[ids], images, labels, K)
    assert np.all(labels[got] == labels[ids][:, None])  # same class
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(got, want)])
    assert recall >= 0.95, (t_val, recall)


@pytest.mark.slow
def test_moved_index_gives_the_same_results(built, fmnist, tmp_path):
  config, workdir = built
  images, labels = fmnist
  src = dataset_index.index_directory(config, workdir)
  queries = images[:64].reshape(64, -1)
  before = index_lib.NeighbourIndex.load(src).search(queries, labels[:64], K)
  moved = str(tmp_path / 'elsewhere' / 'copied_index')
  shutil.copytree(src, moved)
  # Also an index whose ScaNN assets were written with absolute paths of the old place.
  assets = os.path.join(moved, 'part_0', 'scann', 'scann_assets.pbtxt')
  text = open(assets).read().replace('asset_path: "', f'asset_path: "{src}/part_0/scann/')
  with open(assets, 'w') as f:
    f.write(text)
  meta_path = os.path.join(moved, index_lib.METADATA)
  meta = json.load(open(meta_path))
  meta['files']['part_0/scann/scann_assets.pbtxt'] = index_lib.sha256_file(assets)
  json.dump(meta, open(meta_path, 'w'))
  after = index_lib.NeighbourIndex.load(moved).search(queries, labels[:64], K)
  np.testing.assert_array_equal(after, before)


@pytest.mark.slow
def test_exact_backend_is_exact(fmnist_tfds_dir, fmnist, tmp_path):
  config = retrieval_config(fmnist_tfds_dir, **{'retrieval.backend': 'exact',
                                                 'retrieval.mode': 'clean'})
  index = dataset_index.build(config, str(tmp_path))
  images, labels = fmnist
  ids = np.arange(0, 60_000, 2_000)
  want = exact_class_neighbours(images[ids], labels[ids], images, labels, K + 1)[:, 1:]
  np.testing.assert_array_equal(index.clean_neighbours(ids, K), want)  # self excluded


# ------------------------------------------------------------------------------ the stage


def make_iterator(config, workdir, process_index=0, process_count=1, worker_count=0):
  config.data.worker_count = worker_count
  factory = retrieval_stage.stage_factory(config, workdir)[0]
  return pipeline.create_train_iterator(
      config.data, local_batch_size=32 // process_count, process_index=process_index,
      process_count=process_count, seed=5, extra_stage=factory)


@pytest.mark.slow
def test_stage_attaches_the_right_neighbours(built, fmnist):
  config, workdir = built
  images, labels = fmnist
  batch = next(make_iterator(config, workdir))
  b = len(batch['id'])
  assert batch['neighbours'].shape == (b, K, 28, 28, 1) and batch['eps'].shape == (b, 28, 28, 1)
  np.testing.assert_array_equal(batch['neighbours'], images[batch['neighbour_ids']])
  np.testing.assert_array_equal(batch['neighbour_labels'], labels[batch['neighbour_ids']])
  np.testing.assert_array_equal(batch['neighbour_labels'], np.repeat(batch['label'][:, None],
                                                                     K, 1))
  # The neighbours of the query x_t/α_t built from the batch's own t and ε, by a full sort.
  alpha = (1 - batch['t'])[:, None, None, None]
  x_t = alpha * batch['image'] + batch['t'][:, None, None, None] * batch['eps']
  want = exact_class_neighbours(x_t / alpha, batch['label'], images, labels, K)
  low_t = batch['t'] <= 0.7
  recall = np.mean([len(set(a) & set(w)) / K for a, w in
                    zip(batch['neighbour_ids'][low_t], want[low_t])])
  assert recall >= 0.95


@pytest.mark.slow
def test_stage_is_deterministic_resumable_and_process_independent(built):
  config, workdir = built
  first = make_iterator(config, workdir)
  stream = [next(first) for _ in range(4)]
  again = make_iterator(config, workdir)
  for want in stream:
    got = next(again)
    for field in want:
      np.testing.assert_array_equal(got[field], want[field])
  # Resume mid-epoch from the state after two batches.
  it = make_iterator(config, workdir)
  next(it), next(it)
  state = it.get_state()
  resumed = make_iterator(config, workdir)
  resumed.set_state(state)
  for want in stream[2:]:
    got = next(resumed)
    for field in want:
      np.testing.assert_array_equal(got[field], want[field])
  # Two processes: disjoint halves of the same global batch, with the same t, ε, neighbours.
  halves = [next(make_iterator(config, workdir, p, 2)) for p in range(2)]
  assert not set(halves[0]['id']) & set(halves[1]['id'])
  for field in stream[0]:
    np.testing.assert_array_equal(np.concatenate([h[field] for h in halves]), stream[0][field])


@pytest.mark.slow
def test_stage_runs_in_worker_processes(built):
  config, workdir = built
  inproc = make_iterator(config, workdir)
  mp = make_iterator(config, workdir, worker_count=1)
  try:
    for _ in range(2):
      a, b = next(inproc), next(mp)
      for field in a:
        np.testing.assert_array_equal(a[field], b[field])
  finally:
    mp.close()


def test_host_noise_follows_the_training_laws():
  rng = np.random.default_rng(0)
  for kind in paths.T_SAMPLINGS:
    host = np.sort([paths.host_sample_t(rng, kind) for _ in range(20_000)])
    dev = np.sort(np.asarray(objectives.sample_t(jax.random.key(0), 20_000, kind)))
    ks = np.max(np.abs(np.searchsorted(host, dev) / 20_000 - np.arange(1, 20_001) / 20_000))
    assert ks < 0.02, (kind, ks)  # two-sample KS, 20 000 each: 1 % critical value ≈ 0.016
  t = np.linspace(0, 1, 11, dtype=np.float32)
  for name in paths.PATHS:
    path = paths.get_path(name)
    a, s = path.alpha(t), path.sigma(t)  # numpy in, numpy formulas: what the stage uses
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    np.testing.assert_allclose(a, np.asarray(path.alpha(jnp.asarray(t))), atol=1e-6)
    np.testing.assert_allclose(s, np.asarray(path.sigma(jnp.asarray(t))), atol=1e-6)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_mismatched_index_names_the_build_command(built, fmnist_tfds_dir):
  config, workdir = built
  for override in ({'retrieval.key': 'avg_pool'}, {'data.split': 'test'},
                   {'objective.pafm.condition': 'text'}):
    other = retrieval_config(fmnist_tfds_dir, **{'retrieval.index_dir':
                                                 dataset_index.index_directory(config, workdir),
                                                 **override})
    with pytest.raises(index_lib.RetrievalIndexError, match='--mode=build_index'):
      dataset_index.ensure(other, workdir)


def test_missing_index_without_auto_build(fmnist_tfds_dir, tmp_path):
  config = retrieval_config(fmnist_tfds_dir, **{'retrieval.auto_build': False})
  with pytest.raises(index_lib.RetrievalIndexError, match='--mode=build_index'):
    dataset_index.ensure(config, str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_k_larger_than_a_class(fmnist_tfds_dir, tmp_path):
  config = retrieval_config(fmnist_tfds_dir, **{'retrieval.k': 6001,
                                                 'retrieval.backend': 'exact'})
  with pytest.raises(ValueError, match='config.retrieval.k=6001'):
    dataset_index.build(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing half-written


@pytest.mark.slow
def test_corrupted_index_file_is_named(built, tmp_path):
  config, workdir = built
  moved = str(tmp_path / 'index')
  shutil.copytree(dataset_index.index_directory(config, workdir), moved)
  victim = os.path.join(moved, 'part_3', 'scann', 'hashed_dataset.npy')
  with open(victim, 'r+b') as f:
    f.seek(200)
    f.write(b'\xff\x00\xff')
  with pytest.raises(index_lib.RetrievalIndexError, match='part_3/scann/hashed_dataset.npy'):
    index_lib.NeighbourIndex.load(moved)
  with open(os.path.join(moved, index_lib.METADATA), 'w') as f:
    f.write('{"format": 1, "files": {')
  with pytest.raises(index_lib.RetrievalIndexError, match='metadata.json'):
    index_lib.NeighbourIndex.load(moved)


def test_index_directory_is_local_for_bucket_workdirs(tmp_path):
  config = retrieval_config('')
  assert dataset_index.index_directory(config, str(tmp_path)) == str(
      tmp_path / 'retrieval_index')
  local = dataset_index.index_directory(config, 'gs://bucket/runs/sit_xl2')
  assert local == os.path.expanduser('~/.cache/pafm_jax/retrieval_index/sit_xl2')
  config.retrieval.index_dir = 'gs://bucket/index'
  with pytest.raises(ValueError, match='must be a local path'):
    dataset_index.index_directory(config, str(tmp_path))
