"""PAFM's posterior module and the PAFM / StableVM targets against independent truths.

Truths used: exact identities (K = 1 is FM, duplicates removed, a stratum that is the whole
class), brute-force float64 numpy posteriors over every item of a real Fashion-MNIST class,
the closed-form marginal velocity of a Gaussian mixture (METHOD.md §3), and a Python deque
as the reference of the FIFO memory bank.
"""

import collections
import gzip
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist_sit
from pafm_jax import config_checks, objectives, paths, posterior
from pafm_jax.data import fashion_mnist

NULL = 10


def _fmnist_train(idx_dir=fashion_mnist.DEFAULT_IDX_DIR):
  """Train images in [−1, 1] as float64 [60000, 784] and labels, read straight from the IDX."""
  with gzip.open(os.path.join(idx_dir, 'train-images-idx3-ubyte.gz')) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
  with gzip.open(os.path.join(idx_dir, 'train-labels-idx1-ubyte.gz')) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  return images.astype(np.float64) / 127.5 - 1.0, labels.astype(np.int32)


def _np_coefficients(path, t):
  t = np.asarray(t, np.float64)
  alpha = np.asarray(path.alpha(t), np.float64)
  sigma = np.asarray(path.sigma(t), np.float64)
  d_alpha = np.asarray(path.d_alpha(t), np.float64)
  d_sigma = np.asarray(path.d_sigma(t), np.float64)
  return alpha, sigma, d_sigma / sigma, d_alpha - d_sigma * alpha / sigma


def _np_marginal_velocity(path, x_t, t, cand, log_prior=None):
  """Brute force, float64: Σ_j softmax_j(−‖x_t − α·c_j‖²/(2σ²) + log_prior_j)·v(x_t | c_j).

  x_t [B, D], t [B], cand [B, K, D] or [K, D] (shared) → [B, D].
  """
  alpha, sigma, a, b = _np_coefficients(path, t)
  cand = np.broadcast_to(cand, (x_t.shape[0],) + cand.shape[-2:])
  d2 = np.sum((x_t[:, None, :] - alpha[:, None, None] * cand) ** 2, axis=-1)
  logits = -d2 / (2 * sigma[:, None] ** 2)
  if log_prior is not None:
    logits = logits + log_prior
  logits -= logits.max(axis=1, keepdims=True)
  w = np.exp(logits)
  w /= w.sum(axis=1, keepdims=True)
  v = a[:, None, None] * x_t[:, None, :] + b[:, None, None] * cand
  return np.einsum('bk,bkd->bd', w, v), w


def _rel_err(x, ref):
  return np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref)


# ------------------------------------------------------------------------ identities


def test_k1_is_fm_exactly_and_weights_are_a_distribution():
  rng = np.random.default_rng(0)
  path = paths.get_path('linear')
  x0 = jnp.asarray(rng.normal(size=(6, 4, 4, 2)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(6, 4, 4, 2)), jnp.float32)
  t = jnp.asarray([0.0, 1e-6, 0.2, 0.5, 0.9, 1.0], jnp.float32)
  x_t = paths.interpolate(path, x0, eps, t)
  fm = paths.conditional_velocity(path, x0, eps, t)
  # One sample per batch: its own endpoint is the only candidate.
  for i in range(6):
    sl = slice(i, i + 1)
    target, diag = objectives.pafm_target(
        path, x_t[sl], t[sl], x0[sl], eps[sl], jnp.asarray([3]), {'label': jnp.asarray([3])},
        options=objectives.PAFMOptions(), null_label=NULL)
    np.testing.assert_array_equal(np.asarray(target), np.asarray(fm[sl]))
    assert float(diag['ess'][0]) == 1.0
  w = posterior.snis_weights(x_t, t, x0[:, None], jnp.zeros((6, 1)), path)
  np.testing.assert_array_equal(np.asarray(w), np.ones((6, 1)))

  # Many candidates: rows sum to 1, masked classes get exactly 0, permutation-equivariant.
  cands = jnp.asarray(rng.normal(size=(6, 9, 4, 4, 2)), jnp.float32)
  cand_labels = jnp.asarray(rng.integers(0, 3, size=(6, 9)))
  labels = jnp.asarray([0, 1, 2, NULL, 0, 1])
  cands = cands.at[:, 0].set(x0)
  cand_labels = cand_labels.at[:, 0].set(jnp.asarray([0, 1, 2, 2, 0, 1]))
  cond = posterior.class_condition_logp(labels, cand_labels, NULL)
  w = np.asarray(posterior.snis_weights(x_t, t, cands, cond, path))
  np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
  masked = np.asarray(cand_labels != labels[:, None]) & np.asarray(labels != NULL)[:, None]
  assert masked.any() and np.all(w[masked] == 0.0)
  perm = rng.permutation(9)
  w_perm = np.asarray(posterior.snis_weights(x_t, t, cands[:, perm], cond[:, perm], path))
  np.testing.assert_allclose(w_perm, w[:, perm], rtol=1e-5, atol=1e-7)
  v = posterior.mixture_velocity(x_t, t, cands, jnp.asarray(w), path)
  v_perm = posterior.mixture_velocity(x_t, t, cands[:, perm], jnp.asarray(w_perm), path)
  np.testing.assert_allclose(np.asarray(v_perm), np.asarray(v), rtol=1e-5, atol=1e-5)


