"""Device mesh, logical-axis rules and the shardings derived from them.

Networks name their array dimensions logically ('embed', 'mlp', 'act_batch', ...); one table of
rules in the config maps each logical name to a mesh axis (or to None, replicated). Nothing in
the model code mentions a mesh axis, so the same model runs unsharded on a laptop and
FSDP-sharded on a pod (the maxtext/big_vision convention).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp')
# The batch dimension is split over every mesh axis: FSDP shards parameters over 'fsdp' and
# still gives each device its own slice of the batch.
BATCH_AXES = ('data', 'fsdp')

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, Any]]

_active: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    'pafm_jax_sharding', default=None)


def mesh_shape(requested: dict[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves the requested ('data', 'fsdp') sizes; a single -1 takes the remaining devices."""
  sizes = [int(requested[a]) for a in MESH_AXES] if isinstance(requested, dict) else [
      int(s) for s in requested]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f'mesh needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}.')
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if fixed <= 0 or num_devices % fixed:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not '
                       f'divisible by {fixed}; set config.mesh to sizes whose product divides '
                       'the device count.')
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but '
                     f'{num_devices} are available; use -1 for one axis to take the rest.')
  return tuple(sizes)


def check_config(config, num_devices: int, process_count: int) -> tuple[int, ...]:
  """config.mesh against the devices, and the global batch against the mesh and the processes;
  returns the resolved mesh shape."""
  shape = mesh_shape(dict(config.mesh), num_devices)
  shards = math.prod(shape)
  if config.global_batch_size % shards:
    raise ValueError(f'config.global_batch_size={config.global_batch_size} is not divisible by '
                     f'the {shards} batch shards of mesh {dict(zip(MESH_AXES, shape))}.')
  if config.global_batch_size % process_count:
    raise ValueError(f'config.global_batch_size={config.global_batch_size} is not divisible by '
                     f'the {process_count} processes.')
  return shape


def create_mesh(requested: dict[str, int] | Sequence[int],
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes).

  Axis types are Auto: the train step states input/output shardings and a few activation
  constraints, and XLA's partitioner propagates the rest. (Explicit axes, the default of
  `jax.make_mesh` in this JAX, would make every op's sharding part of its type.)
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(requested, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(logical: LogicalAxes, rules: Rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec through `rules` (first match wins).

  With `shape` and `mesh`, a dimension that the mesh axes do not divide is replicated instead
  (e.g. an 11-row label table on a 4-way fsdp axis); a mesh axis is used at most once.
  """
  table: dict[str, Any] = {}
  for name, axes in rules:
    table.setdefault(name, axes)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical):
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    if used.intersection(axes_t):
      spec.append(None)
      continue
    if shape is not None and mesh is not None:
      size = math.prod(mesh.shape[a] for a in axes_t)
      if shape[i] % size:
        logging.debug('replicating dim %d (%s, size %d) not divisible by %s=%d', i, name,
                      shape[i], axes_t, size)
        spec.append(None)
        continue
    used.update(axes_t)
    spec.append(axes_t[0] if len(axes_t) == 1 else axes_t)
  return P(*spec)


def tree_shardings(abstract_tree: Any, logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of arrays, given a matching tree of logical-axis tuples.

  `logical_tree` leaves are tuples (or None for replicated); they are matched to the array
  leaves of `abstract_tree` by tree structure.
  """
  def one(x, logical):
    if logical is None or len(logical) != len(x.shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(logical, rules, x.shape, mesh))

  return jax.tree.map(one, abstract_tree, logical_tree,
                      is_leaf=lambda l: l is None or isinstance(l, tuple))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """The leading (batch) dim split over every mesh axis, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates `constrain` for the code traced inside the block."""
  token = _active.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _active.reset(token)


def constrain(x: jax.Array, logical: LogicalAxes) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside `logical_rules`."""
  active = _active.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(logical, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class BatchMesh:
  """Runs fn(params, x) jitted with the batch of x split over a 1-D mesh (default: every
  device) and the parameters replicated: how the frozen networks used outside the train step
  (VAE, autoencoder, DINOv2) run. A batch that does not divide by the mesh is padded with
  zeros and the padding dropped from the result."""

  def __init__(self, mesh: Mesh | None = None):
    self.mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), ('batch',))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))

  def replicate(self, params: Any) -> Any:
    return jax.device_put(params, self.replicated)

  def jit(self, fn):
    return jax.jit(fn, in_shardings=(self.replicated, self.batch), out_shardings=self.batch)

  def run(self, fn, params: Any, x) -> Any:
    """fn (from `jit`) on x [B, ...] (numpy or jax): the outputs' first B rows."""
    b = x.shape[0]
    pad = -b % self.mesh.size if b else self.mesh.size
    if pad:
      widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
      x = np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(x, widths)
    if isinstance(x, np.ndarray):
      x = x.astype(np.float32, copy=False)
    # Numpy goes straight to the shards, not through one device; a jax array laid out
    # otherwise (another jit's output) is resharded, which jit's in_shardings would refuse.
    out = fn(params, jax.device_put(x, self.batch))
    return jax.tree.map(lambda y: y[:b], out)
