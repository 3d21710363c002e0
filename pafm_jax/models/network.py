"""The network interface of the trainer, the samplers and evaluation: a Flax NNX model used
functionally, its parameters a plain nested dict of arrays.

Everything that needs a network (the train step, sample grids, `--mode=sample/eval`,
checkpoint import) gets it here from the config, so adding a model family is one entry in
`model_factory` and one in `check_config`, with no change to the code that uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from pafm_jax.models import sit

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Network:
  """A Flax NNX model split into a static graph and a pure-dict parameter tree."""
  graphdef: Any
  abstract_params: Any      # nested dict of jax.ShapeDtypeStruct
  logical_axes: Any         # nested dict of tuples of logical axis names
  null_label: int

  def apply(self, params, x, t, y, t_end=None):
    """Velocity f_θ(x_t, t, y): x [B, H, W, C], t [B], y [B] → [B, H, W, C].

    For a two-time (flow-map) network, `t_end` [B] asks for φ_{t,t_end}(x) (METHOD.md §5);
    without it the result is the diagonal φ_{t,t}, the velocity, so every ODE sampler also
    runs on a flow-map model.
    """
    model = nnx.merge(self.graphdef, params)
    return model(x, t, y) if t_end is None else model(x, t, y, t_end=t_end)


def check_config(config: ml_collections.ConfigDict) -> None:
  """config.model against the data it will see; raises naming the field to change."""
  if config.model.name not in sit.SIT_SIZES:
    raise ValueError(f'unknown model {config.model.name!r}; config.model.name must be one of '
                     f'{sorted(sit.SIT_SIZES)}.')
  patch = sit.SIT_SIZES[config.model.name]['patch_size']
  if config.data.image_size % patch:
    raise ValueError(f'config.data.image_size={config.data.image_size} is not divisible by the '
                     f'patch size {patch} of {config.model.name}; pick another model or size.')
  if config.model.projector:
    raise ValueError('config.model.projector=True asks for a VA-REPA projector head, which '
                     'pafm_jax does not implement yet; set it to False.')
  if config.model.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype must be one of {sorted(DTYPES)}, '
                     f'got {config.model.dtype!r}.')


def is_flow_map(config: ml_collections.ConfigDict) -> bool:
  """Whether config trains a two-time flow-map network (METHOD.md §5)."""
  return config.objective.name == 'flow_map'


def model_factory(config: ml_collections.ConfigDict,
                  two_time: bool | None = None) -> Callable[[jax.Array], nnx.Module]:
  """rng → a freshly initialised model of config.model for config.data's samples.

  two_time: None follows the config (`is_flow_map`); False builds the one-time velocity
  network of the same size (a flow map's teacher).
  """
  two_time = is_flow_map(config) if two_time is None else two_time

  def make(rng: jax.Array) -> nnx.Module:
    return sit.sit_from_name(
        config.model.name, input_size=config.data.image_size,
        in_channels=config.data.channels, num_classes=config.data.num_classes,
        rngs=nnx.Rngs(params=rng), dtype=DTYPES[config.model.dtype],
        param_dtype=jnp.float32, remat=config.model.remat, two_time=two_time)
  return make


def build_network(config: ml_collections.ConfigDict, two_time: bool | None = None) -> Network:
  """Builds the model abstractly (no memory) to get its graph, shapes and logical axes."""
  abstract_model = nnx.eval_shape(lambda: model_factory(config, two_time)(jax.random.key(0)))
  graphdef, state = nnx.split(abstract_model, nnx.Param)
  logical = jax.tree.map(tuple, nnx.to_pure_dict(nnx.get_partition_spec(state)),
                         is_leaf=lambda x: isinstance(x, P))
  return Network(graphdef, nnx.to_pure_dict(state), logical, config.data.num_classes)


def count_params(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
