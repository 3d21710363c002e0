"""Retrieval: ScaNN against exact search on synthetic keys, and the noisy-retrieval pipeline
against the train step on Fashion-MNIST.

  .venv/bin/python -m benchmarks.retrieval [--part=a,a4096,b] [--num_keys=1000000]
  .venv/bin/python -m benchmarks.retrieval --num_keys=50000 --latent_keys=20000 \
      --num_leaves=200 --rounds=2 --b_rounds=1 --steps=4      # smoke run, a few minutes

(a) `--num_keys` synthetic clustered keys of dimension `--dim` (ClusteredData 'flat': Gaussian
    clusters, each spread in a low-rank subspace of its own, plus isotropic noise), and a batch
    of `--queries` held-out items of the same stream. ScaNN (retrieval.index.ScannSearcher,
    built with the ScannParams of the flags; its search is `search_batched_parallel`) against
    `exact` (index.ExactSearcher: a blocked matmul + argpartition in numpy), both on every core
    of this machine: recall@k of ScaNN against exact, and the median time of one batch of
    each, timed in alternating rounds. ScaNN's build time and memory are reported.
(a4096) The same on `--latent_keys` 32×32×4 = 4096-dim 'latents' (ClusteredData 'latent':
    smooth fields, low-frequency DCT modes with an image-like 1/(1 + |f|) spectrum, clustered
    as in (a), plus a little white pixel noise), searched by a reduced 256-dim key
    (retrieval.keys.KeyTransform: avg_pool 4×4, or a random projection). The 4096-dim items are
    never held: they are generated block by block from the seed, each block is reduced, and
    the exact neighbours of the queries in the full 4096-dim space are accumulated over the
    blocks. Reported: ScaNN-on-keys recall against the full-space truth and against exact
    search on the same keys, the recall the key itself allows (exact on keys vs full), and
    the speed of ScaNN against exact on the keys and against the streamed full-dim search.
(b) configs/fmnist_sit.py with PAFM over batch + 16 noisy retrieved neighbours (stratified,
    ScaNN index built into --workdir, or a temporary one, by retrieval.stage.stage_factory):
    for each data.worker_count in --worker_counts, in alternating rounds, (1) batches/s that the
    pipeline delivers alone, (2) steps/s of the compiled train step alone on a fixed batch from
    the same iterator, (3) the train loop as train.train_and_evaluate runs it (next(iterator),
    dispatch step N, wait for step N − 1), with its share of time in next() (the loop's logged
    data_wait_fraction), and (4) the same loop waiting for each step before calling next(), so
    that its time in next() is time with no step running: the stall (the train loop overlaps
    next() with a running step, so it can only wait less).
    On a CPU the pipeline and XLA's step share the same cores, so (3) and (4) also show how
    much the step slows down next to the pipeline.

The last line: recall, speed-up and stall. Targets (issue 4): recall@16 ≥ 0.95 at ≥ 30× the
exact queries/s; stall < 5 % of step time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags, logging
import numpy as np
from pafm_jax.retrieval import index as index_lib
from pafm_jax.retrieval import stage as retrieval_stage
from pafm_jax import config_checks, train_state
from pafm_jax.retrieval import keys as keys_lib

FLAGS = flags.FLAGS

# Items per generator chunk: item i is drawn by the generator of chunk i // CHUNK, so a block of
# items is the same whatever block size or start it is asked for with.
CHUNK = 4096
LATENT_SHAPE = (32, 32, 4)
LATENT_FREQS = 8            # DCT modes (u, v) < 8 per channel: coefficient space 4·8·8 = 256


# ------------------------------------------------------------------------------ synthetic data


def dct_rows(size: int, freqs: int) -> np.ndarray:
  """The first `freqs` orthonormal DCT-II basis vectors of length `size`: float32 [freqs, size]."""
  pos = (2 * np.arange(size) + 1) * np.pi / (2 * size)
  rows = np.cos(np.arange(freqs)[:, None] * pos[None, :])
  return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class ClusteredData:
  """An endless seeded stream of clustered vectors; item i is a pure function of (seed, i).

  Item i picks a cluster c (sizes vary: Dirichlet(2) weights) and is

    x = Φ(z_c + spread · s · V_c) + noise · n,    s ~ N(0, I_rank), n ~ N(0, I_dim),

  in a coefficient space of size m with a decaying spectrum a: the centre z_c ~ separation ·
  N(0, diag a²), V_c [rank, m] a subspace of the cluster's own (rows ~ N(0, diag a²)/√rank, so
  `spread` is the RMS radius relative to the RMS centre norm). The data have a low intrinsic
  dimension (rank, plus the noise), as real keys do.

    flat    Φ = I, m = dim, a_j = (1 + j/8)^(−1/2): embedding-like keys whose PCA spectrum
            decays.
    latent  Φ maps the coefficients (channel, u, v), u, v < 8, to the 2-D DCT modes of a
            32×32×4 latent, a = 4/(1 + |(u, v)|): smooth image-like fields, plus white noise
            per pixel. dim = 4096, flattened (h, w, c) as KeyTransform expects.
  """

  def __init__(self, kind: str, *, seed: int, clusters: int, dim: int = 256, rank: int = 16,
               spread: float = 0.5, separation: float = 1.0, noise: float = 0.1):
    self.kind, self.seed, self.rank = kind, seed, rank
    self.spread, self.noise = spread, noise
    if kind == 'flat':
      self.dim = dim
      amp = 1.0 / np.sqrt(1.0 + np.arange(dim) / 8.0)
    elif kind == 'latent':
      self.dim = int(np.prod(LATENT_SHAPE))
      f = np.hypot(*np.meshgrid(np.arange(LATENT_FREQS), np.arange(LATENT_FREQS),
                                indexing='ij')).reshape(-1)
      amp = np.tile(4.0 / (1.0 + f), LATENT_SHAPE[2])
      self.dct = dct_rows(LATENT_SHAPE[0], LATENT_FREQS)
    else:
      raise ValueError(f'unknown synthetic data kind {kind!r}: flat or latent.')
    m = len(amp)
    rng = np.random.default_rng([seed, 0xC1])
    self.cumulative = np.cumsum(rng.dirichlet(np.full(clusters, 2.0)))
    self.centres = (separation * rng.standard_normal((clusters, m)) * amp).astype(np.float32)
    self.subspaces = (rng.standard_normal((clusters, rank, m)) * amp /
                      np.sqrt(rank)).astype(np.float32)

  def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, c, 0xD7])
    cluster = np.minimum(np.searchsorted(self.cumulative, rng.random(CHUNK)),
                         len(self.cumulative) - 1)
    s = rng.standard_normal((CHUNK, self.rank), np.float32)
    coef = self.centres[cluster] + self.spread * np.einsum('nr,nrm->nm', s,
                                                           self.subspaces[cluster])
    if self.kind == 'latent':
      # Separable 2-D DCT: [n, c, u, v] → [n, c, h, w] in two small matmuls, then (h, w, c).
      coef = coef.reshape(CHUNK, LATENT_SHAPE[2], LATENT_FREQS, LATENT_FREQS)
      fields = self.dct.T @ (coef @ self.dct)
      coef = fields.transpose(0, 2, 3, 1).reshape(CHUNK, self.dim)
    return coef + self.noise * rng.standard_normal((CHUNK, self.dim), np.float32), cluster

  def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Items [start, stop): (float32 [n, dim], their clusters int64 [n]), n = stop − start."""
    x = np.empty((stop - start, self.dim), np.float32)
    clusters = np.empty((stop - start,), np.int64)
    for c in range(start // CHUNK, -(-stop // CHUNK)):
      lo, hi = max(start, c * CHUNK), min(stop, (c + 1) * CHUNK)
      chunk_x, chunk_clusters = self._chunk(c)
      x[lo - start:hi - start] = chunk_x[lo - c * CHUNK:hi - c * CHUNK]
      clusters[lo - start:hi - start] = chunk_clusters[lo - c * CHUNK:hi - c * CHUNK]
    return x, clusters


# ------------------------------------------------------------------------------ measures


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean over rows of |found ∩ truth| / k; found, truth: ids [n, k]."""
  k = truth.shape[1]
  return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k
                        for f, t in zip(found, truth)]))


def merge_top_k(ids_a: np.ndarray, d_a: np.ndarray, ids_b: np.ndarray, d_b: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k smallest distances of two candidate sets per row, nearest first: [n, k] each."""
  ids, d = np.concatenate([ids_a, ids_b], 1), np.concatenate([d_a, d_b], 1)
  order = np.argsort(d, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(ids, order, 1), np.take_along_axis(d, order, 1)


def current_rss_mib() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def scann_params() -> index_lib.ScannParams:
  return index_lib.ScannParams(
      num_leaves=FLAGS.num_leaves, leaves_to_search=FLAGS.leaves_to_search,
      reorder=FLAGS.reorder, dims_per_block=FLAGS.dims_per_block,
      training_sample_size=FLAGS.training_sample_size)


def build_scann(keys: np.ndarray) -> tuple[index_lib.ScannSearcher, dict]:
  """ScannSearcher over keys [N, d], with what its build cost."""
  params = scann_params().resolve(len(keys), FLAGS.k)
  rss = current_rss_mib()
  t0 = time.perf_counter()
  searcher = index_lib.ScannSearcher.build(keys, params, FLAGS.k)
  return searcher, {'params': params, 'seconds': time.perf_counter() - t0,
                    'added_mib': current_rss_mib() - rss,
                    'peak_mib': index_lib.peak_memory_mib()}


def time_searchers(searchers: dict, queries: np.ndarray) -> dict[str, float]:
  """Median seconds per batch of each searcher, timed in alternating rounds; a fast searcher
  repeats its batch until --min_seconds have passed, so every round is long enough to time."""
  times = {name: [] for name in searchers}
  for r in range(FLAGS.rounds):
    for name, search in searchers.items():
      n, t0 = 0, time.perf_counter()
      while True:
        search(queries)
        n += 1
        if time.perf_counter() - t0 >= FLAGS.min_seconds:
          break
      times[name].append((time.perf_counter() - t0) / n)
    print(f'  round {r + 1}/{FLAGS.rounds}: ' + ', '.join(
        f'{name} {t[-1] * 1e3:.1f} ms' for name, t in times.items()), flush=True)
  return {name: statistics.median(t) for name, t in times.items()}


def describe_build(build: dict) -> str:
  p = build['params']
  return (f'ScaNN build {build["seconds"]:.1f} s, +{build["added_mib"]:.0f} MiB resident '
          f'(process peak {build["peak_mib"]:.0f} MiB); leaves {p["num_leaves"]}, search '
          f'{p["leaves_to_search"]}, reorder {p["reorder"]}, dims/block {p["dims_per_block"]}, '
          f'training sample {p["training_sample_size"]:,}')


# ------------------------------------------------------------------------------ (a)


def part_a() -> dict:
  n, b, k = FLAGS.num_keys, FLAGS.queries, FLAGS.k
  data = ClusteredData('flat', seed=FLAGS.seed, clusters=FLAGS.clusters, dim=FLAGS.dim,
                       rank=FLAGS.rank, spread=FLAGS.spread, separation=FLAGS.separation,
                       noise=FLAGS.noise)
  print(f'\n(a) {n:,} clustered keys of dim {FLAGS.dim} ({FLAGS.clusters} clusters of rank '
        f'{FLAGS.rank}), {b} held-out queries, k = {k}', flush=True)
  t0 = time.perf_counter()
  keys, key_clusters = data.block(0, n)
  queries, query_clusters = data.block(n, n + b)
  print(f'  generated in {time.perf_counter() - t0:.1f} s ({keys.nbytes / 2**20:.0f} MiB)')
  exact = index_lib.ExactSearcher(keys)
  truth_ids, truth_d = index_lib.exact_search(queries, exact.keys, k, exact.norms)
  print(f'  data: median squared distance to the 1st / {k}th neighbour '
        f'{np.median(truth_d[:, 0]):.2f} / {np.median(truth_d[:, -1]):.2f}; neighbours from '
        f'another cluster {np.mean(key_clusters[truth_ids] != query_clusters[:, None]):.1%}')
  scann, build = build_scann(keys)
  print('  ' + describe_build(build), flush=True)
  recall = recall_at_k(scann.search(queries, k), truth_ids)
  t = time_searchers({'exact': lambda q: exact.search(q, k), 'scann': lambda q: scann.search(q, k)},
                     queries)
  speedup = t['exact'] / t['scann']
  print(f'  exact {t["exact"] * 1e3:8.1f} ms/batch {b / t["exact"]:9.0f} queries/s')
  print(f'  scann {t["scann"] * 1e3:8.1f} ms/batch {b / t["scann"]:9.0f} queries/s   '
        f'recall@{k} {recall:.4f}   {speedup:.0f}x exact', flush=True)
  return {'recall': recall, 'speedup': speedup}


# ------------------------------------------------------------------------------ (a4096)


def latent_transform(kind: str) -> keys_lib.KeyTransform:
  if kind == 'avg_pool':
    return keys_lib.KeyTransform('avg_pool', LATENT_SHAPE, pool=4)
  if kind == 'random_projection':
    return keys_lib.KeyTransform('random_projection', LATENT_SHAPE, key_dim=256,
                                 seed=FLAGS.seed)
  raise ValueError(f'--latent_key must be avg_pool or random_projection, got {kind!r}.')


def part_a4096() -> dict:
  n, b, k = FLAGS.latent_keys, FLAGS.queries, FLAGS.k
  data = ClusteredData('latent', seed=FLAGS.seed, clusters=FLAGS.clusters, rank=FLAGS.rank,
                       spread=FLAGS.spread, separation=FLAGS.separation,
                       noise=FLAGS.latent_noise)
  transforms = {kind: latent_transform(kind) for kind in FLAGS.latent_key}
  print(f'\n(a4096) {n:,} clustered 32x32x4 latents (4096-dim, streamed), keys '
        + ', '.join(f'{kind} → {t.dim}' for kind, t in transforms.items()), flush=True)
  queries, _ = data.block(n, n + b)
  query_keys = {kind: t(queries.reshape(b, *LATENT_SHAPE)) for kind, t in transforms.items()}
  keys = {kind: np.empty((n, t.dim), np.float32) for kind, t in transforms.items()}
  truth_ids = np.zeros((b, 0), np.int64)
  truth_d = np.zeros((b, 0), np.float32)
  t_gen = t_exact = t_key = 0.0
  block = 4 * CHUNK
  for start in range(0, n, block):
    stop = min(n, start + block)
    t0 = time.perf_counter()
    x, _ = data.block(start, stop)
    t1 = time.perf_counter()
    ids, d = index_lib.exact_search(queries, x, min(k, stop - start))
    truth_ids, truth_d = merge_top_k(truth_ids, truth_d, ids + start, d, k)
    t2 = time.perf_counter()
    for kind, t in transforms.items():
      keys[kind][start:stop] = t(x.reshape(-1, *LATENT_SHAPE))
    t_gen, t_exact, t_key = t_gen + t1 - t0, t_exact + t2 - t1, t_key + time.perf_counter() - t2
    if (stop // block) % 16 == 0 or stop == n:
      print(f'  streamed {stop:,}/{n:,} ({t_gen + t_exact + t_key:.0f} s)', flush=True)
  exact_full_t = t_exact  # one pass over all items answers the whole query batch
  print(f'  generation {t_gen:.0f} s, keys {t_key:.0f} s; exact search in 4096 dims over the '
        f'stream {t_exact:.1f} s per batch = {b / t_exact:.1f} queries/s; median squared '
        f'distance to the 1st / {k}th neighbour {np.median(truth_d[:, 0]):.1f} / '
        f'{np.median(truth_d[:, -1]):.1f}', flush=True)
  out = {}
  for kind in transforms:
    print(f'  key {kind}:', flush=True)
    exact = index_lib.ExactSearcher(keys.pop(kind))
    exact_on_keys = exact.search(query_keys[kind], k)
    scann, build = build_scann(exact.keys)
    print('  ' + describe_build(build), flush=True)
    found = scann.search(query_keys[kind], k)
    r_full, r_keys = recall_at_k(found, truth_ids), recall_at_k(found, exact_on_keys)
    r_key_itself = recall_at_k(exact_on_keys, truth_ids)
    t = time_searchers({'exact': lambda q: exact.search(q, k),
                        'scann': lambda q: scann.search(q, k)}, query_keys[kind])
    print(f'  {kind}: recall@{k} of ScaNN on keys vs the 4096-dim truth {r_full:.4f}, vs '
          f'exact on keys {r_keys:.4f} (exact on keys vs 4096-dim truth {r_key_itself:.4f}); '
          f'exact on keys {t["exact"] * 1e3:.1f} ms/batch, ScaNN {t["scann"] * 1e3:.1f} '
          f'ms/batch = {t["exact"] / t["scann"]:.0f}x exact on keys, '
          f'{exact_full_t / t["scann"]:.0f}x exact in 4096 dims', flush=True)
    out[kind] = {'recall_full': r_full, 'recall_keys': r_keys,
                 'speedup': t['exact'] / t['scann']}
    del exact, scann
  return out


# ------------------------------------------------------------------------------ (b)


def retrieval_config(worker_count: int):
  from configs import fmnist_sit  # pylint: disable=g-import-not-at-top
  config = fmnist_sit.get_config()
  config.objective.pafm.sources = 'batch+retrieved'
  config.objective.pafm.stratified = True
  config.retrieval.mode = 'noisy'
  config.retrieval.k = FLAGS.k
  config.retrieval.backend = 'scann'
  config.data.worker_count = worker_count
  return config


def time_loop(it, compiled, state, to_batch, steps: int, in_flight: bool):
  """`steps` steps of the train loop; (state, seconds, seconds blocked in next()).

  in_flight=True is train.train_and_evaluate's loop: step N is dispatched before waiting for
  step N − 1, so next() runs while a step computes. in_flight=False waits for each step before
  asking for the next batch: every second in next() is then a second with no step running.
  """
  import jax  # pylint: disable=g-import-not-at-top
  wait, previous, t0 = 0.0, None, time.perf_counter()
  for _ in range(steps):
    t_data = time.perf_counter()
    local = next(it)
    wait += time.perf_counter() - t_data
    state, metrics = compiled(state, to_batch(local))
    if not in_flight:
      jax.block_until_ready(metrics)
    elif previous is not None:
      jax.block_until_ready(previous)
    previous = metrics
  jax.block_until_ready(previous)
  return state, time.perf_counter() - t0, wait


def part_b() -> dict:
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from pafm_jax import train  # pylint: disable=g-import-not-at-top
  from pafm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from pafm_jax.retrieval import dataset_index  # pylint: disable=g-import-not-at-top

  counts = [int(w) for w in FLAGS.worker_counts]
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='retrieval_bench_')
  config = retrieval_config(counts[0])
  print(f'\n(b) {config.model.name} on Fashion-MNIST, global batch {config.global_batch_size}, '
        f'PAFM over batch + {config.retrieval.k} noisy neighbours (stratified), ScaNN index in '
        f'{workdir}; {os.cpu_count()} CPU cores, {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}', flush=True)
  t0 = time.perf_counter()
  stage = retrieval_stage.stage_factory(config, workdir)[0]  # builds the index when missing
  index_dir = dataset_index.index_directory(config, workdir)
  meta = index_lib.read_metadata(index_dir)
  print(f'  index ready in {time.perf_counter() - t0:.1f} s (build {meta["build_seconds"]} s, '
        f'{meta["num_items"]:,} items, {meta["num_partitions"]} partitions, ScaNN '
        f'{meta["scann"][0]})', flush=True)
  mesh = config_checks.validated_mesh(config)
  setup = train_state.TrainSetup.create(config, mesh)
  compiled = train.compile_step(setup)
  state = setup.init()

  def to_batch(local):
    return train.to_global_batch(local, setup.batch_spec, mesh)

  steps, out = FLAGS.steps, {}
  for workers in counts:
    config = retrieval_config(workers)
    it = pipeline.create_train_iterator(
        config.data, local_batch_size=config.global_batch_size, seed=config.seed,
        extra_stage=stage)
    t0 = time.perf_counter()
    fixed = to_batch(next(it))  # worker start-up and the index load happen here
    print(f'  worker_count={workers}: first batch in {time.perf_counter() - t0:.1f} s',
          flush=True)
    state, metrics = compiled(state, fixed)
    jax.block_until_ready(metrics)
    # More than the thread and worker buffers hold: once these are drained, batches come at
    # the pipeline's own rate.
    drain = 3 * config.data.prefetch_buffer_size + 4
    times = {name: [] for name in ('pipeline', 'step', 'loop', 'loop_wait', 'strict',
                                   'strict_wait')}
    for r in range(FLAGS.b_rounds):
      for _ in range(drain):
        next(it)
      t0 = time.perf_counter()
      for _ in range(steps):
        next(it)
      times['pipeline'].append((time.perf_counter() - t0) / steps)

      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, fixed)
        jax.block_until_ready(metrics)
      times['step'].append((time.perf_counter() - t0) / steps)

      for name, in_flight in (('loop', True), ('strict', False)):
        state, total, wait = time_loop(it, compiled, state, to_batch, steps, in_flight)
        times[name].append(total / steps)
        times[f'{name}_wait'].append(wait / total)
      print(f'  worker_count={workers} round {r + 1}/{FLAGS.b_rounds}: pipeline alone '
            f'{times["pipeline"][-1] * 1e3:.0f} ms/batch, step alone '
            f'{times["step"][-1] * 1e3:.0f} ms; train loop {times["loop"][-1] * 1e3:.0f} ms/step, '
            f'{times["loop_wait"][-1]:.2%} in next(); blocking loop '
            f'{times["strict"][-1] * 1e3:.0f} ms/step, {times["strict_wait"][-1]:.2%} in next()',
            flush=True)
    out[workers] = {name: statistics.median(v) for name, v in times.items()}
    # Batches still referenced when the workers stop would stay in shared memory.
    del fixed, metrics
    gc.collect()
    it.close()
  print(f'\n  medians of {FLAGS.b_rounds} rounds of {steps}:')
  print(f'  {"worker_count":<13}{"pipeline batch/s":>17}{"step/s alone":>13}'
        f'{"train loop step/s":>18}{"wait in next()":>15}{"blocking loop step/s":>21}'
        f'{"stall":>8}')
  for workers, med in out.items():
    print(f'  {workers:<13}{1 / med["pipeline"]:>17.2f}{1 / med["step"]:>13.2f}'
          f'{1 / med["loop"]:>18.2f}{med["loop_wait"]:>15.2%}{1 / med["strict"]:>21.2f}'
          f'{med["strict_wait"]:>8.2%}')
  print('  train loop: as train.train_and_evaluate runs it (one step in flight); its wait in '
        'next() is the\n  data_wait_fraction it logs. blocking loop: each step finishes before '
        'next() is called, so its\n  time in next() (the stall) is time with no step running. '
        'The pipeline shares the CPU cores with\n  XLA\'s step here, so both loops run slower '
        'than the step alone by what the pipeline takes from it.')
  if not FLAGS.workdir:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(workdir, ignore_errors=True)
  return out


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module (the tests do) adds no
  global flags."""
  flags.DEFINE_list('part', ['a', 'a4096', 'b'], 'Parts to run: a, a4096, b.')
  flags.DEFINE_integer('seed', 0, 'Seed of the synthetic data.')
  flags.DEFINE_integer('num_keys', 1_000_000, '(a) synthetic keys.')
  flags.DEFINE_integer('dim', 256, '(a) key dimension.')
  flags.DEFINE_integer('clusters', 2000, 'Clusters of the synthetic data.')
  flags.DEFINE_integer('rank', 16, 'Dimension of the subspace each cluster spreads in.')
  flags.DEFINE_float('spread', 0.5, 'RMS cluster radius relative to the RMS centre norm.')
  flags.DEFINE_float('separation', 1.0, 'Scale of the cluster centres (lower: clusters overlap).')
  flags.DEFINE_float('noise', 0.1, '(a) isotropic noise per dimension.')
  flags.DEFINE_float('latent_noise', 0.05, '(a4096) white noise per latent pixel.')
  flags.DEFINE_integer('latent_keys', 1_000_000, '(a4096) synthetic 32×32×4 latents.')
  flags.DEFINE_list('latent_key', ['avg_pool', 'random_projection'],
                    '(a4096) key transforms to 256 dims: avg_pool (4×4) and/or random_projection.')
  flags.DEFINE_integer('queries', 256, 'Query batch.')
  flags.DEFINE_integer('k', 16, 'Neighbours per query.')
  flags.DEFINE_integer('rounds', 5, 'Alternating timing rounds.')
  flags.DEFINE_float('min_seconds', 0.5, 'ScaNN batches are repeated for at least this long per '
                     'round (one exact batch already takes seconds).')
  flags.DEFINE_integer('num_leaves', 1000, 'ScaNN k-means tree leaves.')
  flags.DEFINE_integer('leaves_to_search', 5, 'ScaNN leaves searched per query.')
  flags.DEFINE_integer('reorder', 150, 'ScaNN candidates re-ranked exactly.')
  flags.DEFINE_integer('dims_per_block', 2, 'ScaNN anisotropic-hash block size.')
  flags.DEFINE_integer('training_sample_size', 100_000, 'ScaNN k-means training sample.')
  flags.DEFINE_string('workdir', '', '(b) where the Fashion-MNIST index is built (default: a '
                      'temporary directory, removed at the end).')
  flags.DEFINE_list('worker_counts', ['0', '1'], '(b) data.worker_count values to run.')
  flags.DEFINE_integer('b_rounds', 3, '(b) alternating rounds per worker count.')
  flags.DEFINE_integer('steps', 15, '(b) batches / steps per round of each measurement.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # the index build's progress lines, unless asked for
    logging.set_verbosity(logging.WARNING)
  unknown = set(FLAGS.part) - {'a', 'a4096', 'b'}
  if unknown:
    raise app.UsageError(f'--part takes a, a4096, b; got {sorted(unknown)}.')
  t_start = time.perf_counter()
  summary = []
  if 'a' in FLAGS.part:
    a = part_a()
    summary.append(f'recall@{FLAGS.k} {a["recall"]:.3f}, ScaNN {a["speedup"]:.0f}x exact '
                   f'queries/s at batch {FLAGS.queries} ({FLAGS.num_keys:,} x {FLAGS.dim})')
  if 'a4096' in FLAGS.part:
    for kind, r in part_a4096().items():
      summary.append(f'4096-d via {kind} key: recall {r["recall_full"]:.3f} (full-dim truth) / '
                     f'{r["recall_keys"]:.3f} (exact on keys), {r["speedup"]:.0f}x')
  if 'b' in FLAGS.part:
    b = part_b()
    summary.append('pipeline stall ' + ', '.join(
        f'{m["strict_wait"]:.2%} (worker_count {w})' for w, m in b.items()) + ' of step time')
  print(f'\ntotal {time.perf_counter() - t_start:.0f} s')
  print('retrieval: ' + '; '.join(summary))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
