"""Command-line tools besides training: `python -m pafm_jax.tools.<name>`."""
