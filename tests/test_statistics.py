"""Intervals and noise floors against scipy and closed forms."""

import numpy as np
import pytest
from scipy import stats

from pafm_jax.evaluation import frechet, statistics


def test_paired_difference_interval_is_scipys_paired_t_interval():
  rng = np.random.default_rng(0)
  a, b = rng.normal(1.0, 2.0, 5), rng.normal(0.0, 2.0, 5)
  got = statistics.paired_difference(a, b, confidence=0.95)
  ref = stats.ttest_rel(a, b).confidence_interval(0.95)
  np.testing.assert_allclose([got['low'], got['high']], [ref.low, ref.high], rtol=1e-12)
  np.testing.assert_allclose(got['mean'], np.mean(a - b), rtol=1e-12)
  np.testing.assert_allclose(got['std'], np.std(a - b, ddof=1), rtol=1e-12)
  assert got['n'] == 5
  single = statistics.paired_difference([2.0], [0.5])
  assert single['mean'] == 1.5 and single['low'] is None and single['std'] is None
  with pytest.raises(ValueError):
    statistics.paired_difference([], [])


def test_paired_interval_covers_the_true_difference_at_its_confidence():
  """Over 4 000 experiments of 3 seeds, the 95 % interval holds the true effect ≈ 95 % of the
  time (binomial sd 0.34 %)."""
  rng = np.random.default_rng(1)
  hits = 0
  for _ in range(4000):
    shared = rng.normal(size=3)                      # the seed's common part cancels
    r = statistics.paired_difference(shared + 0.7 + rng.normal(0, 0.5, 3),
                                     shared + rng.normal(0, 0.5, 3))
    hits += r['low'] <= 0.7 <= r['high']
  assert abs(hits / 4000 - 0.95) < 0.015


def test_bootstrap_of_a_mean_has_the_closed_form_spread():
  """The ideal bootstrap std of a sample mean is σ̂·√((n − 1)/n)/√n (σ̂ with ddof = 1)."""
  x = np.random.default_rng(2).exponential(size=400)
  got = statistics.bootstrap(np.mean, x, num_resamples=4000, seed=3)
  expected = np.std(x, ddof=0) / np.sqrt(len(x))
  assert abs(got['std'] / expected - 1) < 0.05, (got['std'], expected)
  assert got['low'] < np.mean(x) < got['high']


def test_fd_noise_floor_shrinks_like_one_over_root_n():
  """Between two Gaussians with different means, FD's sampling spread is dominated by the mean
  term, whose std falls as 1/√N: 4× the samples, half the spread."""
  rng = np.random.default_rng(4)
  d = 4
  ref_mu, ref_sigma = np.zeros(d), np.eye(d)
  small = statistics.fd_noise_floor(rng.normal(1.0, 1.0, (500, d)), ref_mu, ref_sigma,
                                    num_resamples=400, seed=5)
  large = statistics.fd_noise_floor(rng.normal(1.0, 1.0, (2000, d)), ref_mu, ref_sigma,
                                    num_resamples=400, seed=5)
  assert 1.6 < small['std'] / large['std'] < 2.5, (small, large)
  # Closed form of the leading term: Var ‖μ̂ − μ_ref‖² ≈ 4·‖Δ‖²/N for unit covariance.
  np.testing.assert_allclose(large['std'], np.sqrt(4 * d / 2000), rtol=0.25)
  assert frechet.frechet_distance(np.ones(d), np.eye(d), ref_mu, ref_sigma) == pytest.approx(d)


def test_half_sample_spread_of_a_mean_is_the_standard_error():
  """Halves drawn without replacement vary around the full mean with variance s²/N (finite
  population correction at m = N/2): the standard error of the N-row mean."""
  x = np.random.default_rng(6).exponential(size=2000)
  got = statistics.half_sample_spread(np.mean, x, num_resamples=3000, seed=7)
  expected = np.std(x, ddof=1) * np.sqrt(1 / 1000 - 1 / 2000)
  assert abs(got['std'] / expected - 1) < 0.05, (got['std'], expected)
  # … which is the standard error of the 2 000-row mean, s/√N.
  np.testing.assert_allclose(expected, np.std(x, ddof=1) / np.sqrt(2000), rtol=1e-12)
  with pytest.raises(ValueError, match='num_resamples'):
    statistics.half_sample_spread(np.mean, x, num_resamples=1)


def test_recall_noise_floor_from_halves_matches_independent_sample_sets():
  """Recall's sampling noise measured the direct way — its std over 200 independent generated
  sets — against the half-sample estimate taken from single sets (mean over 20 of them)."""
  from pafm_jax.evaluation import manifold  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(8)
  real = rng.normal(size=(600, 3))

  def fake_set():
    return rng.normal(0.4, 0.8, size=(400, 3))

  def recall(f):
    return float(np.mean(manifold.inside(real, f, 3)))

  truth = np.std([recall(fake_set()) for _ in range(200)], ddof=1)
  estimates = [statistics.half_sample_spread(recall, fake_set(), num_resamples=40, seed=i)['std']
               for i in range(20)]
  # The truth's own sd is ≈ 5 % (200 sets); the estimate's mean over 20 sets ≈ 3 %.
  assert 0.75 < np.mean(estimates) / truth < 1.3, (np.mean(estimates), truth)
