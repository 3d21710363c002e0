"""The one place a config is validated: every subsystem checks its own fields with the
`check_config` beside its code, and `validate` runs them all before any data is read, any
index is touched or anything is compiled.
"""

from __future__ import annotations

import jax
import ml_collections

from pafm_jax import (evaluation, fault_tolerance, objectives, paths, sampling, sharding,
                      train_state)
from pafm_jax.data import pipeline
from pafm_jax.models import network
from pafm_jax.retrieval import dataset_index

# (name, check(config)) in the order a reader would fix them.
SUBSYSTEM_CHECKS = (
    ('data', pipeline.check_config),
    ('model', network.check_config),
    ('path', paths.check_config),
    ('objective', objectives.check_config),
    ('retrieval', dataset_index.check_config),
    ('sampling', sampling.check_config),
    ('evaluation', evaluation.check_config),
    ('loop', train_state.check_config),
    ('fault tolerance', fault_tolerance.check_config),
)


def validate(config: ml_collections.ConfigDict, num_devices: int,
             process_count: int) -> tuple[int, ...]:
  """Raises ValueError naming the field to change; returns the resolved mesh shape."""
  for _, check in SUBSYSTEM_CHECKS:
    check(config)
  return sharding.check_config(config, num_devices, process_count)


def validated_mesh(config: ml_collections.ConfigDict):
  """Validates the config against the devices of this run, then builds its mesh."""
  shape = validate(config, jax.device_count(), jax.process_count())
  return sharding.create_mesh(dict(zip(sharding.MESH_AXES, shape)))
