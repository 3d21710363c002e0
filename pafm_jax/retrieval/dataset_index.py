"""The retrieval index of a config's training set: where it lives, what it must match, and how
it is built (`--mode=build_index`, or automatically on the first training run).

An index is tied to (dataset, key transform, class layout). `check` compares an existing
index with the config before training starts; a mismatch names the command that rebuilds it.
The dataset fingerprint is cheap enough to recompute at every start: name, split, size and the
sha256 of 1 024 evenly spaced examples (pixels and labels), read through the data source.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from pafm_jax.data import pipeline
from pafm_jax.retrieval import index as index_lib
from pafm_jax.retrieval import keys as keys_lib

DEFAULT_SUBDIR = 'retrieval_index'
LOCAL_CACHE = '~/.cache/pafm_jax/retrieval_index'
FINGERPRINT_EXAMPLES = 1024
BUILD_CHUNK = 4096
# Metadata fields that must equal the config's for an index to be used.
MATCHED_FIELDS = ('dataset', 'key', 'partition')


def build_command(config_hint: str = '<your config>', workdir: str = '<workdir>') -> str:
  return (f'python -m pafm_jax.main --config={config_hint} --workdir={workdir} '
          '--mode=build_index')


def index_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.retrieval.index_dir, or <workdir>/retrieval_index. On a multi-host run each process
  reads the directory at this path on its own disk; for a bucket workdir (gs://...) the
  default is therefore a local one, ~/.cache/pafm_jax/retrieval_index/<last workdir part>."""
  d = config.retrieval.index_dir
  if not d and '://' in workdir:
    d = os.path.join(LOCAL_CACHE, os.path.basename(workdir.rstrip('/')) or 'default')
  d = d or os.path.join(workdir, DEFAULT_SUBDIR)
  if '://' in d:
    raise ValueError(f'config.retrieval.index_dir={d!r} must be a local path (ScaNN reads '
                     'its files from disk): copy the index to each host, e.g. with '
                     'launch/gcp_tpu.sh setup --index=gs://..., and point index_dir at the copy.')
  return os.path.abspath(os.path.expanduser(d))


def partition_kind(config: ml_collections.ConfigDict) -> str:
  """'class' (neighbours of the sample's class) for class data, 'none' (one index) for text."""
  return 'none' if config.objective.pafm.condition == 'text' else 'class'


def dataset_fingerprint(data_config, source) -> dict[str, Any]:
  n = len(source)
  ids = np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_EXAMPLES)).astype(np.int64))
  batch = pipeline.batch_reader(source, pipeline.sample_shape(data_config),
                                text_tokens=False)(ids)
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(batch['image'], np.float32).tobytes())
  h.update(np.ascontiguousarray(batch['label'], np.int64).tobytes())
  return {'name': data_config.name, 'split': data_config.get('split', 'train'),
          'num_examples': n, 'sample_sha256': h.hexdigest()}


def expected_metadata(config: ml_collections.ConfigDict, source) -> dict[str, Any]:
  partition = partition_kind(config)
  return {
      'dataset': dataset_fingerprint(config.data, source),
      'key': keys_lib.KeyTransform.from_config(config).describe(),
      'partition': {'kind': partition,
                    'num_classes': config.data.num_classes if partition == 'class' else 1},
  }


