"""Euler–Maruyama sampler of the reverse-time SDE with the marginals of the flow (SiT §3.4).

Convention (ours: t = 1 noise → t = 0 data; SiT runs its time the other way). For any
diffusion coefficient w(t) ≥ 0 the SDE, integrated from t = 1 down to 0,

    dx = [v(x, t) − w(t)·s(x, t)] dt + sqrt(2·w(t)) dW̄_t,

has the same marginals p_t as the probability-flow ODE dx = v dt. The score comes from the
velocity: s = −ε̂/σ with ε̂ from `paths.predict_endpoints` (linear path: ε̂ = x + (1 − t)·v),
so the drift is v + (w/σ)·ε̂. One step from t to t' < t with h = t − t' > 0:

    x ← x − h·(v + (w/σ)·ε̂) + sqrt(2·w·h)·z,   z ~ N(0, I).

Diffusion coefficients, as in SiT's `transport` (its w, rewritten in our time direction):
  'sigma'  w = norm·σ_t  (SiT's sampling-script default). Linear path: drift = v + norm·ε̂.
  'sbdm'   w = norm·(σ·σ̇ − σ²·α̇/α), the reverse diffusion SDE of the path's forward
           noising process (g²/2 of "score-based diffusion models"). Linear: w = t/(1 − t).
           It is infinite at t = 1 (α = 0), so a step that starts there is a plain ODE step.

The last step (to t = 0) adds no noise: it moves to the mean of the Euler–Maruyama transition,
as SiT's default `last_step='Mean'`, so the samples are not left with noise of scale
sqrt(2·w·h) on them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pafm_jax import paths

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
DIFFUSIONS = ('sigma', 'sbdm')


def diffusion_coefficient(path, t: jax.Array, form: str, norm: float = 1.0) -> jax.Array:
  """w(t) ≥ 0 of the SDE (module docstring); 0 where it is infinite (α = 0).  t: [B] → [B]."""
  if form == 'sigma':
    return norm * path.sigma(t)
  if form == 'sbdm':
    a, s = path.alpha(t), path.sigma(t)
    safe_a = jnp.where(a > 0, a, 1.0)
    w = s * path.d_sigma(t) - s**2 * path.d_alpha(t) / safe_a
    return jnp.where(a > 0, norm * w, 0.0)
  raise ValueError(f'unknown diffusion {form!r}; choose one of {DIFFUSIONS}.')


def euler_maruyama(velocity_fn: VelocityFn, x1: jax.Array, y: jax.Array, ts: np.ndarray,
                   rng: jax.Array, *, path=None, diffusion: str = 'sigma',
                   diffusion_norm: float = 1.0) -> tuple[jax.Array, int]:
  """Euler–Maruyama along the decreasing grid `ts` [N + 1]; the last step is deterministic.

  x1: [B, *S] noise; y: [B]; one velocity evaluation per step, so nfe = N.
  """
  path = path or paths.LinearPath()
  if diffusion not in DIFFUSIONS:
    raise ValueError(f'unknown diffusion {diffusion!r}; choose one of {DIFFUSIONS}.')
  ts = jnp.asarray(ts, jnp.float32)
  num_steps = ts.shape[0] - 1

  def drift_and_w(x, t):
    t_b = jnp.full((x.shape[0],), t, x.dtype)
    v = velocity_fn(x, t_b, y)
    _, eps_hat = paths.predict_endpoints(path, x, v, t_b)
    w = diffusion_coefficient(path, t, diffusion, diffusion_norm)
    # Steps start at t > 0 only (the grid ends at 0), so σ > 0 here.
    return v + (w / path.sigma(t)) * eps_hat, w

  def step(x, inputs):
    t, t_next, key = inputs
    drift, w = drift_and_w(x, t)
    h = t - t_next
    noise = jax.random.normal(key, x.shape, x.dtype)
    return x - h * drift + jnp.sqrt(2.0 * w * h) * noise, None

  keys = jax.random.split(rng, max(num_steps - 1, 1))[:num_steps - 1]
  x, _ = jax.lax.scan(step, x1, (ts[:-2], ts[1:-1], keys))
  drift, _ = drift_and_w(x, ts[-2])
  return x - (ts[-2] - ts[-1]) * drift, num_steps
