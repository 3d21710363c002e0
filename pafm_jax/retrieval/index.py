"""A nearest-neighbour index over retrieval keys, partitioned by class, stored as a directory.

Two backends answer the same question, "the k keys of partition c nearest (squared L2) to
each query":

  scann  ScaNN (Guo et al. 2020): k-means tree + anisotropic-hash scoring + exact re-ranking.
  exact  brute force: a blocked matmul and argpartition in numpy; the truth for recall, and
         the better choice for small data.

Builds are reproducible: the same keys and config give the same files, so the same answers
and content hash (checked across builds, processes and training-thread counts; another ScaNN
version, or a CPU with other SIMD kernels, may train other files: compare content hashes).

Directory layout (written atomically: built under a sibling temporary name and renamed):

  metadata.json           format, backend, key transform, dataset fingerprint, class sizes,
                          ScaNN parameters and training choices, build time/memory, sha256 of
                          every other file and the content hash over them (`content_hash`)
  part_<c>/ids.npy        int64 [N_c]: dataset ids of partition c (ascending)
  part_<c>/keys.npy       float32 [N_c, dim] (exact backend)
  part_<c>/scann/...      the ScaNN searcher, serialised with *relative* asset paths, so the
                          directory can be copied or moved (e.g. to each TPU host's disk)
  clean_neighbours.npy    int32 [N, k]: each item's k nearest other items of its partition
                          (the 'clean' query mode, precomputed at build time)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import shutil
import time
from typing import Any, Callable

from absl import logging
import numpy as np

BACKENDS = ('scann', 'exact')
FORMAT_VERSION = 1
METADATA = 'metadata.json'
CLEAN_TABLE = 'clean_neighbours.npy'
# Keys per matmul block of the exact search: bounds its [queries, block] distance matrix.
EXACT_BLOCK = 16_384
# ScaNN pads a result row (id 0, distance NaN) when the leaves it scans hold fewer than k
# keys, and k-means leaves are uneven (measured on 100–3 000-key partitions, k = 16 and 64:
# leaves expected to hold ≈ 2 k keys still left up to 13 % of the rows short, 2.5 k none of
# 300 queries). So the scanned leaves should hold LEAF_MARGIN × k keys on average; rows still
# short are searched again over all leaves (ScannSearcher.search).
LEAF_MARGIN = 4
# ScaNN's k-means tree: k-means++ from this seed. Its random initialisation is not
# reproducible: it draws seeded ids into an absl hash set and takes the centres in the set's
# iteration order, which changes from build to build (measured: 2 builds of Fashion-MNIST's
# 10 classes gave other neighbours to 7 of 400 noisy queries at t = 0.7). k-means++ and the
# anisotropic-hash codebooks gave identical files over builds, processes and 1, 2 or 8
# training threads, so training keeps all threads.
CLUSTERING_SEED = 0


class RetrievalIndexError(ValueError):
  """The index directory is missing, corrupted, or does not match the config."""


# ------------------------------------------------------------------------------ exact search


def exact_search(queries: np.ndarray, keys: np.ndarray, k: int,
                 key_norms: np.ndarray | None = None,
                 block: int = EXACT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """The k nearest keys to each query by brute force, nearest first.

  queries [n, d], keys [M, d] float32 → (positions int64 [n, k], squared distances [n, k]).
  ‖q − x‖² = ‖q‖² − 2q·x + ‖x‖²; the ‖q‖² term is the same for every key of a row, so ranking
  uses ‖x‖² − 2q·x and adds ‖q‖² back at the end.
  """
  queries = np.asarray(queries, np.float32)
  keys = np.asarray(keys, np.float32)
  m = keys.shape[0]
  if not 0 < k <= m:
    raise ValueError(f'asked for {k} neighbours among {m} keys.')
  if key_norms is None:
    key_norms = np.einsum('ij,ij->i', keys, keys)
  n = queries.shape[0]
  best_d = np.full((n, 0), np.inf, np.float32)
  best_i = np.zeros((n, 0), np.int64)
  for start in range(0, m, block):
    d = key_norms[None, start:start + block] - 2.0 * (queries @ keys[start:start + block].T)
    cand_d = np.concatenate([best_d, d], axis=1)
    cand_i = np.concatenate([best_i, np.broadcast_to(
        np.arange(start, start + d.shape[1]), d.shape)], axis=1)
    kk = min(k, cand_d.shape[1])
    part = np.argpartition(cand_d, kk - 1, axis=1)[:, :kk]
    best_d = np.take_along_axis(cand_d, part, 1)
    best_i = np.take_along_axis(cand_i, part, 1)
  order = np.argsort(best_d, axis=1, kind='stable')
  q_norms = np.einsum('ij,ij->i', queries, queries)[:, None]
  return (np.take_along_axis(best_i, order, 1),
          np.maximum(np.take_along_axis(best_d, order, 1) + q_norms, 0.0))


class ExactSearcher:
  """Brute force over one partition's keys."""

  def __init__(self, keys: np.ndarray):
    self.keys = np.ascontiguousarray(keys, np.float32)
    self.norms = np.einsum('ij,ij->i', self.keys, self.keys)

  def search(self, queries: np.ndarray, k: int) -> np.ndarray:
    return exact_search(queries, self.keys, k, self.norms)[0]

  def save(self, directory: str) -> None:
    np.save(os.path.join(directory, 'keys.npy'), self.keys)

  @classmethod
  def load(cls, directory: str) -> 'ExactSearcher':
    return cls(np.load(os.path.join(directory, 'keys.npy')))


