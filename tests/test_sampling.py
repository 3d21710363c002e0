"""Samplers against closed forms: Gaussian data (exact velocity), hand-computed grids, exact
identities (StableVS η = 0 is Euler, CFG scale 1 is the conditional model), a host-side count
of dopri5's evaluations, and a sharded sample against the one-device sample."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist_sit
from pafm_jax import paths, sampling, sharding, train_state
from pafm_jax.models import network
from pafm_jax.sampling import ode, schedules, stablevs

# A full-covariance Gaussian data law: N(MU, COV).
MU = np.array([1.5, -1.0, 0.5])
_A = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.5, 1.2]])
COV = _A @ _A.T


def gaussian_velocity(mu, cov, path):
  """Exact marginal velocity of x0 ~ N(mu, cov) (METHOD.md §1, one mixture component):
  u = α̇·E[x0|x] + σ̇·E[ε|x], E[x0|x] = μ + α·Σ·C⁻¹(x − α·μ), E[ε|x] = σ·C⁻¹(x − α·μ),
  C = α²Σ + σ²I. Computed in the eigenbasis of Σ, where C is diagonal."""
  lam, q = np.linalg.eigh(cov)
  lam, q, mu = jnp.asarray(lam), jnp.asarray(q), jnp.asarray(mu)

  def velocity(x, t, y):
    del y
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    r = (x - a * mu) @ q                  # residual in the eigenbasis
    c = a**2 * lam + s**2
    e_x0 = mu + (a * lam / c * r) @ q.T
    e_eps = (s / c * r) @ q.T
    return path.d_alpha(t)[:, None] * e_x0 + path.d_sigma(t)[:, None] * e_eps
  return velocity


def assert_gaussian_moments(x, mu, cov, slack):
  """Mean and covariance within 5 Monte-Carlo standard errors (+ a discretisation slack)."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  se_mean = np.sqrt(np.diag(cov) / n)
  np.testing.assert_array_less(np.abs(x.mean(0) - mu), 5 * se_mean + slack)
  # Var(ĉ_ij) = (Σ_ii·Σ_jj + Σ_ij²)/n for Gaussian samples.
  se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
  np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 5 * se_cov + slack)


# ------------------------------------------------------------------------------ schedules


def test_shift_time_closed_form_and_group_property():
  t = np.linspace(0, 1, 11)
  np.testing.assert_allclose(schedules.shift_time(t, 1.0), t)
  np.testing.assert_allclose(schedules.shift_time(0.5, 3.0), 0.75)    # 1.5 / (1 + 1)
  np.testing.assert_allclose(schedules.shift_time(0.25, 0.5), 0.125 / 0.875)
  assert schedules.shift_time(0.0, 3.0) == 0.0 and schedules.shift_time(1.0, 3.0) == 1.0
  # Shifts compose multiplicatively: shifting by s then by 1/s is the identity.
  np.testing.assert_allclose(schedules.shift_time(schedules.shift_time(t, 3.0), 1 / 3), t,
                             atol=1e-12)
  grid = schedules.time_grid(8, 3.0)
  assert grid.shape == (9,) and grid[0] == 1.0 and grid[-1] == 0.0
  assert np.all(np.diff(grid) < 0) and np.all(grid[1:-1] > np.linspace(1, 0, 9)[1:-1])
  with pytest.raises(ValueError, match='shift'):
    schedules.time_grid(4, 0.0)


def test_stablevs_grid_by_hand():
  """20 uniform steps, split 0.85, K = 9: keep 1 … 0.85, then 9 of the 16 points 0.8 … 0.05 at
  round(linspace(0, 15, 9)) = [0, 2, 4, 6, 8, 9, 11, 13, 15] (round half to even), then 0."""
  grid = schedules.stablevs_grid(schedules.time_grid(20), 0.85, 9)
  expected = [1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.25, 0.15, 0.05, 0.0]
  np.testing.assert_allclose(grid, expected, atol=1e-6)
  # More low steps than base points: the base grid itself, never a zero-length step.
  np.testing.assert_array_equal(schedules.stablevs_grid(schedules.time_grid(6), 0.85, 9),
                                schedules.time_grid(6))