def test_limits_are_finite_one_hot_and_uniform_in_high_dimension():
  """t → 0: weights one-hot on the own endpoint; t → 1: uniform; D = 50 000: nothing overflows."""
  rng = np.random.default_rng(1)
  d, k = 50_000, 8
  path = paths.get_path('linear')
  cands = jnp.asarray(rng.uniform(-1, 1, size=(1, k, d)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(1, d)), jnp.float32)
  for t_val in (0.0, 1e-7, 1e-4, 0.5, 0.999, 1.0 - 1e-7, 1.0):
    t = jnp.asarray([t_val], jnp.float32)
    x_t = paths.interpolate(path, cands[:, 2], eps, t)
    w = np.asarray(posterior.snis_weights(x_t, t, cands, jnp.zeros((1, k)), path))
    v = np.asarray(posterior.mixture_velocity(x_t, t, cands, jnp.asarray(w), path))
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(v)), t_val
    if t_val <= 0.5:
      np.testing.assert_array_equal(w[0], np.eye(k)[2])
    if t_val == 1.0:
      np.testing.assert_allclose(w[0], np.full(k, 1 / k), rtol=1e-6)
    target = posterior.target_from_own_endpoint(path, cands[:, 2], eps, t,
                                                posterior.posterior_mean(jnp.asarray(w), cands))
    assert np.all(np.isfinite(np.asarray(target)))


# ----------------------------------------------------------- exact empirical marginal


@pytest.mark.parametrize('path_name', ['linear', 'cosine'])
def test_whole_class_as_candidates_is_the_empirical_marginal(path_name):
  """Every Fashion-MNIST item of the class as a candidate gives the brute-force marginal."""
  images, labels = _fmnist_train()
  cls = images[labels == 7]                                   # 6 000 sneakers
  path = paths.get_path(path_name)
  rng = np.random.default_rng(2)
  b = 4
  x0 = cls[rng.choice(len(cls), b, replace=False)]
  eps = rng.normal(size=x0.shape)
  for t_val in (0.3, 0.6, 0.9, 0.99):
    t = np.full(b, t_val)
    alpha, sigma, _, _ = _np_coefficients(path, t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    truth, _ = _np_marginal_velocity(path, x_t, t, cls)
    cand = jnp.broadcast_to(jnp.asarray(cls, jnp.float32), (b,) + cls.shape)
    w = posterior.snis_weights(jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32),
                               cand, jnp.zeros((b, len(cls))), path)
    v = posterior.mixture_velocity(jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32),
                                   cand, w, path)
    assert _rel_err(v, truth) < 1e-4, (t_val, _rel_err(v, truth))