# ------------------------------------------------------------------------------ ScaNN


@dataclasses.dataclass(frozen=True)
class ScannParams:
  """ScaNN's knobs; 0 picks the size-dependent default of `resolve`."""
  num_leaves: int = 0            # k-means tree leaves (default ≈ √N)
  leaves_to_search: int = 0      # leaves scanned per query (default: half of them for small
                                 # partitions, falling to 5 % at ≈ 2 M keys; at least enough
                                 # for LEAF_MARGIN × k keys, see min_leaves_to_search)
  reorder: int = 0               # candidates re-ranked exactly (default max(100, 8k))
  dims_per_block: int = 2        # anisotropic-hash block size
  training_sample_size: int = 100_000
  threads: int = 0               # search threads (0: ScaNN's default; 1 in data workers)

  @classmethod
  def from_config(cls, scann_config) -> 'ScannParams':
    return cls(**{f.name: int(scann_config[f.name]) for f in dataclasses.fields(cls)
                  if f.name in scann_config})

  def resolve(self, n: int, k: int) -> dict[str, int]:
    """Concrete parameters for a partition of n keys searched for k neighbours."""
    leaves = self.num_leaves or max(1, int(round(np.sqrt(n))))
    leaves = min(leaves, max(1, n // 16))  # ScaNN needs several points per leaf
    # Noisy queries x_t/α_t at large t lie far from every key, where the tree's routing is
    # least reliable (measured on Fashion-MNIST at t = 0.8, k = 64: recall 0.95 scanning a
    # quarter of the leaves, 0.99 scanning half); small partitions can afford half.
    fraction = float(np.clip(0.5 * np.sqrt(20_000 / max(n, 1)), 0.05, 0.5))
    search = self.leaves_to_search or max(1, int(np.ceil(leaves * fraction)))
    # Never so few that the scanned leaves miss k keys (padded rows); the defaults already
    # scan thousands of keys above ~1 000 keys per partition, so this only moves small ones.
    search = max(search, min_leaves_to_search(n, leaves, k))
    return {'num_leaves': leaves, 'leaves_to_search': min(search, leaves),
            'reorder': self.reorder,  # 0: max(100, 8k) for the k of each search
            'dims_per_block': self.dims_per_block,
            'training_sample_size': min(self.training_sample_size, n)}


def min_leaves_to_search(n: int, num_leaves: int, k: int) -> int:
  """Fewest leaves of a partition of n keys in num_leaves leaves that hold LEAF_MARGIN × k keys
  on average (all of them when the partition is that small)."""
  return min(num_leaves, max(1, int(np.ceil(LEAF_MARGIN * k * num_leaves / max(n, 1)))))


def _scann_ops():
  # ScaNN's package init imports TensorFlow (seconds): only paid where an index is used.
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  return scann_ops_pybind


class ScannSearcher:
  """A ScaNN searcher over one partition's keys.

  params: the partition's resolved ScannParams (num_leaves, leaves_to_search, reorder; as
  recorded in metadata.json).
  """

  def __init__(self, searcher, params: dict[str, Any]):
    self.searcher = searcher
    self.reorder = params['reorder']
    self.num_leaves = params['num_leaves']
    self.leaves_to_search = params['leaves_to_search']
    self.size = int(searcher.size())
    self.parallel = True
    self.reported: set[int] = set()  # the k's whose short rows were logged

  @classmethod
  def build(cls, keys: np.ndarray, params: dict[str, int], k: int) -> 'ScannSearcher':
    ops = _scann_ops()
    keys = np.ascontiguousarray(keys, np.float32)
    builder = ops.builder(keys, k, 'squared_l2').tree(
        num_leaves=params['num_leaves'], num_leaves_to_search=params['leaves_to_search'],
        training_sample_size=params['training_sample_size'],
        random_init=False)  # k-means++: reproducible (CLUSTERING_SEED)
    # Anisotropic quantisation targets inner products; for L2 the plain (NaN threshold) one.
    builder = builder.score_ah(params['dims_per_block'],
                               anisotropic_quantization_threshold=float('nan'))
    reorder = params['reorder'] or max(100, 8 * k)  # the default the searcher is built with
    builder = builder.reorder(reorder)
    # The builder has no seed argument: set it in the config it writes (ScaNN's default is
    # the same 0, but the index should not depend on a default).
    from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
    from scann.proto import scann_pb2  # pylint: disable=g-import-not-at-top
    config = text_format.Parse(builder.create_config(), scann_pb2.ScannConfig())
    config.partitioning.clustering_seed = CLUSTERING_SEED
    return cls(ops.create_searcher(keys, text_format.MessageToString(config)), params)

  def _search(self, queries: np.ndarray, k: int,
              leaves: int | None) -> tuple[np.ndarray, np.ndarray]:
    reorder = max(self.reorder or max(100, 8 * k), k)
    kwargs = dict(final_num_neighbors=k, pre_reorder_num_neighbors=reorder,
                  leaves_to_search=leaves)
    if self.parallel and len(queries) > 1:
      idx, dist = self.searcher.search_batched_parallel(queries, **kwargs)
    else:
      idx, dist = self.searcher.search_batched(queries, **kwargs)
    return np.asarray(idx, np.int64), np.asarray(dist)

  def short_rows(self, idx: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Rows [n] bool without k distinct valid ids: ScaNN pads a row with id 0 and distance NaN
    when the leaves it scanned held fewer than k keys."""
    ordered = np.sort(idx, axis=1)
    return (np.isnan(dist).any(axis=1) | (ordered[:, 0] < 0) | (ordered[:, -1] >= self.size)
            | (ordered[:, 1:] == ordered[:, :-1]).any(axis=1))

  def search(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions int64 [n, k] of each query's k nearest keys (k distinct), nearest first."""
    if not 0 < k <= self.size:
      raise ValueError(f'asked for {k} neighbours among {self.size} keys.')
    queries = np.ascontiguousarray(queries, np.float32)
    # The build's leaves_to_search was resolved for its own k (1 in the noisy mode): scan
    # more leaves where this k needs them (small partitions only).
    leaves = max(self.leaves_to_search, min_leaves_to_search(self.size, self.num_leaves, k))
    idx, dist = self._search(queries, k, leaves if leaves > self.leaves_to_search else None)
    short = self.short_rows(idx, dist, k)
    if short.any():
      # The scanned leaves held fewer than k keys (uneven leaves). Scanning all of them makes
      # every key a candidate, so each row gets k distinct ids.
      if k not in self.reported:
        self.reported.add(k)
        logging.warning(
            'retrieval index: ScaNN found fewer than k = %d distinct neighbours for %d of %d '
            'queries in a partition of %d keys (its %d scanned leaves of %d held too few '
            'keys); searching those rows again over all leaves. Logged once per partition and '
            'k.', k, int(short.sum()), len(queries), self.size, leaves, self.num_leaves)
      rows = np.flatnonzero(short)
      idx[rows], dist = self._search(queries[rows], k, self.num_leaves)
      if self.short_rows(idx[rows], dist, k).any():
        raise RetrievalIndexError(
            f'ScaNN returned fewer than {k} distinct neighbours from a partition of {self.size} '
            'keys even scanning all its leaves; rebuild the index (or use backend exact).')
    return idx

  def set_threads(self, threads: int) -> None:
    # One thread: search in the caller's thread (a data worker already runs in parallel).
    self.parallel = threads != 1
    if threads > 0:
      self.searcher.set_num_threads(threads)

  def save(self, directory: str) -> None:
    sub = os.path.join(directory, 'scann')
    os.makedirs(sub)
    # Relative asset paths: the default writes absolute ones, which break once moved.
    self.searcher.serialize(sub, relative_path=True)

  @classmethod
  def load(cls, directory: str, params: dict[str, Any]) -> 'ScannSearcher':
    sub = os.path.join(directory, 'scann')
    with open(os.path.join(sub, 'scann_assets.pbtxt')) as f:
      assets = f.read()
    # An index written with absolute asset paths (older ScaNN, or serialised by hand) still
    # loads after a move: every asset is looked up by its file name in this directory.
    assets = re.sub(r'asset_path: "([^"]*)"',
                    lambda m: f'asset_path: "{os.path.basename(m.group(1))}"', assets)
    ops = _scann_ops()
    # Not scann_ops_pybind.load_searcher: it would also unpickle a scann_docids.pkl if one
    # were present, and an index file must never run code.
    return cls(ops.ScannSearcher(ops.scann_pybind.ScannNumpy(sub, assets)), params)


# ------------------------------------------------------------------------------ the index


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest()


def content_hash(files: dict[str, str]) -> str:
  """sha256 over the sorted (relative path, sha256) pairs of an index's files: names what the
  index answers (reproducible builds of the same data and config share it), not when or where
  it was built, so a checkpoint can record which index trained it."""
  h = hashlib.sha256()
  for rel, digest in sorted(files.items()):
    h.update(f'{rel}\0{digest}\n'.encode())
  return h.hexdigest()


def scann_version() -> str:
  from importlib import metadata as importlib_metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib_metadata.version('scann')
  except importlib_metadata.PackageNotFoundError:
    return 'unknown'


def peak_memory_mib() -> float:
  """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class NeighbourIndex:
  """Loaded index: `search` maps queries to dataset ids of the same partition."""

  def __init__(self, directory: str, metadata: dict, partitions: list[tuple[np.ndarray, Any]],
               clean: np.ndarray | None):
    self.directory = directory
    self.metadata = metadata
    self.partitions = partitions
    self.clean = clean

  @property
  def num_partitions(self) -> int:
    return len(self.partitions)

  @property
  def content_hash(self) -> str:
    """See `content_hash`; computed from the file digests for metadata written before it."""
    return self.metadata.get('content_hash') or content_hash(self.metadata['files'])

  def search(self, keys: np.ndarray, labels: np.ndarray | None, k: int) -> np.ndarray:
    """Dataset ids int64 [n, k] of the k nearest items to each key [n, dim], nearest first,
    searched in the partition of each row's label (labels ignored with one partition)."""
    keys = np.asarray(keys, np.float32)
    out = np.zeros((keys.shape[0], k), np.int64)
    if self.num_partitions == 1:
      ids, searcher = self.partitions[0]
      return ids[searcher.search(keys, k)]
    labels = np.asarray(labels)
    for c in np.unique(labels):
      if not 0 <= c < self.num_partitions:
        raise ValueError(f'label {c} has no partition in the index at {self.directory} '
                         f'({self.num_partitions} classes).')
      rows = np.flatnonzero(labels == c)
      ids, searcher = self.partitions[c]
      out[rows] = ids[searcher.search(keys[rows], k)]
    return out

  def clean_neighbours(self, ids: np.ndarray, k: int) -> np.ndarray:
    """The precomputed k nearest other items of each dataset id: int64 [n, k]."""
    if self.clean is None or self.clean.shape[1] < k:
      have = 0 if self.clean is None else self.clean.shape[1]
      raise RetrievalIndexError(
          f'the index at {self.directory} precomputed {have} clean neighbours per item, fewer '
          f'than config.retrieval.k={k}; rebuild it.')
    return self.clean[np.asarray(ids)][:, :k].astype(np.int64)

  def set_threads(self, threads: int) -> None:
    for _, searcher in self.partitions:
      if isinstance(searcher, ScannSearcher):
        searcher.set_threads(threads)

  @classmethod
  def load(cls, directory: str, *, verify: bool = True) -> 'NeighbourIndex':
    """Loads an index directory; `verify` checks every file's sha256 first, so a corrupted
    file is named instead of crashing (or misleading) the searcher."""
    directory = os.path.abspath(directory)
    meta_path = os.path.join(directory, METADATA)
    metadata = read_metadata(directory)
    if verify:
      for rel, digest in metadata['files'].items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
          raise RetrievalIndexError(
              f'index file {path} is missing (listed in {meta_path}); rebuild the index.')
        if sha256_file(path) != digest:
          raise RetrievalIndexError(
              f'index file {path} is corrupted (its sha256 differs from the one recorded in '
              f'{meta_path}); rebuild the index.')
    partitions = []
    for c in range(metadata['num_partitions']):
      part = os.path.join(directory, f'part_{c}')
      try:
        ids = np.load(os.path.join(part, 'ids.npy'))
        if metadata['backend'] == 'scann':
          searcher = ScannSearcher.load(part, metadata['scann'][c])
        else:
          searcher = ExactSearcher.load(part)
      except Exception as e:  # numpy/ScaNN errors do not say which file or what to do
        raise RetrievalIndexError(f'could not load partition {c} of the index from {part}: {e}. '
                          'Rebuild the index.') from e
      partitions.append((ids, searcher))
    clean = None
    if metadata.get('clean_k', 0) > 0:
      clean = np.load(os.path.join(directory, CLEAN_TABLE), mmap_mode='r')
    return cls(directory, metadata, partitions, clean)


def read_metadata(directory: str) -> dict:
  path = os.path.join(directory, METADATA)
  try:
    with open(path) as f:
      metadata = json.load(f)
  except FileNotFoundError as e:
    raise RetrievalIndexError(f'no retrieval index at {directory} ({METADATA} is missing).') from e
  except (OSError, ValueError) as e:
    raise RetrievalIndexError(f'index file {path} is unreadable or corrupted ({e}); rebuild the '
                      'index.') from e
  if metadata.get('format') != FORMAT_VERSION:
    raise RetrievalIndexError(f'index at {directory} has format {metadata.get("format")!r}; this '
                      f'version reads format {FORMAT_VERSION}. Rebuild the index.')
  return metadata


def build(directory: str, keys: np.ndarray, labels: np.ndarray | None, *, backend: str,
          scann_params: ScannParams, clean_k: int, num_partitions: int,
          metadata: dict[str, Any], overwrite: bool = False,
          log: Callable[[str], None] = logging.info) -> NeighbourIndex:
  """Builds the index of `keys` [N, dim] (partitioned by `labels` [N] when num_partitions > 1)
  into `directory` and returns it loaded.

  The new index is written to a sibling temporary directory and renamed into place only when
  complete: a failed or interrupted build never leaves a half-written index, and an existing
  index is replaced (overwrite=True) only by a finished one.
  """
  if backend not in BACKENDS:
    raise ValueError(f'unknown retrieval backend {backend!r}; config.retrieval.backend must be '
                     f'one of {BACKENDS}.')
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise RetrievalIndexError(f'{directory} already exists; pass overwrite=True to replace it.')
  keys = np.asarray(keys, np.float32)
  n = keys.shape[0]
  if labels is None or num_partitions == 1:
    part_ids = [np.arange(n, dtype=np.int64)]
  else:
    labels = np.asarray(labels)
    part_ids = [np.flatnonzero(labels == c).astype(np.int64) for c in range(num_partitions)]
  sizes = [len(p) for p in part_ids]
  if clean_k and min(sizes) <= clean_k:
    raise ValueError(f'partition sizes {sizes} leave fewer than {clean_k} other items to '
                     'precompute clean neighbours from; lower config.retrieval.k.')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = f'{directory}.building-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  t0 = time.time()
  try:
    scann_meta, clean = [], None
    if clean_k:
      clean = np.zeros((n, clean_k), np.int32)
    for c, ids in enumerate(part_ids):
      part = os.path.join(tmp, f'part_{c}')
      os.makedirs(part)
      np.save(os.path.join(part, 'ids.npy'), ids)
      tc = time.time()
      if backend == 'scann':
        params = scann_params.resolve(len(ids), max(clean_k + 1, 1))
        searcher = ScannSearcher.build(keys[ids], params, max(clean_k + 1, 1))
        scann_meta.append(params)
      else:
        searcher = ExactSearcher(keys[ids])
      searcher.save(part)
      if clean_k:
        clean[ids] = _clean_table(searcher, keys[ids], ids, clean_k)
      log(f'retrieval index: partition {c + 1}/{len(part_ids)} ({len(ids):,} keys) built in '
          f'{time.time() - tc:.1f} s')
    if clean_k:
      np.save(os.path.join(tmp, CLEAN_TABLE), clean)
    files = {}
    for root, _, names in os.walk(tmp):
      for name in sorted(names):
        path = os.path.join(root, name)
        files[os.path.relpath(path, tmp)] = sha256_file(path)
    metadata = {
        'format': FORMAT_VERSION, 'backend': backend, 'num_items': n,
        'num_partitions': len(part_ids), 'partition_sizes': sizes, 'key_dim': keys.shape[1],
        'clean_k': clean_k, 'scann': scann_meta,
        'scann_training': ({'center_init': 'kmeans++', 'clustering_seed': CLUSTERING_SEED,
                            'scann_version': scann_version()} if backend == 'scann' else None),
        **metadata,
        'build_seconds': round(time.time() - t0, 2),
        'build_peak_memory_mib': round(peak_memory_mib(), 1), 'files': files,
        'content_hash': content_hash(files),
    }
    with open(os.path.join(tmp, METADATA), 'w') as f:
      json.dump(metadata, f, indent=1)
    if os.path.exists(directory):  # overwrite: swap in the finished index, then drop the old
      old = f'{directory}.old-{os.getpid()}'
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log(f'retrieval index: {n:,} keys of dim {keys.shape[1]} in {len(part_ids)} partition(s), '
      f'backend {backend}, built in {metadata["build_seconds"]:.1f} s, peak memory '
      f'{metadata["build_peak_memory_mib"]:.0f} MiB → {directory}')
  return NeighbourIndex.load(directory, verify=False)


def _clean_table(searcher, keys: np.ndarray, ids: np.ndarray, k: int,
                 chunk: int = 4096) -> np.ndarray:
  """Each item's k nearest *other* items (dataset ids), from k + 1 searched."""
  out = np.zeros((len(ids), k), np.int32)
  for start in range(0, len(ids), chunk):
    found = ids[searcher.search(keys[start:start + chunk], k + 1)]
    own = ids[start:start + chunk, None]
    # Drop the item itself; if the search missed it (approximate, or exact ties), drop the
    # farthest instead so every row keeps exactly k.
    keep = found != own
    drop_last = keep.all(axis=1)
    keep[drop_last, -1] = False
    out[start:start + chunk] = found[keep].reshape(-1, k)
  return out