def test_predict_endpoints_recovers_x0_and_eps():
  """x̂0, ε̂ from (x_t, v) invert x_t = α·x0 + σ·ε, v = α̇·x0 + σ̇·ε exactly (both paths)."""
  kx, ke = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(kx, (5, 4))
  eps = jax.random.normal(ke, (5, 4))
  t = jnp.array([0.0, 0.2, 0.5, 0.9, 1.0])
  for name in ('linear', 'cosine'):
    path = paths.get_path(name)
    x_t = paths.interpolate(path, x0, eps, t)
    v = paths.conditional_velocity(path, x0, eps, t)
    x0_hat, eps_hat = paths.predict_endpoints(path, x_t, v, t)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-6)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-6)


# ------------------------------------------------------------- samplers on Gaussian data


N = 20_000


@pytest.mark.parametrize('options,slack', [
    (dict(method='euler', num_steps=400), 0.02),
    (dict(method='euler', num_steps=200, shift=3.0), 0.03),
    (dict(method='heun', num_steps=24), 0.01),
    (dict(method='dopri5', rtol=1e-5, atol=1e-6), 0.01),
    (dict(method='sde', num_steps=250, diffusion='sigma'), 0.03),
    (dict(method='sde', num_steps=400, diffusion='sbdm'), 0.04),
], ids=['euler', 'euler-shifted', 'heun', 'dopri5', 'sde-sigma', 'sde-sbdm'])
def test_samplers_reach_gaussian_data(options, slack):
  path = paths.LinearPath()
  x = sampling.sample(gaussian_velocity(MU, COV, path), jax.random.key(1),
                      jnp.zeros((N,), jnp.int32), (3,), path=path, **options)
  assert_gaussian_moments(x, MU, COV, slack)


def test_samplers_reach_gaussian_data_on_cosine_path():
  path = paths.CosinePath()
  for options in (dict(method='heun', num_steps=32), dict(method='sde', num_steps=300)):
    x = sampling.sample(gaussian_velocity(MU, COV, path), jax.random.key(2),
                        jnp.zeros((N,), jnp.int32), (3,), path=path, **options)
    assert_gaussian_moments(x, MU, COV, 0.03)


def test_stablevs_without_noise_is_euler_on_its_thinned_grid():
  velocity = gaussian_velocity(MU, COV, paths.LinearPath())
  options = sampling.SamplerOptions(method='stablevs', num_steps=50, stablevs_eta=0.0)
  labels = jnp.zeros((256,), jnp.int32)
  x, nfe = sampling.sample_with_nfe(velocity, jax.random.key(4), labels, (3,), options)
  grid = options.grid()
  assert nfe == len(grid) - 1 == 8 + 9     # kept 1, 0.98 … 0.86, then 9 low steps
  x1 = jax.random.normal(jax.random.key(4), (256, 3))
  x_euler, _ = ode.euler(velocity, x1, labels, grid)
  np.testing.assert_allclose(x, x_euler, rtol=1e-6, atol=1e-6)


def test_stablevs_noisy_low_step_by_hand():
  """One low-region step t = 0.5 → τ = 0.3 with η = 0.4 from a fixed state: the outputs are
  N((1 − τ)·x̂0 + sqrt(τ² − β²)·ε̂, β²) with β = η·τ, x̂0 = x − t·v, ε̂ = x + (1 − t)·v."""
  t, tau, eta = 0.5, 0.3, 0.4
  velocity = lambda x, t_b, y: jnp.full_like(x, 0.8)
  x = jnp.full((N, 1), 1.2)
  out, nfe = stablevs.stablevs(velocity, x, None, np.array([t, tau], np.float32),
                               jax.random.key(3), split=0.85, eta=eta)
  assert nfe == 1
  beta = eta * tau
  x0_hat, eps_hat = 1.2 - t * 0.8, 1.2 + (1 - t) * 0.8
  mean = (1 - tau) * x0_hat + math.sqrt(tau**2 - beta**2) * eps_hat
  out = np.asarray(out[:, 0], np.float64)
  assert abs(out.mean() - mean) < 5 * beta / math.sqrt(N)
  assert abs(out.std() - beta) < 5 * beta / math.sqrt(2 * N)


