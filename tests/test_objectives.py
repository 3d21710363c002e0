"""Paths, the FM objective, time sampling, EMA warm-up and the ODE samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist_sit
from pafm_jax import objectives, paths, sampling, train_state


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_path_endpoints_and_derivatives(name):
  path = paths.get_path(name)
  with jax.enable_x64(True):
    t = jnp.linspace(0.01, 0.99, 50, dtype=jnp.float64)
    h = 1e-6
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
      fd = (f(t + h) - f(t - h)) / (2 * h)
      np.testing.assert_allclose(df(t), fd, rtol=1e-7, atol=1e-8)
    ends = jnp.array([0.0, 1.0], jnp.float64)
    np.testing.assert_allclose(path.alpha(ends), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(path.sigma(ends), [0.0, 1.0], atol=1e-12)


@pytest.mark.parametrize('name', ['linear', 'cosine'])
def test_fm_target_is_time_derivative_of_x_t(name):
  """The FM target α̇·x0 + σ̇·ε equals d x_t / dt for fixed (x0, ε), by finite differences."""
  path = paths.get_path(name)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x0 = jnp.asarray(rng.normal(size=(6, 4, 4, 2)))
    eps = jnp.asarray(rng.normal(size=(6, 4, 4, 2)))
    t = jnp.asarray(rng.uniform(0.05, 0.95, size=6))
    h = 1e-6
    fd = (paths.interpolate(path, x0, eps, t + h) - paths.interpolate(path, x0, eps, t - h)) / (2 * h)
    target, _ = objectives.fm_target(path, None, t, x0, eps, None, {})
    np.testing.assert_allclose(target, fd, rtol=1e-6, atol=1e-7)


def test_lognormal_t_is_logit_normal():
  """t = 1 − 1/(1 + exp(1.2 n − 1.2)) ⇔ logit(t) ~ N(−1.2, 1.2²)."""
  t = np.asarray(objectives.sample_t(jax.random.key(0), 200_000, 'lognormal'), np.float64)
  logit = np.log(t) - np.log1p(-t)
  n = logit.size
  assert abs(logit.mean() + 1.2) < 5 * 1.2 / math.sqrt(n)
  assert abs(logit.std() - 1.2) < 5 * 1.2 / math.sqrt(2 * n)


def test_uniform_t_and_label_drop_rates():
  n = 200_000
  t = np.asarray(objectives.sample_t(jax.random.key(1), n, 'uniform'))
  assert t.min() >= 0 and t.max() < 1
  assert abs(t.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
  labels = jnp.zeros((n,), jnp.int32)
  dropped = np.asarray(objectives.drop_labels(jax.random.key(2), labels, 0.1, 10))
  assert set(np.unique(dropped)) == {0, 10}
  assert abs((dropped == 10).mean() - 0.1) < 5 * math.sqrt(0.09 / n)


def test_unknown_names_raise():
  with pytest.raises(ValueError, match='config.objective.path'):
    paths.get_path('spiral')
  config = fmnist_sit.get_config()
  config.objective.name = 'diffusion'
  with pytest.raises(ValueError, match='config.objective.name'):
    objectives.make_objective(config)
  with pytest.raises(ValueError, match='config.objective.t_sampling'):
    objectives.sample_t(jax.random.key(0), 4, 'beta')


def test_ema_warmup_keeps_closed_form_share_of_init():
  """After N updates, the EMA's weight on the initial params is Π_n d_n; with the warm-up
  d_n = (1+n)/(10+n) (while below the decay) the product telescopes to 9!·N!/(N+9)!."""
  decays = np.asarray(train_state.ema_decay(jnp.arange(50), 0.9999), np.float64)
  for big_n in (1, 5, 50):
    closed = math.factorial(9) * math.factorial(big_n) / math.factorial(big_n + 9)
    np.testing.assert_allclose(np.prod(decays[:big_n]), closed, rtol=1e-5)
  # Capped at the configured decay once the warm-up exceeds it.
  assert float(train_state.ema_decay(jnp.asarray(10**6), 0.999)) == pytest.approx(0.999)


def _gaussian_velocity(mu, s2, path):
  """Exact marginal velocity for x0 ~ N(mu, diag s2): u = α̇·E[x0|x] + σ̇·E[ε|x]."""
  def velocity(x, t, y):
    del y
    a = path.alpha(t)[:, None]
    s = path.sigma(t)[:, None]
    var = a**2 * s2 + s**2
    r = x - a * mu
    e_x0 = mu + a * s2 / var * r
    e_eps = s / var * r
    return path.d_alpha(t)[:, None] * e_x0 + path.d_sigma(t)[:, None] * e_eps
  return velocity


@pytest.mark.parametrize('method,steps', [('euler', 400), ('heun', 40)])
@pytest.mark.parametrize('path_name', ['linear', 'cosine'])
def test_ode_samplers_reach_gaussian_data(method, steps, path_name):
  """Integrating the exact velocity from noise recovers the data law's mean and variance."""
  mu = jnp.array([2.0, -1.0, 0.5])
  s2 = jnp.array([0.25, 1.0, 4.0])
  n = 20_000
  fn = _gaussian_velocity(mu, s2, paths.get_path(path_name))
  x = sampling.sample(fn, jax.random.key(3), jnp.zeros((n,), jnp.int32), (3,),
                      method=method, num_steps=steps)
  x = np.asarray(x, np.float64)
  se_mean = np.sqrt(np.asarray(s2) / n)
  np.testing.assert_array_less(np.abs(x.mean(0) - np.asarray(mu)), 5 * se_mean + 0.01)
  np.testing.assert_allclose(x.var(0), np.asarray(s2), rtol=5 * math.sqrt(2 / n) + 0.02)


def test_cfg_scale_one_is_conditional_and_scale_combines_branches():
  def fn(x, t, y):
    return x * 0 + y[:, None].astype(jnp.float32) + t[:, None]
  x = jnp.ones((4, 2))
  t = jnp.full((4,), 0.3)
  y = jnp.array([0, 1, 2, 3])
  np.testing.assert_array_equal(sampling.cfg_velocity(fn, 1.0, 10)(x, t, y), fn(x, t, y))
  guided = sampling.cfg_velocity(fn, 2.0, 10)(x, t, y)
  expected = fn(x, t, jnp.full_like(y, 10)) + 2.0 * (fn(x, t, y) - fn(x, t, jnp.full_like(y, 10)))
  np.testing.assert_allclose(guided, expected, rtol=1e-6)
