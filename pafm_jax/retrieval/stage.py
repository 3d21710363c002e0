"""The Grain stage that attaches retrieved posterior candidates to each training batch.

For every row (sample x0 with label y and dataset id) it adds

  neighbours        float32 [b, k, H, W, C]  k same-class dataset items, read from the source
  neighbour_labels  int32 [b, k]
  neighbour_ids     int32 [b, k]
  neighbour_cond_embedding  float32 [b, k, E]  on captioned data: their own caption vectors

and, in 'noisy' mode, the t [b] and ε [b, H, W, C] that the train step then uses instead of
drawing its own (batch_contract.pipeline_draws_noise): the query x_t/α_t must be known on the
host. Field names and shapes are those of pafm_jax/batch_contract.py.

  clean  the k nearest other items to x0 (a table precomputed at build time)
  noisy  the k nearest items to x_t/α_t in key space: the highest-likelihood candidates
         (METHOD.md §3), where the posterior mass is

Determinism: t and ε of a row are drawn from a generator seeded by (seed, global batch index,
row of the *global* batch), so a batch is a pure function of its index: the stream does not
depend on worker count or thread timing, a restored iterator continues exactly, and a
multi-host run draws the same noise as a single-host one. Nothing here computes with JAX
(paths.py evaluates its formulas with numpy on numpy input): the stage runs in Grain's worker
processes, which must not claim an accelerator.
"""

from __future__ import annotations

import threading

import grain
import numpy as np

from absl import logging

from pafm_jax import batch_contract as fields
from pafm_jax import objectives, paths
from pafm_jax.data import pipeline
from pafm_jax.retrieval import dataset_index
from pafm_jax.retrieval import index as index_lib
from pafm_jax.retrieval import keys as keys_lib

QUERY_MODES = ('clean', 'noisy')
# α_t below this is floored when forming x_t/α_t: near t = 1 the query direction still ranks
# the candidates (the likelihood order is invariant to the scale), the value stays finite.
MIN_ALPHA = 1e-6


class NeighbourStage(grain.transforms.MapWithIndex):
  """map_with_index(global batch index, batch) → batch with the neighbour fields.

  Pickled into Grain's worker processes without its loaded index: each process loads the
  index from `index.directory` (its own local copy on a multi-host run) on first use.
  """

  def __init__(self, index: index_lib.NeighbourIndex, source, image_shape, *, mode: str,
               k: int, key: keys_lib.KeyTransform, seed: int, path_name: str,
               t_sampling: str, row_offset: int):
    if mode not in QUERY_MODES:
      raise ValueError(f'config.retrieval.mode must be one of {QUERY_MODES} here, got '
                       f'{mode!r}.')
    self._index = index
    self._directory = index.directory
    # Candidates need their sentence vectors (and image embeddings), never their token states.
    self._read = pipeline.batch_reader(source, image_shape, text_tokens=False)
    self.mode, self.k, self.key = mode, k, key
    self.seed, self.path, self.t_sampling = seed, paths.get_path(path_name), t_sampling
    self.row_offset = row_offset  # this process's first row in the global batch
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_index'] = None
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def index(self) -> index_lib.NeighbourIndex:
    with self._lock:  # Grain reads batches from several threads
      if self._index is None:
        self._index = index_lib.NeighbourIndex.load(self._directory, verify=False)
        self._index.set_threads(1)
      return self._index

  def draw_noise(self, batch_index: int, b: int,
                 sample_shape) -> tuple[np.ndarray, np.ndarray]:
    """t float32 [b] and ε float32 [b, *sample_shape] of this process's b rows."""
    t = np.zeros((b,), np.float32)
    eps = np.zeros((b, *sample_shape), np.float32)
    for i, row in enumerate(range(self.row_offset, self.row_offset + b)):
      rng = np.random.default_rng([self.seed, int(batch_index), int(row), 0x7E5])
      t[i] = paths.host_sample_t(rng, self.t_sampling)
      eps[i] = rng.standard_normal(sample_shape, np.float32)
    return t, eps

  def map_with_index(self, index: int, batch: dict) -> dict:
    x0, labels, ids = batch[fields.IMAGE], batch[fields.LABEL], batch[fields.ID]
    b = x0.shape[0]
    out = dict(batch)
    if self.mode == 'noisy':
      t, eps = self.draw_noise(index, b, x0.shape[1:])
      alpha = np.maximum(self.path.alpha(t), np.float32(MIN_ALPHA)).reshape(
          -1, *[1] * (x0.ndim - 1))
      sigma = self.path.sigma(t).reshape(alpha.shape)
      query = (alpha * x0 + sigma * eps) / alpha
      nbr = self.index().search(self.key(query), labels, self.k)
      out.update({fields.T: t, fields.EPS: eps})
    else:
      nbr = self.index().clean_neighbours(ids, self.k)
    read = self._read(nbr.reshape(-1))
    neighbours = read[fields.IMAGE].reshape(b, self.k, *x0.shape[1:])
    # A row's own item among its neighbours is its own endpoint: the stored item for pixel
    # data, but for latents this epoch's draw, not the stored mean (retrieved copies take
    # precedence over in-batch ones, and a mean std·ε away from x0 would make the target
    # (x̄0 − x0)/t-sized at small t).
    own = (nbr == ids[:, None]).reshape(b, self.k, *[1] * (x0.ndim - 1))
    neighbours = np.where(own, x0[:, None], neighbours)
    out.update({fields.NEIGHBOURS: neighbours,
                fields.NEIGHBOUR_LABELS: read[fields.LABEL].reshape(b, self.k),
                fields.NEIGHBOUR_IDS: nbr.astype(np.int32)})
    for own, neighbour in ((fields.COND_EMBEDDING, fields.NEIGHBOUR_COND_EMBEDDING),
                           (fields.IMAGE_EMBEDDING, fields.NEIGHBOUR_IMAGE_EMBEDDING)):
      if own in read:
        out[neighbour] = read[own].reshape(b, self.k, -1)
    return out


def stage_factory(config, workdir: str):
  """The data pipeline's retrieval stage (a factory of (data source, first row)), or None
  when config.retrieval.mode == 'none'. Checks the index against the config first and builds
  it when missing (config.retrieval.auto_build), so a wrong index fails before compiling.
  Returns (factory, index) so the caller can record which index the run used."""
  if config.retrieval.mode == 'none':
    return None, None
  if not objectives.uses_pafm(config) or 'retrieved' not in config.objective.pafm.sources:
    logging.warning("config.retrieval.mode=%r retrieves neighbours that objective %r does not "
                    "use (only t and ε from the pipeline are); set config.retrieval.mode='none' "
                    'to save the retrieval work.', config.retrieval.mode, config.objective.name)
  index = dataset_index.ensure(config, workdir)
  shape = pipeline.sample_shape(config.data)

  def factory(source, first_row):
    return NeighbourStage(
        index, source, shape, mode=config.retrieval.mode, k=config.retrieval.k,
        key=keys_lib.KeyTransform.from_config(config), seed=config.seed,
        path_name=config.objective.path, t_sampling=config.objective.t_sampling,
        row_offset=first_row)

  return factory, index


