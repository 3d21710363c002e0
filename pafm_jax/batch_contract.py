"""The batch contract: every field a training batch can hold, its shape, dtype and producer.

The data pipeline, its retrieval stage, the StableVM bank, `train.batch_spec` and the
objectives all name batch fields through this module, and which producers are active is a
decision of the config (`active_producers`), checked up front, never inferred from which keys
happen to be in a batch.

Shapes are written with symbols, resolved from the config by `dims`:
  B  global batch size            S  the sample shape (image_size, image_size, channels)
  k  retrieved neighbours per row (config.retrieval.k)
  M  memory-bank slots per class (config.objective.stablevm.bank_capacity)
  L  caption tokens per row (config.data.max_tokens)
  E  text-encoder width (config.data.text_width)
  N  patch features of the REPA encoder per image   F  their width (config.model.projector_*)
  P  the pixel shape behind latents (config.data.pixel_size, pixel_size, pixel_channels)

Dtypes are those the step sees; the host may hand wider integers (dataset ids are int64 in
the pipeline), which the assembly into global arrays casts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Producers: who writes a field.
DATA = 'data'            # pipeline.batch_reader: every batch
RETRIEVAL = 'retrieval'  # retrieval.stage.NeighbourStage (config.retrieval.mode != 'none')
NOISE = 'noise'          # the same stage in 'noisy' mode: t and ε drawn on the host
BANK = 'bank'            # objectives.bank_training_batch, inside the step (StableVM)
TEXT = 'text'            # a captioned source (data/captioned.py): caption encodings per row
NEIGHBOUR_TEXT = 'neighbour_text'  # the retrieval stage on captioned data: neighbours' too
IMAGE_TEXT = 'image_text'  # a captioned source with LiT image embeddings (config.data.lit_dir)
NEIGHBOUR_IMAGE_TEXT = 'neighbour_image_text'  # the retrieval stage: the neighbours' too
ALIGNMENT = 'alignment'  # the frozen REPA encoder, inside the step (repa.py)
LATENT_PIXELS = 'latent_pixels'  # a latent dataset's stored pixels, for REPA's encoder

IMAGE, LABEL, ID = 'image', 'label', 'id'
T, EPS = 't', 'eps'
NEIGHBOURS, NEIGHBOUR_LABELS, NEIGHBOUR_IDS = 'neighbours', 'neighbour_labels', 'neighbour_ids'
BANK_CANDIDATES, BANK_VALID = 'bank_candidates', 'bank_valid'
COND_EMBEDDING, NEIGHBOUR_COND_EMBEDDING = 'cond_embedding', 'neighbour_cond_embedding'
TEXT_TOKENS, TEXT_MASK = 'text_tokens', 'text_mask'
IMAGE_EMBEDDING, NEIGHBOUR_IMAGE_EMBEDDING = 'image_embedding', 'neighbour_image_embedding'
REPA_FEATURES = 'repa_features'
LATENT_STD, PIXELS = 'latent_std', 'pixels'


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  shape: tuple[str, ...]   # symbols of the module docstring; 'S' expands to the sample shape
  dtype: str
  producer: str
  doc: str


FIELDS: dict[str, Field] = {f.name: f for f in (
    Field(IMAGE, ('B', 'S'), 'float32', DATA, 'clean endpoints x0 (pixels in [-1, 1] or latents)'),
    Field(LABEL, ('B',), 'int32', DATA, 'class labels of the endpoints (also the in-batch '
          "candidates' labels)"),
    Field(ID, ('B',), 'int32', DATA, 'dataset position of each row, the identity the '
          'retrieval index uses: duplicates between candidate sources are removed by it'),
    Field(NEIGHBOURS, ('B', 'k', 'S'), 'float32', RETRIEVAL, "each row's k retrieved items"),
    Field(NEIGHBOUR_LABELS, ('B', 'k'), 'int32', RETRIEVAL, 'their labels'),
    Field(NEIGHBOUR_IDS, ('B', 'k'), 'int32', RETRIEVAL, 'their dataset positions'),
    Field(T, ('B',), 'float32', NOISE, 'training times, drawn where the query x_t/α_t is formed'),
    Field(EPS, ('B', 'S'), 'float32', NOISE, 'the noise of x_t, drawn with t'),
    Field(BANK_CANDIDATES, ('B', 'M', 'S'), 'float32', BANK, "the bank row of each drawn "
          "pair's label (the global pool for a null label)"),
    Field(BANK_VALID, ('B', 'M'), 'bool', BANK, 'which slots of that row are filled'),
    Field(TEXT_TOKENS, ('B', 'L', 'E'), 'float32', TEXT, "the caption's token states, zero "
          'past its end (the empty caption for a row without one)'),
    Field(TEXT_MASK, ('B', 'L'), 'int32', TEXT, '1 for a caption token, 0 for padding'),
    Field(COND_EMBEDDING, ('B', 'E'), 'float32', TEXT, "the caption's pooled sentence vector"),
    Field(NEIGHBOUR_COND_EMBEDDING, ('B', 'k', 'E'), 'float32', NEIGHBOUR_TEXT,
          "the retrieved items' own caption vectors"),
    Field(IMAGE_EMBEDDING, ('B', 'E'), 'float32', IMAGE_TEXT, "the LiT image tower's "
          'embedding of the image, in the caption vectors\' space'),
    Field(NEIGHBOUR_IMAGE_EMBEDDING, ('B', 'k', 'E'), 'float32', NEIGHBOUR_IMAGE_TEXT,
          "the retrieved items' image embeddings"),
    Field(PIXELS, ('B', 'P'), 'float32', LATENT_PIXELS, 'the images behind the latents in '
          "[−1, 1], stored with a latent dataset: REPA's frozen encoder reads them"),
    Field(REPA_FEATURES, ('B', 'N', 'F'), 'float32', ALIGNMENT, "the frozen encoder's patch "
          'features of the clean images the loss is computed on (after StableVM draws them)'),
)}

# Producers that run in the data pipeline (their fields cross the host → device boundary).
PIPELINE_PRODUCERS = (DATA, TEXT, IMAGE_TEXT, RETRIEVAL, NEIGHBOUR_TEXT, NEIGHBOUR_IMAGE_TEXT,
                      NOISE, LATENT_PIXELS)


def pipeline_draws_noise(config) -> bool:
  """Whether t and ε come from the pipeline: noisy retrieval needs x_t on the host."""
  return config.retrieval.mode == 'noisy'


def active_producers(config) -> tuple[str, ...]:
  """The producers a run of `config` has, in pipeline order, then the step's."""
  active = [DATA]
  text = is_text_conditional(config)
  image_text = text and uses_image_text(config)
  if text:
    active.append(TEXT)
  if image_text:
    active.append(IMAGE_TEXT)
  if config.retrieval.mode != 'none':
    active.append(RETRIEVAL)
    if text:
      active.append(NEIGHBOUR_TEXT)
    if image_text:
      active.append(NEIGHBOUR_IMAGE_TEXT)
  if pipeline_draws_noise(config):
    active.append(NOISE)
  if config.objective.name == 'stablevm':
    active.append(BANK)
  if config.objective.repa.weight > 0:
    if config.data.name == 'latents':
      active.insert(1, LATENT_PIXELS)
    active.append(ALIGNMENT)
  return tuple(active)


