"""Classifier-free guidance with a guidance interval.

Guidance helps most in the middle of the trajectory and hurts at high noise, where it pushes
every sample of a class towards the same mode (Kynkäänniemi et al. 2024, "Applying guidance in
a limited interval improves sample and distribution quality"). So it is applied only for
t ∈ [t_low, t_high]; METHOD.md §7 uses t ≤ 0.7 (t = 1 is noise here).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

DEFAULT_INTERVAL = (0.0, 0.7)


def null_like(y, null):
  """The null condition for every row of the condition y: `null` is the null label (y labels
  [B]) or one row of a pytree condition (y a pytree of [B, ...] arrays, e.g. a caption's
  encoding), broadcast over the batch."""
  if isinstance(null, (int, np.integer)):
    return jnp.full_like(y, null)
  return jax.tree.map(lambda row, n: jnp.broadcast_to(jnp.asarray(n, row.dtype), row.shape),
                      y, null)


def cfg_velocity(velocity_fn: VelocityFn, cfg_scale: float, null_label,
                 interval: tuple[float, float] = DEFAULT_INTERVAL) -> VelocityFn:
  """v = v(x|∅) + s·(v(x|y) − v(x|∅)) for t ∈ interval, the conditional v(x|y) elsewhere.

  Scale 1 returns `velocity_fn` itself. Inside the interval both branches go through one call
  on the doubled batch (the network is batch-parallel); a `lax.cond` skips the unconditional
  half entirely when no sample of the batch is inside the interval, so the steps outside it
  cost one pass. x: [B, *S], t: [B], y: [B] labels or a pytree of [B, ...] → [B, *S].
  null_label: the null condition (`null_like`; Network.null_condition).
  """
  if cfg_scale == 1.0:
    return velocity_fn
  if null_label is None:
    raise ValueError('classifier-free guidance needs the null label.')
  t_low, t_high = interval
  if not 0.0 <= t_low <= t_high <= 1.0:
    raise ValueError(f'the guidance interval must satisfy 0 ≤ t_low ≤ t_high ≤ 1, got '
                     f'{interval}.')

  def guided(x, t, y, *t_end):
    # t_end: a flow map's end time (sampling/flow_map.py); guidance then combines the maps'
    # φ_{t,t_end} the same way (exact on the diagonal, MeanFlow's practice off it).
    inside = (t >= t_low) & (t <= t_high)

    def with_guidance(_):
      both = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                         jax.tree.map(lambda a, b: jnp.concatenate([a, b]), y,
                                      null_like(y, null_label)),
                         *(jnp.concatenate([e, e]) for e in t_end))
      v_cond, v_uncond = jnp.split(both, 2)
      v_guided = v_uncond + cfg_scale * (v_cond - v_uncond)
      mask = jnp.reshape(inside, inside.shape + (1,) * (x.ndim - 1))
      return jnp.where(mask, v_guided, v_cond)

    return jax.lax.cond(jnp.any(inside), with_guidance,
                        lambda _: velocity_fn(x, t, y, *t_end), None)

  return guided
