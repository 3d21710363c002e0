"""The network interface of the trainer, the samplers and evaluation: a Flax NNX model used
functionally, its parameters a plain nested dict of arrays.

Everything that needs a network (the train step, sample grids, `--mode=sample/eval`,
checkpoint import) gets it here from the config, so adding a model family is one entry in
`model_factory` and one in `check_config`, with no change to the code that uses it.

Two families share the interface, and differ only in what the condition y is:

  class   SiT (models/sit.py): y = labels int32 [B]; the null condition is the label C
  text    MMDiT (models/mmdit.py): y = {'tokens' [B, L, E], 'mask' [B, L], 'pooled' [B, E]},
          a caption's encoding (batch_contract TEXT fields); the null condition is the empty
          caption's encoding, stored with the captioned dataset

`Network.condition(batch, labels)` makes y from a batch whose labels were dropped to the null
label for classifier-free guidance (text rows then get the empty caption), and the samplers
pass y through untouched (every operation on it is a pytree map), so the step, the samplers,
guidance, evaluation and checkpoints serve both families unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from pafm_jax import batch_contract as fields
from pafm_jax.models import attention, mmdit, sit

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Network:
  """A Flax NNX model split into a static graph and a pure-dict parameter tree."""
  graphdef: Any
  abstract_params: Any      # nested dict of jax.ShapeDtypeStruct
  logical_axes: Any         # nested dict of tuples of logical axis names
  null_label: int
  family: str = 'class'     # 'class' (SiT) or 'text' (MMDiT)
  # Text family: () → the empty caption's encoding {'tokens' [L, E], 'mask' [L], 'pooled' [E]}
  # (read from the dataset on first use, so building a network reads no data).
  null_text_loader: Callable[[], dict] | None = None

  def apply(self, params, x, t, y, t_end=None):
    """Velocity f_θ(x_t, t, y): x [B, H, W, C], t [B], y the condition → [B, H, W, C].

    For a two-time (flow-map) network, `t_end` [B] asks for φ_{t,t_end}(x) (METHOD.md §5);
    without it the result is the diagonal φ_{t,t}, the velocity, so every ODE sampler also
    runs on a flow-map model.
    """
    model = nnx.merge(self.graphdef, params)
    if self.family == 'text':
      return model(x, t, (y['tokens'], y['mask'], y['pooled']))
    return model(x, t, y) if t_end is None else model(x, t, y, t_end=t_end)

  def apply_with_projection(self, params, x, t, y):
    """(velocity [B, H, W, C], projector tokens z̃ [B, T, F]) of a SiT with a REPA projector
    (config.model.projector; repa.py)."""
    model = nnx.merge(self.graphdef, params)
    return model(x, t, y, project=True)

  @property
  def null_condition(self):
    """What guidance substitutes for a dropped condition: the null label, or for text the
    empty caption's encoding (one row, broadcast over the batch by sampling.guidance)."""
    if self.family == 'class':
      return self.null_label
    if self.null_text_loader is None:
      raise ValueError('this text network was built without its dataset, so the empty '
                       "caption's encoding (the null condition) is unknown.")
    return self.null_text_loader()

  def condition(self, batch: dict, labels: jax.Array):
    """y of a training batch; `labels` [B] are its labels after the CFG drop (rows equal to
    null_label take the null condition)."""
    if self.family == 'class':
      return labels
    text = {'tokens': batch[fields.TEXT_TOKENS], 'mask': batch[fields.TEXT_MASK],
            'pooled': batch[fields.COND_EMBEDDING]}
    dropped = labels == self.null_label
    return jax.tree.map(
        lambda row, null: jnp.where(dropped.reshape((-1,) + (1,) * null.ndim),
                                    jnp.asarray(null, row.dtype), row),
        text, self.null_condition)


def family(config: ml_collections.ConfigDict) -> str:
  """'text' for an MMDiT config.model.name, 'class' for SiT."""
  return 'text' if config.model.name in mmdit.MMDIT_SIZES else 'class'