# config.data.name of the captioned datasets (data/captioned.py): Fashion-MNIST with templated
# captions, built on first use, and a packed dataset in config.data.captioned_dir.
CAPTIONED_DATASETS = ('fashion_mnist_captions', 'captioned')


def is_text_conditional(config) -> bool:
  """Whether batches carry captions: the data is a captioned dataset (data/captioned.py)."""
  return config.data.name in CAPTIONED_DATASETS


def uses_image_text(config) -> bool:
  """Whether the PAFM text term scores candidates by their LiT image embeddings."""
  p = config.objective.pafm
  return p.condition == 'text' and p.get('text_candidate', 'caption') == 'image'


def dims(config) -> dict[str, tuple[int, ...]]:
  s = config.data.image_size
  return {'B': (config.global_batch_size,), 'k': (config.retrieval.k,),
          'M': (config.objective.stablevm.bank_capacity,),
          'S': (s, s, config.data.channels),
          'L': (config.data.get('max_tokens', 32),), 'E': (config.data.get('text_width', 384),),
          'F': (config.model.projector_features,),
          'P': (config.data.pixel_size, config.data.pixel_size, config.data.pixel_channels)}


def global_shape(field: Field, config) -> tuple[int, ...]:
  d = dims(config)
  return tuple(n for symbol in field.shape for n in d[symbol])


def fields_of(producers) -> tuple[Field, ...]:
  return tuple(f for f in FIELDS.values() if f.producer in producers)


def batch_spec(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Global shapes and dtypes of the fields the data pipeline delivers to the step."""
  pipeline = [p for p in active_producers(config) if p in PIPELINE_PRODUCERS]
  return {f.name: (global_shape(f, config), np.dtype(f.dtype)) for f in fields_of(pipeline)}


def missing_field_error(name: str, have) -> KeyError:
  """The error for a batch that lacks a field the config's producers promise."""
  field = FIELDS[name]
  return KeyError(f'the batch has no {name!r} field ({field.doc}), which producer '
                  f'{field.producer!r} should have added for this config; it has '
                  f'{sorted(have)}. A custom data pipeline must deliver every field of '
                  'batch_contract.batch_spec(config).')
