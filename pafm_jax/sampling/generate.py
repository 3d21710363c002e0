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


def make_generator(config: ml_collections.ConfigDict, apply_fn: Callable, null_label: int,
                   mesh, options: sampler.SamplerOptions | None = None,
                   log_progress: bool = True) -> Callable:
  """(params, rng, labels [N]) → (images [N, H, W, C], nfe per sample).

  Batches of `sample_batch_size` run through one compiled, batch-sharded sampler (the last
  one padded by repeating labels); batch `start` draws its noise from fold_in(rng, start).
  """
  options = options or sampler.SamplerOptions.from_config(config.sample)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  draw = sampler.make_batch_sampler(apply_fn, mesh, shape, options, null_label=null_label,
                                    path=paths.get_path(config.objective.path))
  shards = sharding.num_batch_shards(mesh)

  def generate(params, rng, labels: np.ndarray):
    num = len(labels)
    batch = min(sample_batch_size(config, mesh), -(-num // shards) * shards)
    images, nfes = [], []
    t0 = time.time()
    for start in range(0, num, batch):
      chunk = labels[start:start + batch]
      padded = np.resize(chunk, batch)   # repeats labels to fill the last batch
      x, nfe = draw(params, jax.random.fold_in(rng, start), jnp.asarray(padded))
      images.append(gather(x)[:len(chunk)])
      nfes.append(float(nfe))
      done = start + len(chunk)
      rate = done / max(time.time() - t0, 1e-9)
      if log_progress:
        logging.info('sampled %d/%d (%.1f samples/s, ETA %.0f s, %.1f NFE)', done, num, rate,
                     (num - done) / rate, nfes[-1])
    return np.concatenate(images), float(np.mean(nfes))

  return generate
