"""Samplers of the probability-flow ODE (and, later, SDE and few-step samplers)."""

from pafm_jax.sampling.ode import SAMPLERS, cfg_velocity, sample, time_grid

__all__ = ['SAMPLERS', 'cfg_velocity', 'sample', 'time_grid']