def test_dopri5_nfe_formula_matches_a_host_counter():
  """diffrax's step statistics → evaluations, checked by counting calls on the host, on a
  problem that forces rejected steps (a steep front at t = 0.5)."""
  calls = [0]

  def count(_):
    calls[0] += 1

  def velocity(x, t, y):
    del y
    jax.debug.callback(count, t[0])
    return -x + 50.0 * jnp.tanh(300.0 * (t[:, None] - 0.5))

  x1 = jax.random.normal(jax.random.key(0), (4, 3))
  for rtol in (1e-3, 1e-6):
    calls[0] = 0
    _, nfe = jax.jit(lambda x: ode.dopri5(velocity, x, None, rtol=rtol, atol=1e-7))(x1)
    jax.effects_barrier()
    assert int(nfe) == calls[0], (rtol, int(nfe), calls[0])


# ---------------------------------------------------------------------------- guidance


def _toy_conditional(x, t, y):
  return 0.5 * x + y[:, None].astype(jnp.float32) + t[:, None] ** 2


def test_cfg_scale_one_is_the_conditional_model():
  labels = jnp.arange(8) % 3
  plain = sampling.sample(_toy_conditional, jax.random.key(5), labels, (2,), method='heun',
                          num_steps=6)
  guided = sampling.sample(_toy_conditional, jax.random.key(5), labels, (2,), method='heun',
                           num_steps=6, cfg_scale=1.0, null_label=3,
                           guidance_interval=(0.0, 1.0))
  np.testing.assert_array_equal(plain, guided)


def test_guidance_interval_applies_cfg_only_inside():
  null, scale = 3, 2.5
  fn = sampling.cfg_velocity(_toy_conditional, scale, null, interval=(0.2, 0.7))
  x = jnp.ones((4, 2))
  y = jnp.array([0, 1, 2, 1])
  t = jnp.array([0.1, 0.2, 0.7, 0.9])          # outside, edge, edge, outside
  cond = _toy_conditional(x, t, y)
  uncond = _toy_conditional(x, t, jnp.full_like(y, null))
  expected = np.where(np.array([False, True, True, False])[:, None],
                      uncond + scale * (cond - uncond), cond)
  np.testing.assert_allclose(fn(x, t, y), expected, rtol=1e-6)
  # A batch wholly outside the interval takes the one-pass branch: the conditional model.
  t_out = jnp.full((4,), 0.9)
  np.testing.assert_array_equal(fn(x, t_out, y), _toy_conditional(x, t_out, y))


def test_unknown_sampler_and_missing_null_label_raise():
  with pytest.raises(ValueError, match='sampler'):
    sampling.SamplerOptions(method='rk4')
  with pytest.raises(ValueError, match='null label'):
    sampling.sample(_toy_conditional, jax.random.key(0), jnp.zeros((2,), jnp.int32), (2,),
                    cfg_scale=2.0)
  with pytest.raises(ValueError, match='diffusion'):
    sampling.SamplerOptions(method='sde', diffusion='vp')


# ---------------------------------------------------------------------------- sharding


@pytest.mark.slow
def test_sharded_sampler_equals_one_device_sampler():
  """A SiT sample with the batch split over 8 devices equals the one-device sample."""
  config = fmnist_sit.get_config()
  net = network.build_network(config)
  params = train_state.init_state(jax.random.key(0), make_model=network.model_factory(config),
                                  tx=train_state.make_optimizer(config.optimizer))['params']
  # A zero-initialised final layer would make every velocity 0: perturb all parameters.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.02 * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys)])
  # Grid 1 → 0.5 → 0: one step outside the guidance interval [0, 0.7], one inside.
  options = sampling.SamplerOptions(method='euler', num_steps=2, cfg_scale=2.0)
  labels = jnp.arange(16) % 10
  outs = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.create_mesh({'data': -1, 'fsdp': 1}, devices)
    draw = sampling.make_batch_sampler(net.apply, mesh, (28, 28, 1), options,
                                       null_label=net.null_label)
    x, nfe = draw(params, jax.random.key(7), labels)
    assert nfe == 2
    outs.append(np.asarray(x))
  assert len(jax.devices()) == 8
  assert np.abs(outs[0]).mean() > 0.1
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