RETRIEVAL_MODES = ('none', 'clean', 'noisy')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Config errors of the retrieval section, before any data is read."""
  r = config.retrieval
  if r.mode not in RETRIEVAL_MODES:
    raise ValueError(f'config.retrieval.mode must be one of {RETRIEVAL_MODES}, got '
                     f'{r.mode!r}.')
  if r.mode == 'none':
    return
  if r.backend not in index_lib.BACKENDS:
    raise ValueError(f'unknown retrieval backend {r.backend!r}; config.retrieval.backend must '
                     f'be one of {index_lib.BACKENDS}.')
  keys_lib.KeyTransform.from_config(config)  # raises on a bad key transform
  if r.k < 1:
    raise ValueError(f'config.retrieval.k must be ≥ 1, got {r.k}.')


def check(config: ml_collections.ConfigDict, directory: str, expected: dict[str, Any],
          *, config_hint: str = '<your config>', workdir: str = '<workdir>') -> dict:
  """Raises RetrievalIndexError naming the rebuild command when the index at `directory` was
  built for another dataset, key transform or class layout, or has too few items per class."""
  metadata = index_lib.read_metadata(directory)
  rebuild = build_command(config_hint, workdir)
  for field in MATCHED_FIELDS:
    if metadata.get(field) != expected[field]:
      raise index_lib.RetrievalIndexError(
          f'the retrieval index at {directory} was built for {field} {metadata.get(field)}, '
          f'but this config has {expected[field]}. Rebuild it with `{rebuild}` (or point '
          'config.retrieval.index_dir elsewhere).')
  check_k(config, metadata['partition_sizes'])
  if config.retrieval.mode == 'clean' and metadata.get('clean_k', 0) < config.retrieval.k:
    raise index_lib.RetrievalIndexError(
        f'the retrieval index at {directory} precomputed {metadata.get("clean_k", 0)} clean '
        f'neighbours per item but config.retrieval.k={config.retrieval.k}. Rebuild it with '
        f'`{rebuild}`.')
  return metadata


def check_k(config: ml_collections.ConfigDict, partition_sizes) -> None:
  k = config.retrieval.k
  # Clean neighbours exclude the item itself; noisy ones may include it.
  room = min(partition_sizes) - (1 if config.retrieval.mode == 'clean' else 0)
  if k > room:
    what = 'class' if len(partition_sizes) > 1 else 'dataset'
    raise ValueError(f'config.retrieval.k={k} is larger than the smallest {what} allows '
                     f'({min(partition_sizes)} items, sizes {list(partition_sizes)}); lower '
                     'config.retrieval.k.')


def read_keys(config: ml_collections.ConfigDict, source) -> tuple[np.ndarray, np.ndarray]:
  """Keys float32 [N, dim] and labels int32 [N] of the whole split, read in chunks."""
  transform = keys_lib.KeyTransform.from_config(config)
  read = pipeline.batch_reader(source, pipeline.sample_shape(config.data), text_tokens=False)
  n = len(source)
  keys = np.zeros((n, transform.dim), np.float32)
  labels = np.zeros((n,), np.int32)
  t0, next_report = time.time(), 0.1
  for start in range(0, n, BUILD_CHUNK):
    ids = np.arange(start, min(n, start + BUILD_CHUNK))
    batch = read(ids)
    keys[ids], labels[ids] = transform(batch['image']), batch['label']
    if (start + len(ids)) / n >= next_report or start + len(ids) == n:
      logging.info('retrieval index: read keys of %d/%d examples (%.0f s)', start + len(ids),
                   n, time.time() - t0)
      next_report += 0.1
  return keys, labels


def build(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = True,
          source=None, expected: dict[str, Any] | None = None) -> index_lib.NeighbourIndex:
  """Builds the config's index into index_directory(config, workdir); `source` and its
  `expected` metadata are computed when not given."""
  check_config(config)
  if source is None:
    source = pipeline.load_source(config.data, config.data.get('split', 'train'))
  if expected is None:
    expected = expected_metadata(config, source)
  keys, labels = read_keys(config, source)
  partitions = expected['partition']['num_classes']
  if partitions > 1 and (labels.min() < 0 or labels.max() >= partitions):
    raise ValueError(f'labels span [{labels.min()}, {labels.max()}] but '
                     f'config.data.num_classes={partitions}.')
  sizes = np.bincount(labels, minlength=partitions) if partitions > 1 else [len(labels)]
  check_k(config, sizes)
  return index_lib.build(
      index_directory(config, workdir), keys, labels if partitions > 1 else None,
      backend=config.retrieval.backend,
      scann_params=index_lib.ScannParams.from_config(config.retrieval.scann),
      clean_k=config.retrieval.k if config.retrieval.mode == 'clean' else 0,
      num_partitions=partitions, metadata=expected, overwrite=overwrite)


def ensure(config: ml_collections.ConfigDict, workdir: str, source=None, *,
           config_hint: str = '<your config>') -> index_lib.NeighbourIndex:
  """The index for training, checked against the config and loaded with every file's
  checksum verified; built (with a log line) when missing and config.retrieval.auto_build is
  on. Runs before anything is compiled."""
  check_config(config)
  directory = index_directory(config, workdir)
  if source is None:
    source = pipeline.load_source(config.data, config.data.get('split', 'train'))
  expected = expected_metadata(config, source)
  built = None
  if not os.path.exists(os.path.join(directory, index_lib.METADATA)):
    if not config.retrieval.auto_build:
      raise index_lib.RetrievalIndexError(
          f'no retrieval index at {directory} and config.retrieval.auto_build=False. Build it '
          f'with `{build_command(config_hint, workdir)}`, or set config.retrieval.index_dir '
          'to an existing index.')
    logging.info('no retrieval index at %s: building it now (config.retrieval.auto_build).',
                 directory)
    built = build(config, workdir, overwrite=True, source=source, expected=expected)
  metadata = check(config, directory, expected, config_hint=config_hint, workdir=workdir)
  logging.info('retrieval index %s: backend %s, %d items, %d partition(s), key %s', directory,
               metadata['backend'], metadata['num_items'], metadata['num_partitions'],
               metadata['key'])
  # An index found on disk is verified file by file; one just built here is already loaded.
  if built is not None:
    return built
  return index_lib.NeighbourIndex.load(directory, verify=True)