@pytest.mark.parametrize('path_name', ['linear', 'cosine'])
def test_in_batch_target_is_the_brute_force_posterior_over_the_batch(path_name):
  """The Gram-matmul in-batch target equals the float64 posterior over the batch's endpoints."""
  images, labels = _fmnist_train()
  rng = np.random.default_rng(3)
  idx = rng.choice(len(images), 256, replace=False)
  x0, y = images[idx], labels[idx]
  eps = rng.normal(size=x0.shape)
  t = np.sort(rng.uniform(0.3, 1.0, size=256))
  cond = rng.uniform(size=256) < 0.2
  cond_labels = np.where(cond, NULL, y)
  path = paths.get_path(path_name)
  alpha, sigma, _, _ = _np_coefficients(path, t)
  x_t = alpha[:, None] * x0 + sigma[:, None] * eps
  mask = (y[None, :] == cond_labels[:, None]) | cond[:, None]
  truth, w_truth = _np_marginal_velocity(path, x_t, t, x0, np.where(mask, 0.0, -np.inf))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  target, diag = objectives.pafm_target(
      path, f32(x_t), f32(t), f32(x0), f32(eps), jnp.asarray(cond_labels),
      {'label': jnp.asarray(y)}, options=objectives.PAFMOptions(), null_label=NULL)
  assert _rel_err(target, truth) < 1e-4
  np.testing.assert_allclose(diag['ess'], 1 / np.sum(w_truth**2, axis=1), rtol=1e-3)


# ---------------------------------------------------------- Gaussian-mixture closed form


def _gmm_marginal_velocity(path, x, t, pis, mus, variances):
  """METHOD.md §3: u = a·x + b·Σ_k r_k·E[x0 | x, k] for p0 = Σ π_k N(μ_k, diag s²_k)."""
  alpha, sigma, a, b = _np_coefficients(path, t)
  al, s2 = alpha[:, None, None], sigma[:, None, None] ** 2
  var_t = al**2 * variances[None] + s2                                  # [N, K, D]
  r = x[:, None, :] - al * mus[None]
  logr = np.log(pis)[None] - 0.5 * np.sum(r**2 / var_t + np.log(var_t), axis=-1)
  logr -= logr.max(axis=1, keepdims=True)
  resp = np.exp(logr)
  resp /= resp.sum(axis=1, keepdims=True)
  mean_k = mus[None] + al * variances[None] / var_t * r
  return a[:, None] * x + b[:, None] * np.einsum('nk,nkd->nd', resp, mean_k)


def test_gmm_target_is_unbiased_for_the_marginal_and_beats_fm_for_t_above_half():
  rng = np.random.default_rng(4)
  pis = np.array([0.5, 0.3, 0.2])
  mus = np.array([[2.0, 0, 0, 1], [-2.0, 1, 0, 0], [0, -2.0, 1, -1]])
  variances = np.array([[0.1, 0.2, 0.1, 0.3], [0.3, 0.1, 0.2, 0.1], [0.2, 0.2, 0.2, 0.2]])
  path = paths.get_path('linear')
  batch, n_batches = 32, 300
  step = jax.jit(lambda x_t, t, x0, eps, y: objectives.pafm_target(
      path, x_t, t, x0, eps, y, {'label': jnp.zeros_like(y)},
      options=objectives.PAFMOptions(), null_label=NULL)[0])
  for t_val in (0.5, 0.7, 0.9, 0.99):
    diffs_pafm, diffs_fm = [], []
    for _ in range(n_batches):
      comp = rng.choice(3, size=batch, p=pis)
      x0 = mus[comp] + np.sqrt(variances[comp]) * rng.normal(size=(batch, 4))
      eps = rng.normal(size=(batch, 4))
      t = np.full(batch, t_val)
      alpha, sigma, _, _ = _np_coefficients(path, t)
      x_t = alpha[:, None] * x0 + sigma[:, None] * eps
      u = _gmm_marginal_velocity(path, x_t, t, pis, mus, variances)
      f32 = lambda a: jnp.asarray(a, jnp.float32)
      target = np.asarray(step(f32(x_t), f32(t), f32(x0), f32(eps),
                               jnp.full((batch,), NULL)), np.float64)
      diffs_pafm.append(target - u)
      diffs_fm.append(-x0 + eps - u)   # linear-path FM target ε − x0
    dp, df = np.stack(diffs_pafm), np.stack(diffs_fm)       # [batches, B, D]
    # Unbiased (the own endpoint is a posterior draw, the others prior draws): the mean error
    # is zero within Monte-Carlo error in every dimension. Rows of one batch share their
    # candidates, so the independent replicates are the batches, not the rows.
    batch_means = dp.mean(axis=1)
    se = batch_means.std(axis=0) / math.sqrt(n_batches)
    np.testing.assert_array_less(np.abs(batch_means.mean(axis=0)), 4 * se)
    err_pafm, err_fm = np.mean(np.sum(dp**2, -1)), np.mean(np.sum(df**2, -1))
    assert err_pafm < err_fm, (t_val, err_pafm, err_fm)


