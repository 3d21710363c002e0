"""Experiments built on pafm_jax: sweeps that compare methods at equal budgets."""
