"""Interpolant paths x_t = α_t·x0 + σ_t·ε (METHOD.md §1; t = 0 is data, t = 1 is noise).

Every quantity is a pure function of t; the objectives and the posterior module only ever see
α, σ and their time derivatives, so adding a path means adding one class here.
"""

from __future__ import annotations


import jax.numpy as jnp


class LinearPath:
  """The optimal-transport path of Lipman et al. and SiT: α = 1 − t, σ = t."""
  name = 'linear'

  def alpha(self, t):
    return 1.0 - t

  def sigma(self, t):
    return t

  def d_alpha(self, t):
    return -jnp.ones_like(t)

  def d_sigma(self, t):
    return jnp.ones_like(t)


class CosinePath:
  """The variance-preserving (GVP) path of SiT: α = cos(πt/2), σ = sin(πt/2)."""
  name = 'cosine'

  def alpha(self, t):
    return jnp.cos(0.5 * jnp.pi * t)

  def sigma(self, t):
    return jnp.sin(0.5 * jnp.pi * t)

  def d_alpha(self, t):
    return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t)

  def d_sigma(self, t):
    return 0.5 * jnp.pi * jnp.cos(0.5 * jnp.pi * t)


PATHS = {'linear': LinearPath, 'cosine': CosinePath}


def get_path(name: str):
  """The path object for `name` ('linear' or 'cosine')."""
  if name not in PATHS:
    raise ValueError(f'unknown path {name!r}; config.objective.path must be one of '
                     f'{sorted(PATHS)}.')
  return PATHS[name]()


def _bcast(a, x):
  """Reshapes a per-sample [B] coefficient to broadcast against x: [B, *S]."""
  return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def interpolate(path, x0, eps, t):
  """x_t = α_t·x0 + σ_t·ε.  x0, eps: [B, *S]; t: [B]."""
  return _bcast(path.alpha(t), x0) * x0 + _bcast(path.sigma(t), x0) * eps


def conditional_velocity(path, x0, eps, t):
  """v(x_t | x0) = α̇_t·x0 + σ̇_t·ε, the FM regression target.  [B, *S]."""
  return _bcast(path.d_alpha(t), x0) * x0 + _bcast(path.d_sigma(t), x0) * eps


def predict_endpoints(path, x, v, t):
  """(x̂0, ε̂) from a state x_t and its velocity v: the unique pair with x = α·x̂0 + σ·ε̂ and
  v = α̇·x̂0 + σ̇·ε̂ (Cramer's rule; the determinant α·σ̇ − α̇·σ is 1 on the linear path and
  π/2 on the cosine path, never 0).  x, v: [B, *S]; t: [B].

  Linear path: x̂0 = x − t·v, ε̂ = x + (1 − t)·v (METHOD.md §4). The score is −ε̂/σ.
  """
  a, s = _bcast(path.alpha(t), x), _bcast(path.sigma(t), x)
  da, ds = _bcast(path.d_alpha(t), x), _bcast(path.d_sigma(t), x)
  det = a * ds - da * s
  return (ds * x - s * v) / det, (a * v - da * x) / det