# --------------------------------------------------------------- combining sources


def _synthetic_dataset(rng, classes=3, per_class=24, d=16):
  x = rng.normal(size=(classes * per_class, d)) + 3 * np.repeat(
      rng.normal(size=(classes, d)), per_class, axis=0)
  return x, np.repeat(np.arange(classes), per_class).astype(np.int32)


def test_duplicates_of_in_batch_items_among_neighbours_are_not_counted_twice():
  rng = np.random.default_rng(5)
  x, y = _synthetic_dataset(rng)
  perm = rng.permutation(len(x))[:32]
  x0, labels, ids = x[perm], y[perm], perm.astype(np.int32)
  eps = rng.normal(size=x0.shape)
  t = rng.uniform(0.4, 1.0, size=32)
  path = paths.get_path('linear')
  x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  # Every row's "neighbours" are 4 items of the batch itself (with their ids): nothing new.
  nbr_pos = np.stack([rng.choice(32, 4, replace=False) for _ in range(32)])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  batch = {'label': jnp.asarray(labels), 'id': jnp.asarray(ids),
           'neighbours': f32(x0[nbr_pos]), 'neighbour_labels': jnp.asarray(labels[nbr_pos]),
           'neighbour_ids': jnp.asarray(ids[nbr_pos])}
  args = (path, f32(x_t), f32(t), f32(x0), f32(eps), jnp.asarray(labels), batch)
  only_batch, _ = objectives.pafm_target(*args, options=objectives.PAFMOptions('batch'),
                                         null_label=NULL)
  both, _ = objectives.pafm_target(*args, options=objectives.PAFMOptions('batch+retrieved'),
                                   null_label=NULL)
  np.testing.assert_allclose(np.asarray(both), np.asarray(only_batch), rtol=1e-5, atol=1e-5)


def test_stratified_with_the_whole_class_in_the_batch_is_the_exact_marginal():
  """When the batch holds every item, each stratum's weight log((N_c − k)/|R|) is 0 and S ∪ R
  is the whole class (or, for a null condition, the whole dataset): the exact marginal."""
  rng = np.random.default_rng(6)
  x, y = _synthetic_dataset(rng)
  n, k = len(x), 4
  perm = rng.permutation(n)
  x0, labels, ids = x[perm], y[perm], perm.astype(np.int32)
  eps = rng.normal(size=x0.shape)
  t = rng.uniform(0.3, 1.0, size=n)
  path = paths.get_path('cosine')
  alpha, sigma, _, _ = _np_coefficients(path, t)
  x_t = alpha[:, None] * x0 + sigma[:, None] * eps
  cond_labels = np.where(rng.uniform(size=n) < 0.25, NULL, labels)
  # Noisy neighbours: the k same-class items nearest to x_t/α.
  nbr = np.stack([np.flatnonzero(y == labels[i])[np.argsort(np.sum(
      (x[y == labels[i]] - x_t[i] / alpha[i]) ** 2, axis=1))[:k]] for i in range(n)])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  batch = {'label': jnp.asarray(labels), 'id': jnp.asarray(ids), 'neighbours': f32(x[nbr]),
           'neighbour_labels': jnp.asarray(y[nbr]), 'neighbour_ids': jnp.asarray(nbr, jnp.int32)}
  options = objectives.PAFMOptions('batch+retrieved', stratified=True,
                                   class_sizes=tuple(np.bincount(y)))
  target, _ = objectives.pafm_target(path, f32(x_t), f32(t), f32(x0), f32(eps),
                                     jnp.asarray(cond_labels), batch, options=options,
                                     null_label=NULL)
  mask = (y[None, :] == cond_labels[:, None]) | (cond_labels == NULL)[:, None]
  truth, _ = _np_marginal_velocity(path, x_t, t, x, np.where(mask, 0.0, -np.inf))
  assert _rel_err(target, truth) < 1e-4


