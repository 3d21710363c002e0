"""Training objectives: what the network regresses onto (METHOD.md §2).

The loss is shared by every objective: draw t and ε, form x_t on the chosen path, regress the
network's velocity onto a target. Objectives differ only in the target, a pure function that
sees the path, the noisy sample and its endpoint (and, for posterior-based objectives, the
candidates in the batch). PAFM therefore plugs in as another entry of `TARGETS`, not as a
second loop.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pafm_jax import paths

T_SAMPLINGS = ('uniform', 'lognormal')


def sample_t(rng: jax.Array, batch_size: int, kind: str) -> jax.Array:
  """Training times t: [B] in [0, 1).

  'lognormal' follows EDM / flow_matching: t = 1 − 1/(1 + exp(1.2·n − 1.2)), n ~ N(0, 1).
  """
  if kind == 'uniform':
    return jax.random.uniform(rng, (batch_size,))
  if kind == 'lognormal':
    n = jax.random.normal(rng, (batch_size,))
    return 1.0 - 1.0 / (1.0 + jnp.exp(1.2 * n - 1.2))
  raise ValueError(f'unknown t sampling {kind!r}; config.objective.t_sampling must be one of '
                   f'{T_SAMPLINGS}.')


def drop_labels(rng: jax.Array, labels: jax.Array, drop_prob: float,
                null_label: int) -> jax.Array:
  """Replaces each label by the null class with probability `drop_prob` (for CFG)."""
  drop = jax.random.bernoulli(rng, drop_prob, labels.shape)
  return jnp.where(drop, null_label, labels)


def fm_target(path, x_t, t, x0, eps, labels, batch):
  """Flow matching: the conditional velocity of the sample's own endpoint, α̇·x0 + σ̇·ε."""
  del x_t, labels, batch
  return paths.conditional_velocity(path, x0, eps, t), {}


# name -> target(path, x_t [B,*S], t [B], x0 [B,*S], eps [B,*S], labels [B], batch) ->
#         (target [B,*S], diagnostics dict of [B] arrays)
TARGETS: dict[str, Callable] = {'fm': fm_target}


def get_target(name: str) -> Callable:
  if name not in TARGETS:
    raise ValueError(f'unknown objective {name!r}; config.objective.name must be one of '
                     f'{sorted(TARGETS)}.')
  return TARGETS[name]


def velocity_loss(apply_fn, params, batch: dict, rng: jax.Array, *, path, target_fn,
                  t_sampling: str, label_drop: float, null_label: int):
  """The regression loss shared by every objective.

  batch: {'image': [B, H, W, C] clean data x0, 'label': [B] int}; optional 't': [B] and
  'eps': [B, H, W, C] when the data pipeline drew them (retrieval of noisy neighbours).
  Returns (mean loss, aux) with aux['per_sample'] the [B] losses and aux['t'] the times.
  """
  x0 = batch['image']
  rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
  t = batch['t'] if 't' in batch else sample_t(rng_t, x0.shape[0], t_sampling)
  eps = batch['eps'] if 'eps' in batch else jax.random.normal(rng_eps, x0.shape, x0.dtype)
  labels = drop_labels(rng_drop, batch['label'], label_drop, null_label)
  x_t = paths.interpolate(path, x0, eps, t)
  target, diagnostics = target_fn(path, x_t, t, x0, eps, labels, batch)
  target = jax.lax.stop_gradient(target)
  pred = apply_fn(params, x_t, t, labels)
  per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - target),
                        axis=tuple(range(1, x0.ndim)))
  return jnp.mean(per_sample), {'per_sample': per_sample, 't': t, **diagnostics}
