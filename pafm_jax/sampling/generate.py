"""Drawing many samples from a network: batched, batch-sharded, with progress in the log.

The one sampler path of pafm_jax: the train loop's sample grids, `--mode=sample` and the
samples of `--mode=eval` all draw through `make_generator`.
"""

from __future__ import annotations

import time
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from pafm_jax import paths, sharding
from pafm_jax.sampling import sampler


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded array as one host array (on every process)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def sample_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
  """config.sample.batch_size rounded up to a multiple of the mesh's batch shards."""
  shards = sharding.num_batch_shards(mesh)
  return -(-config.sample.batch_size // shards) * shards


def class_balanced_labels(num: int, num_classes: int) -> np.ndarray:
  """int32 [num] cycling through the classes."""
  return (np.arange(num) % num_classes).astype(np.int32)


def grid_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  """A row per class (at most 10 rows), config.sample.per_class columns: int32 [rows·cols]."""
  rows = min(config.data.num_classes, 10)
  return np.repeat(np.arange(rows), config.sample.per_class).astype(np.int32)


def conditions_for_labels(config: ml_collections.ConfigDict, family: str, labels: np.ndarray,
                          split: str = 'test'):
  """(y, captions) to sample `labels` [N]: the labels themselves (captions None), or for a
  text network a real caption of `split` for each label (data/captioned.py)."""
  if family == 'class':
    return labels, None
  from pafm_jax.data import captioned, pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.load_source(config.data, split)
  y, captions, _ = captioned.captions_for_labels(source, labels, config.data.max_tokens)
  return y, captions


def grid_conditions(config: ml_collections.ConfigDict, family: str, captions=()):
  """(y, row titles) of a sample grid with config.sample.per_class columns: a row per class,
  or for a text network a row per caption (typed `captions`, encoded now, or else the first
  caption of each class in the test split)."""
  labels = grid_labels(config)
  if family == 'class':
    return labels, None
  from pafm_jax.data import captioned, pipeline  # pylint: disable=g-import-not-at-top
  per_row = config.sample.per_class
  # Captions of the test split when there is one (a packed dataset may have only `train`).
  split = 'test' if captioned.is_written(pipeline.captioned_root(config.data), 'test') \
      else config.data.split
  source = pipeline.load_source(config.data, split)
  if captions:
    from pafm_jax import text  # pylint: disable=g-import-not-at-top
    encoder = text.load_encoder(config.text.encoder or None)
    if encoder.name != source.metadata['encoder']:
      raise ValueError(f'the model was trained on captions encoded by '
                       f'{source.metadata["encoder"]}, but config.text.encoder loads '
                       f'{encoder.name}; point config.text.encoder at the same encoder.')
    rows = captioned.typed_captions(encoder, list(captions), config.data.max_tokens)
    titles = list(captions)
  else:
    rows, titles, _ = captioned.captions_for_labels(source, labels[::per_row],
                                                    config.data.max_tokens)
  return {k: np.repeat(v, per_row, axis=0) for k, v in rows.items()}, titles


def make_generator(config: ml_collections.ConfigDict, apply_fn: Callable, null_label: int,
                   mesh, options: sampler.SamplerOptions | None = None,
                   log_progress: bool = True) -> Callable:
  """(params, rng, labels [N]) → (images [N, H, W, C], nfe per sample).

  `labels` may be any condition pytree of [N, ...] host arrays (captions' encodings for a
  text network). Batches of `sample_batch_size` run through one compiled, batch-sharded
  sampler (the last one padded by repeating conditions); batch `start` draws its noise from
  fold_in(rng, start).
  """
  options = options or sampler.SamplerOptions.from_config(config.sample)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  draw = sampler.make_batch_sampler(apply_fn, mesh, shape, options, null_label=null_label,
                                    path=paths.get_path(config.objective.path))
  shards = sharding.num_batch_shards(mesh)

  def generate(params, rng, labels: np.ndarray):
    num = len(jax.tree.leaves(labels)[0])
    batch = min(sample_batch_size(config, mesh), -(-num // shards) * shards)
    images, nfes = [], []
    t0 = time.time()
    for start in range(0, num, batch):
      rows = np.arange(start, min(num, start + batch))
      padded = np.resize(rows, batch)   # repeats conditions to fill the last batch
      chunk = jax.tree.map(lambda y: jnp.asarray(np.asarray(y)[padded]), labels)
      x, nfe = draw(params, jax.random.fold_in(rng, start), chunk)
      images.append(gather(x)[:len(rows)])
      nfes.append(float(nfe))
      done = start + len(rows)
      rate = done / max(time.time() - t0, 1e-9)
      if log_progress:
        logging.info('sampled %d/%d (%.1f samples/s, ETA %.0f s, %.1f NFE)', done, num, rate,
                     (num - done) / rate, nfes[-1])
    return np.concatenate(images), float(np.mean(nfes))

  return generate