def test_text_condition_term_is_cosine_over_tau_shifted_and_null_allows_all():
  rng = np.random.default_rng(8)
  e = rng.normal(size=(5, 6))
  c = rng.normal(size=(5, 7, 6))
  is_null = np.array([False, True, False, False, True])
  got = np.asarray(posterior.text_condition_logp(jnp.asarray(e), jnp.asarray(c),
                                                 jnp.asarray(is_null), 0.07))
  cos = np.einsum('be,bke->bk', e / np.linalg.norm(e, axis=1, keepdims=True),
                  c / np.linalg.norm(c, axis=2, keepdims=True))
  np.testing.assert_allclose(got, np.where(is_null[:, None], 0.0, (cos - 1) / 0.07), rtol=1e-5,
                             atol=1e-5)


# --------------------------------------------------------------------- StableVM bank


def test_memory_bank_is_a_fifo_per_class_plus_a_global_pool():
  bank = objectives.MemoryBank(num_classes=3, capacity=4, image_shape=(1,))
  memory = bank.init()
  rng = np.random.default_rng(9)
  reference = [collections.deque(maxlen=4) for _ in range(4)]
  value = 0
  for size in (3, 7, 2, 12, 5):
    labels = rng.integers(0, 3, size=size)
    if size == 12:
      labels[:] = 1   # more arrivals of one class than its capacity in one push
    images = np.arange(value, value + size, dtype=np.float32)[:, None]
    value += size
    memory = jax.jit(bank.push)(memory, jnp.asarray(images), jnp.asarray(labels))
    for v, lab in zip(images[:, 0], labels):
      reference[lab].append(v)
      reference[3].append(v)
    for row in range(4):
      count, head = int(memory['count'][row]), int(memory['next'][row])
      stored = [float(memory['images'][row, (head - count + i) % 4, 0]) for i in range(count)]
      assert stored == list(reference[row]), (row, stored, list(reference[row]))

  labels, x0, cands, valid = bank.draw(memory, jax.random.key(0), 4000, 0.1)
  labels, x0, cands, valid = map(np.asarray, (labels, x0, cands, valid))
  assert abs(np.mean(labels == 3) - 0.1) < 0.03
  for lab in range(4):
    members = set(reference[lab])
    assert set(x0[labels == lab, 0]) <= members
    np.testing.assert_array_equal(valid[labels == lab].sum(axis=1), len(members))


def test_stablevm_target_is_snis_over_the_bank_above_t_min_and_fm_below():
  rng = np.random.default_rng(10)
  b, cap, d = 16, 6, 8
  cands = rng.normal(size=(b, cap, d))
  valid = np.arange(cap)[None, :] < rng.integers(1, cap + 1, size=(b, 1))
  x0 = cands[:, 0]
  eps = rng.normal(size=(b, d))
  t = np.linspace(0.05, 0.99, b)
  path = paths.get_path('linear')
  x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  target, _ = objectives.stablevm_target(
      path, f32(x_t), f32(t), f32(x0), f32(eps), jnp.zeros(b, jnp.int32),
      {'bank_candidates': f32(cands), 'bank_valid': jnp.asarray(valid)}, t_min=0.5)
  snis, _ = _np_marginal_velocity(path, x_t, t, cands, np.where(valid, 0.0, -np.inf))
  high = t >= 0.5
  assert _rel_err(np.asarray(target)[high], snis[high]) < 1e-5
  fm = paths.conditional_velocity(path, f32(x0), f32(eps), f32(t))
  np.testing.assert_array_equal(np.asarray(target)[~high], np.asarray(fm)[~high])


# --------------------------------------------------------------------- config errors


def test_objective_config_errors_are_raised_before_any_work():
  c = fmnist_sit.get_config()
  c.retrieval.mode = 'none'
  c.objective.pafm.sources = 'batch+retrieved'
  with pytest.raises(ValueError, match='config.retrieval.mode'):
    config_checks.validate(c, 1, 1)
  c.retrieval.mode = 'noisy'
  c.objective.pafm.sources = 'batch'
  c.objective.pafm.stratified = True
  with pytest.raises(ValueError, match="sources='batch\\+retrieved'"):
    config_checks.validate(c, 1, 1)
  c.objective.pafm.stratified = False
  c.objective.pafm.sources = 'faiss'
  with pytest.raises(ValueError, match='config.objective.pafm.sources'):
    config_checks.validate(c, 1, 1)