def check_config(config: ml_collections.ConfigDict) -> None:
  """config.model against the data it will see; raises naming the field to change."""
  sizes = {**sit.SIT_SIZES, **mmdit.MMDIT_SIZES}
  if config.model.name not in sizes:
    raise ValueError(f'unknown model {config.model.name!r}; config.model.name must be one of '
                     f'{sorted(sizes)}.')
  attention.check_config(config)
  text_data = fields.is_text_conditional(config)
  if family(config) == 'text' and not text_data:
    raise ValueError(f'{config.model.name} is text-conditional: it needs captioned data '
                     f"(config.data.name='fashion_mnist_captions' or 'captioned'), not "
                     f'{config.data.name!r}. Use a SiT model for class-conditional data.')
  condition = config.objective.pafm.condition if config.objective.name == 'pafm' else None
  if family(config) == 'class' and condition == 'text' and text_data:
    raise ValueError(f"config.objective.pafm.condition='text' weighs candidates by captions that "
                     f'{config.model.name} never sees; train an MMDiT model on captioned data.')
  if family(config) == 'text' and condition == 'class' and config.data.num_classes == 1:
    raise ValueError("config.objective.pafm.condition='class' with config.data.num_classes=1 "
                     'ignores the captions (every candidate has the one class); use '
                     "config.objective.pafm.condition='text'.")
  if family(config) == 'text' and is_flow_map(config):
    raise ValueError('flow maps are trained with SiT models; MMDiT has no two-time variant.')
  patch = sizes[config.model.name]['patch_size']
  if config.data.image_size % patch:
    raise ValueError(f'config.data.image_size={config.data.image_size} is not divisible by the '
                     f'patch size {patch} of {config.model.name}; pick another model or size.')
  if config.model.projector:
    if family(config) == 'text':
      raise ValueError('config.model.projector=True: the REPA projector head is built for SiT '
                       'models; MMDiT has none.')
    depth = sizes[config.model.name]['depth']
    if not 1 <= config.model.projector_depth <= depth:
      raise ValueError(f'config.model.projector_depth={config.model.projector_depth} but '
                       f'{config.model.name} has blocks 1..{depth}.')
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

  options = dict(remat=config.model.remat, remat_policy=config.model.remat_policy,
                 attention_impl=config.model.attention)
  projector = projector_shape(config)

  def make(rng: jax.Array) -> nnx.Module:
    if family(config) == 'text':
      return mmdit.mmdit_from_name(
          config.model.name, input_size=config.data.image_size,
          in_channels=config.data.channels, text_width=config.data.text_width,
          rngs=nnx.Rngs(params=rng), dtype=DTYPES[config.model.dtype],
          param_dtype=jnp.float32, **options)
    return sit.sit_from_name(
        config.model.name, input_size=config.data.image_size,
        in_channels=config.data.channels, num_classes=config.data.num_classes,
        rngs=nnx.Rngs(params=rng), dtype=DTYPES[config.model.dtype],
        param_dtype=jnp.float32, two_time=two_time, projector=projector, **options)
  return make


def projector_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
  """(block it reads after, hidden width, feature width) of the REPA projector, or None."""
  if not config.model.projector:
    return None
  m = config.model
  return (int(m.projector_depth), int(m.projector_dim), int(m.projector_features))


def build_network(config: ml_collections.ConfigDict, two_time: bool | None = None) -> Network:
  """Builds the model abstractly (no memory) to get its graph, shapes and logical axes."""
  abstract_model = nnx.eval_shape(lambda: model_factory(config, two_time)(jax.random.key(0)))
  graphdef, state = nnx.split(abstract_model, nnx.Param)
  logical = jax.tree.map(tuple, nnx.to_pure_dict(nnx.get_partition_spec(state)),
                         is_leaf=lambda x: isinstance(x, P))
  kind = family(config)
  loader = functools.lru_cache(maxsize=1)(lambda: null_text(config)) if kind == 'text' else None
  return Network(graphdef, nnx.to_pure_dict(state), logical, config.data.num_classes, kind,
                 loader)


def null_text(config: ml_collections.ConfigDict) -> dict:
  """The empty caption's encoding, as the captioned training split stores it (row 0)."""
  from pafm_jax.data import captioned, pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.load_source(config.data)
  rows = source.text_rows(np.asarray([captioned.NULL_CAPTION_ROW]), config.data.max_tokens)
  return {'tokens': rows[fields.TEXT_TOKENS][0], 'mask': rows[fields.TEXT_MASK][0],
          'pooled': rows[fields.COND_EMBEDDING][0]}


def count_params(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
