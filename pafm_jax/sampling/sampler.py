"""One entry point for every sampler, its options from `config.sample`, and the jitted,
batch-sharded sampler of a network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pafm_jax import paths, sharding
from pafm_jax.sampling import flow_map, guidance, ode, schedules, sde, stablevs

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
SAMPLERS = ('euler', 'heun', 'sde', 'dopri5', 'stablevs', 'flow_map')


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """How to draw samples. Field names match `config.sample` (configs/base.py)."""
  method: str = 'heun'
  num_steps: int = 32              # steps of the base grid (dopri5: unused, adaptive;
                                   # flow_map: the number of jumps)
  shift: float = 1.0               # time shift of the base grid (1 = uniform)
  cfg_scale: float = 1.0
  guidance_interval: tuple[float, float] = guidance.DEFAULT_INTERVAL
  diffusion: str = 'sigma'         # SDE: 'sigma' or 'sbdm'
  diffusion_norm: float = 1.0
  rtol: float = 1e-3               # dopri5 (SiT's defaults)
  atol: float = 1e-6
  max_steps: int = 1000
  stablevs_split: float = 0.85     # StableVS (METHOD.md §4)
  stablevs_low_steps: int = 9
  stablevs_eta: float = 0.0

  def __post_init__(self):
    if self.method not in SAMPLERS:
      raise ValueError(f'unknown sampler {self.method!r}; config.sample.method must be one of '
                       f'{sorted(SAMPLERS)}.')
    if self.num_steps < 1:
      raise ValueError(f'config.sample.num_steps must be ≥ 1, got {self.num_steps}.')
    if self.method == 'sde' and self.diffusion not in sde.DIFFUSIONS:
      raise ValueError(f'unknown diffusion {self.diffusion!r}; config.sample.diffusion must be '
                       f'one of {sde.DIFFUSIONS}.')
    object.__setattr__(self, 'guidance_interval', tuple(float(v) for v in self.guidance_interval))

  @classmethod
  def from_config(cls, sample_config: ml_collections.ConfigDict | dict,
                  **overrides: Any) -> 'SamplerOptions':
    """The fields of `sample_config` that name options (others, e.g. per_class, ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(sample_config).items() if k in names}
    values.update(overrides)
    return cls(**values)

  def grid(self) -> np.ndarray:
    """The time grid of the fixed-step methods: float32 [steps + 1], 1 → 0."""
    base = schedules.time_grid(self.num_steps, self.shift)
    if self.method == 'stablevs':
      return schedules.stablevs_grid(base, self.stablevs_split, self.stablevs_low_steps)
    return base


def check_config(config) -> None:
  """config.sample names a sampler with valid options (SamplerOptions raises otherwise)."""
  SamplerOptions.from_config(config.sample)
  if config.sample.method == 'flow_map' and config.objective.name != 'flow_map':
    raise ValueError("config.sample.method='flow_map' jumps with a two-time flow-map network, "
                     f'but objective {config.objective.name!r} trains a velocity model; use an '
                     "ODE sampler (e.g. 'heun') or train with config.objective.name='flow_map'.")


def sample_with_nfe(velocity_fn: VelocityFn, rng: jax.Array, labels: jax.Array,
                    shape: tuple[int, ...], options: SamplerOptions, *,
                    null_label: int | None = None, path=None,
                    noise_sharding: NamedSharding | None = None) -> tuple[jax.Array, Any]:
  """Draws x0 for `labels` [B] (or any condition pytree of [B, ...] arrays, e.g. captions'
  encodings) from noise of `shape` (no batch dim); returns (x0, nfe).

  The noise is N(0, I) drawn from `rng` itself; stochastic samplers draw from a key folded
  from it. nfe is an int for the fixed-step methods and a traced scalar for dopri5.
  """
  path = path or paths.LinearPath()
  x1 = jax.random.normal(rng, (jax.tree.leaves(labels)[0].shape[0], *shape), jnp.float32)
  if noise_sharding is not None:
    x1 = jax.lax.with_sharding_constraint(x1, noise_sharding)
  step_rng = jax.random.fold_in(rng, 1)
  fn = guidance.cfg_velocity(velocity_fn, options.cfg_scale, null_label,
                             options.guidance_interval)
  m = options.method
  if m == 'euler':
    return ode.euler(fn, x1, labels, options.grid())
  if m == 'heun':
    return ode.heun(fn, x1, labels, options.grid())
  if m == 'flow_map':
    return flow_map.few_step(fn, x1, labels, options.grid())
  if m == 'dopri5':
    return ode.dopri5(fn, x1, labels, rtol=options.rtol, atol=options.atol,
                      max_steps=options.max_steps)
  if m == 'sde':
    return sde.euler_maruyama(fn, x1, labels, options.grid(), step_rng, path=path,
                              diffusion=options.diffusion,
                              diffusion_norm=options.diffusion_norm)
  return stablevs.stablevs(fn, x1, labels, options.grid(), step_rng,
                           split=options.stablevs_split, eta=options.stablevs_eta, path=path)


def sample(velocity_fn: VelocityFn, rng: jax.Array, labels: jax.Array, shape: tuple[int, ...],
           *, null_label: int | None = None, path=None, options: SamplerOptions | None = None,
           **option_fields: Any) -> jax.Array:
  """`sample_with_nfe` without the count; options as a SamplerOptions or as its fields."""
  if options is None:
    options = SamplerOptions(**option_fields)
  elif option_fields:
    options = dataclasses.replace(options, **option_fields)
  return sample_with_nfe(velocity_fn, rng, labels, shape, options, null_label=null_label,
                         path=path)[0]


def make_batch_sampler(apply_fn: Callable, mesh, shape: tuple[int, ...],
                       options: SamplerOptions, *, null_label: int | None, path=None,
                       params_shardings: Any = None) -> Callable:
  """Jitted (params, rng, labels [B]) → (x0 [B, *shape], nfe), the batch split over the mesh.

  `apply_fn(params, x, t, y)` is the network; params keep `params_shardings` (default: as
  they come). B must be divisible by the number of batch shards. The noise is drawn in one
  piece and constrained to the batch sharding, so the result does not depend on the mesh.
  """
  x_sharding = sharding.batch_sharding(mesh, 1 + len(shape))
  label_sharding = sharding.batch_sharding(mesh, 1)

  replicated = NamedSharding(mesh, P())

  def draw(params, rng, labels):
    labels = jax.tree.map(lambda y: jax.lax.with_sharding_constraint(
        y, sharding.batch_sharding(mesh, y.ndim)), labels)
    return sample_with_nfe(lambda x, t, y, *t_end: apply_fn(params, x, t, y, *t_end), rng,
                           labels, shape, options, null_label=null_label, path=path,
                           noise_sharding=x_sharding)

  out_shardings = (x_sharding, replicated)
  if params_shardings is None:  # params keep the shardings they arrive with
    return jax.jit(draw, out_shardings=out_shardings)
  return jax.jit(draw, in_shardings=(params_shardings, replicated, label_sharding),
                 out_shardings=out_shardings)
