"""The variance-curve tool on real Fashion-MNIST reproduces METHOD.md §3's ordering.

The truth is the exact empirical marginal u*, computed by brute force over every training item
of the class (its correctness against a float64 numpy posterior is tested in test_posterior).
"""

import pytest

from configs import fmnist_sit
from pafm_jax.tools import variance


pytestmark = pytest.mark.slow  # trains, or spawns processes


def test_variance_curves_reproduce_the_method_ordering(fmnist_tfds_dir):
  config = fmnist_sit.get_config()
  config.data.tfds_dir = fmnist_tfds_dir
  times = (0.5, 0.7, 0.9, 0.99)
  r = variance.measure(config, times, num_batches=1, batch_size=256, seed=0)
  ratio = {n: [f / e for f, e in zip(r['fm'], r[n])] for n in variance.ESTIMATORS}
  for i, t in enumerate(times):
    # Stratified in-batch + noisy-kNN is ≥ 10× closer to u* than FM at every t ≥ 0.5 ...
    assert ratio['stratified64'][i] >= 10, (t, ratio['stratified64'][i])
    # ... and never worse than either of its sources alone (METHOD.md: "beats either source").
    assert r['stratified64'][i] <= 1.05 * min(r['in_batch'][i], r['noisy16'][i]), t
  # In-batch candidates do nothing at t = 0.5 (the class's other items are too far away) and
  # help more and more towards noise; clean kNN helps where in-batch cannot.
  assert ratio['in_batch'][0] < 1.2 and ratio['in_batch'][2] > 4 and ratio['in_batch'][3] > 10
  assert ratio['batch+clean16'][0] > 2 * ratio['in_batch'][0]
  # Noisy neighbours hold the posterior mass at moderate t: 10²–10⁴× at t ≤ 0.7.
  assert ratio['noisy16'][0] > 1e3 and ratio['noisy16'][1] > 10
  # StableVM equals FM below its t_min = 0.5 boundary and improves on it above.
  assert all(x > 1 for x in ratio['stablevm'])
