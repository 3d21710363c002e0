"""Samplers: Euler, Heun and dopri5 on the probability-flow ODE, Euler–Maruyama on the SDE,
StableVS; classifier-free guidance with a guidance interval; time grids."""

from pafm_jax.sampling.guidance import cfg_velocity
from pafm_jax.sampling.sampler import (SAMPLERS, SamplerOptions, check_config, make_batch_sampler,
                                       sample, sample_with_nfe)
from pafm_jax.sampling.schedules import shift_time, stablevs_grid, time_grid

__all__ = ['SAMPLERS', 'SamplerOptions', 'cfg_velocity', 'check_config', 'make_batch_sampler', 'sample',
           'sample_with_nfe', 'shift_time', 'stablevs_grid', 'time_grid']
