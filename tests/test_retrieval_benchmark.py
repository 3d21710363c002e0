"""The pieces of benchmarks/retrieval.py that its figures rest on, against independent truths:
scipy's DCT (the latent basis), regenerating the stream in other blocks (the synthetic data is
a function of (seed, item) alone), a float64 full sort (the streamed 4096-dim truth) and a
hand-counted example (recall)."""

import numpy as np
import pytest
import scipy.fft

from benchmarks import retrieval as bench
from pafm_jax.retrieval import index as index_lib


def test_dct_rows_are_scipys_orthonormal_dct():
  # scipy's DCT-II of the identity, norm='ortho': column n of the result is basis vector n.
  want = scipy.fft.dct(np.eye(32), type=2, norm='ortho', axis=0)[:8]
  np.testing.assert_allclose(bench.dct_rows(32, 8), want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('kind,n', [('flat', 9000), ('latent', 5000)])
def test_stream_is_a_function_of_seed_and_item(kind, n):
  def make(seed):
    return bench.ClusteredData(kind, seed=seed, clusters=50)

  whole, clusters = make(3).block(0, n)
  cuts = [0, 1, 1000, bench.CHUNK - 1, bench.CHUNK + 7, n]  # blocks across chunk edges
  again = make(3)
  pieces = [again.block(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
  np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), whole)
  np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), clusters)
  np.testing.assert_array_equal(again.block(n - 10, n + 5)[0][:10], whole[-10:])
  assert whole.shape == (n, 256 if kind == 'flat' else 4096) and whole.dtype == np.float32
  assert not np.allclose(make(4).block(0, 100)[0], whole[:100])
  assert len(np.unique(clusters)) > 40  # items spread over the clusters


def test_streamed_top_k_equals_a_full_sort():
  rng = np.random.default_rng(0)
  items = rng.standard_normal((3000, 12)).astype(np.float32)
  queries = rng.standard_normal((20, 12)).astype(np.float32)
  k = 16
  ids, d = np.zeros((20, 0), np.int64), np.zeros((20, 0), np.float32)
  for start in range(0, 3000, 700):  # the last block is short
    block = items[start:start + 700]
    got_ids, got_d = index_lib.exact_search(queries, block, k)
    ids, d = bench.merge_top_k(ids, d, got_ids + start, got_d, k)
  full = np.sum((queries[:, None].astype(np.float64) - items[None]) ** 2, axis=-1)
  want = np.argsort(full, axis=1)[:, :k]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(d, np.take_along_axis(full, want, 1), rtol=1e-4)


def test_recall_counts_shared_ids_whatever_their_order():
  found = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  truth = np.array([[4, 3, 9, 8], [8, 7, 6, 5]])
  assert bench.recall_at_k(found, truth) == pytest.approx((2 / 4 + 4 / 4) / 2)
