"""StableVS: few steps in the low-variance region t < split (METHOD.md §4).

Lin et al. (arXiv 2602.05435) observe that below a split time the conditional velocities of
nearby data points agree, the flow is nearly straight, and large steps are safe. On the grid of
`schedules.stablevs_grid`, every step that starts at t ≤ split uses the DDIM-type update

    x_τ = α_τ·x̂0 + sqrt(σ_τ² − β²)·ε̂ + β·z,   β = η·σ_τ,   z ~ N(0, I),

with (x̂0, ε̂) predicted from (x_t, v) by `paths.predict_endpoints`; steps above the split are
Euler steps. On the linear path (α_τ = 1 − τ, σ_τ = τ, x̂0 = x − t·v, ε̂ = x + (1 − t)·v) and
η = 0 the update is x + (τ − t)·v, i.e. Euler on the thinned grid. The step to τ = 0 never adds
noise (β = η·σ_0 = 0).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pafm_jax import paths

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def stablevs(velocity_fn: VelocityFn, x1: jax.Array, y: jax.Array, ts: np.ndarray,
             rng: jax.Array, *, split: float = 0.85, eta: float = 0.0,
             path=None) -> tuple[jax.Array, int]:
  """Integrates along the thinned grid `ts` [M + 1] (from `stablevs_grid`); nfe = M.

  x1: [B, *S] noise; y: [B].
  """
  path = path or paths.LinearPath()
  ts = jnp.asarray(ts, jnp.float32)

  def step(x, inputs):
    t, tau, key = inputs
    t_b = jnp.full((x.shape[0],), t, x.dtype)
    v = velocity_fn(x, t_b, y)
    x0_hat, eps_hat = paths.predict_endpoints(path, x, v, t_b)
    beta = eta * path.sigma(tau)
    low = (path.alpha(tau) * x0_hat
           + jnp.sqrt(jnp.maximum(path.sigma(tau)**2 - beta**2, 0.0)) * eps_hat
           + beta * jax.random.normal(key, x.shape, x.dtype))
    return jnp.where(t <= split, low, x + (tau - t) * v), None

  keys = jax.random.split(rng, ts.shape[0] - 1)
  x, _ = jax.lax.scan(step, x1, (ts[:-1], ts[1:], keys))
  return x, ts.shape[0] - 1
