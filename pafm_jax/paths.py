"""Interpolant paths x_t = α_t·x0 + σ_t·ε and the laws of training times t (METHOD.md §1;
t = 0 is data, t = 1 is noise).

Every formula here is written once and serves both sides of the program: JAX arrays inside
the jitted step, and numpy arrays in the data pipeline, whose Grain workers draw t and ε for
noisy retrieval and must not compute with JAX (that would claim an accelerator). A formula
picks its array namespace from its input (`_namespace`). Adding a path is one class here;
adding a t-distribution is one entry of `T_SAMPLINGS`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _namespace(t):
  """numpy for host values (numpy arrays and scalars, Python numbers), jax.numpy otherwise
  (arrays and tracers inside jit)."""
  if isinstance(t, (np.ndarray, np.generic, float, int)):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


class LinearPath:
  """The optimal-transport path of Lipman et al. and SiT: α = 1 − t, σ = t."""
  name = 'linear'

  def alpha(self, t):
    return 1.0 - t

  def sigma(self, t):
    return t

  def d_alpha(self, t):
    return -_namespace(t).ones_like(t)

  def d_sigma(self, t):
    return _namespace(t).ones_like(t)


class CosinePath:
  """The variance-preserving (GVP) path of SiT: α = cos(πt/2), σ = sin(πt/2)."""
  name = 'cosine'

  def alpha(self, t):
    xp = _namespace(t)
    return xp.cos(0.5 * xp.pi * t)

  def sigma(self, t):
    xp = _namespace(t)
    return xp.sin(0.5 * xp.pi * t)

  def d_alpha(self, t):
    xp = _namespace(t)
    return -0.5 * xp.pi * xp.sin(0.5 * xp.pi * t)

  def d_sigma(self, t):
    xp = _namespace(t)
    return 0.5 * xp.pi * xp.cos(0.5 * xp.pi * t)


PATHS = {'linear': LinearPath, 'cosine': CosinePath}


def get_path(name: str):
  """The path object for `name` ('linear' or 'cosine')."""
  if name not in PATHS:
    raise ValueError(f'unknown path {name!r}; config.objective.path must be one of '
                     f'{sorted(PATHS)}.')
  return PATHS[name]()


# ---------------------------------------------------------------------------------------------
# Training times: t = transform(base draw), the base draw 'uniform' on [0, 1) or 'normal'.


def _lognormal(n):
  """EDM / flow_matching's logit-normal law: t = 1 − 1/(1 + exp(1.2·n − 1.2)), n ~ N(0, 1)."""
  return 1.0 - 1.0 / (1.0 + _namespace(n).exp(1.2 * n - 1.2))


# name → (base draw, transform of the draw into t)
T_SAMPLINGS: dict[str, tuple[str, Callable]] = {
    'uniform': ('uniform', lambda u: u),
    'lognormal': ('normal', _lognormal),
}


def t_law(kind: str) -> tuple[str, Callable]:
  """(base draw, transform) of the t-sampling `kind`; raises naming the config field."""
  if kind not in T_SAMPLINGS:
    raise ValueError(f'unknown t sampling {kind!r}; config.objective.t_sampling must be one of '
                     f'{tuple(T_SAMPLINGS)}.')
  return T_SAMPLINGS[kind]


def host_sample_t(rng: np.random.Generator, kind: str) -> np.float32:
  """One training time t in [0, 1) drawn on the host with numpy (the data pipeline's twin of
  objectives.sample_t: the same base draw and the same transform)."""
  draw, transform = t_law(kind)
  base = rng.random() if draw == 'uniform' else rng.standard_normal()
  return np.float32(transform(base))


def check_config(config) -> None:
  """config.objective.path and config.objective.t_sampling name a path and a law."""
  get_path(config.objective.path)
  t_law(config.objective.t_sampling)


# ---------------------------------------------------------------------------------------------
# The interpolant and its velocity (array formulas, numpy or JAX).


def bcast(a, x):
  """Reshapes a per-sample [B] coefficient to broadcast against x: [B, *S]."""
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def interpolate(path, x0, eps, t):
  """x_t = α_t·x0 + σ_t·ε.  x0, eps: [B, *S]; t: [B]."""
  return bcast(path.alpha(t), x0) * x0 + bcast(path.sigma(t), x0) * eps


def conditional_velocity(path, x0, eps, t):
  """v(x_t | x0) = α̇_t·x0 + σ̇_t·ε, the FM regression target.  [B, *S]."""
  return bcast(path.d_alpha(t), x0) * x0 + bcast(path.d_sigma(t), x0) * eps


def predict_endpoints(path, x, v, t):
  """(x̂0, ε̂) from a state x_t and its velocity v: the unique pair with x = α·x̂0 + σ·ε̂ and
  v = α̇·x̂0 + σ̇·ε̂ (Cramer's rule; the determinant α·σ̇ − α̇·σ is 1 on the linear path and
  π/2 on the cosine path, never 0).  x, v: [B, *S]; t: [B].

  Linear path: x̂0 = x − t·v, ε̂ = x + (1 − t)·v (METHOD.md §4). The score is −ε̂/σ.
  """
  a, s = bcast(path.alpha(t), x), bcast(path.sigma(t), x)
  da, ds = bcast(path.d_alpha(t), x), bcast(path.d_sigma(t), x)
  det = a * ds - da * s
  return (ds * x - s * v) / det, (a * v - da * x) / det
