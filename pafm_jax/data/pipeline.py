"""Grain input pipelines built from the `config.data` section.

Train pipeline (:func:`create_train_iterator`), one per JAX process::

  MapDataset.range(N)                      example indices of the split
    .shuffle(derived seed)                 global permutation, new one every epoch
    .batch(global_batch, drop_remainder=True)       per epoch (no batch spans two epochs)
    .map(rows [p*b, (p+1)*b) of each global batch)  this process's slice
    .repeat()                              forever; upstream shuffle reseeded per epoch
    .map(read + preprocess one batch)      one `source.__getitems__` call per batch
    [.map_with_index(extra_stage)]         e.g. retrieval.stage.NeighbourStage: a pure
                                           function of (global batch index, batch)
    .to_iter_dataset(ReadOptions)          thread prefetch
    [.mp_prefetch(worker_count)]           optional worker processes

Everything up to ``.batch`` is index arithmetic, so the order of example ids is a
pure function of (seed, epoch, process_index, process_count, local_batch_size)
and does not depend on ``worker_count`` (``mp_prefetch`` hands out whole batches
round-robin).  :func:`train_index_dataset` exposes that index stream alone.

All processes must pass the same ``seed`` (the permutation is global; each process
takes its rows of every global batch, so the shards of one epoch are disjoint and
together cover the split minus ``N % global_batch`` examples, and the global batch
does not depend on how many processes share it).

Checkpointing the iterator with Orbax (grain 0.2.18, orbax-checkpoint 0.12.8)::

  manager = ocp.CheckpointManager(
      directory, options=...,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=iterator_save_args(it)))          # grain.checkpoint.CheckpointSave(it)
  manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=iterator_restore_args(it)))       # grain.checkpoint.CheckpointRestore(it)

``CheckpointHandler`` is a *synchronous* Orbax handler: ``it.get_state()`` is
taken inside ``manager.save`` even with async checkpointing, so advancing the
iterator right after ``save`` returns is safe.  Each process writes its own file
``process_<i>-of-<n>.json`` (index/count from ``jax.process_index()/count()``),
and ``restore`` sets the state on the given iterator *in place*.  The state is a
small JSON dict (the next batch index); restoring it into an iterator built with a
different seed / batch size / process count silently gives a different stream,
so those must be kept identical across a resume.  The state layout also depends
on ``worker_count`` (``mp_prefetch`` stores one sub-state per worker), so a
checkpoint must be resumed with the same ``data.worker_count``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from pafm_jax import batch_contract as fields
from pafm_jax.data import captioned


DEFAULT_TFDS_DIR = "~/.cache/pafm_jax/tfds"
TFDS_DIR_ENV = "PAFM_TFDS_DIR"
FASHION_MNIST = "fashion_mnist"
# Thread count for reading batches in the main process (ReadOptions.num_threads), when a
# config does not say (`data.read_threads`, declared in configs/base.py).
DEFAULT_READ_THREADS = 2
# Caption token length of a batch when config.data does not say (`data.max_tokens`).
DEFAULT_MAX_TOKENS = 32
# Captioned datasets (data/captioned.py): Fashion-MNIST with templated captions, built on first
# use, or a directory a user packed (config.data.captioned_dir).
CAPTIONED = "captioned"
CAPTIONED_NAMES = fields.CAPTIONED_DATASETS
# Latent datasets (data/latents.py): the encoder's moments, a fresh latent drawn per epoch.
LATENTS = "latents"
# Stream of the latent draws ε (mixed with the data seed, the batch index and the row).
LATENT_DRAW_STREAM = 0x1A7E

__all__ = [
  "DEFAULT_TFDS_DIR",
  "TFDS_DIR_ENV",
  "create_eval_iterator",
  "create_eval_source",
  "create_train_iterator",
  "iterator_checkpoint_handler",
  "iterator_restore_args",
  "iterator_save_args",
  "load_source",
  "resolve_tfds_dir",
  "shuffle_seed_for",
  "train_index_dataset",
  "validate_data_config",
  "class_sizes",
  "load_arrays",
  "ClassBalancedSubset",
  "subset_positions",
  "whole_split",
]


# ---------------------------------------------------------------------------
# Config helpers.
# ---------------------------------------------------------------------------


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def resolve_tfds_dir(data_config: Any = None) -> str:
  """`data.tfds_dir` if non-empty, else ``$PAFM_TFDS_DIR``, else ``~/.cache/pafm_jax/tfds``."""
  d = _get(data_config, "tfds_dir", "") if data_config is not None else ""
  if not d:
    d = os.environ.get(TFDS_DIR_ENV, "") or DEFAULT_TFDS_DIR
  return os.path.abspath(os.path.expanduser(os.fspath(d)))


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def validate_data_config(
  data_config: Any,
  *,
  local_batch_size: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  seed: int | None = None,
) -> None:
  """Cheap checks of the config and the call arguments; raises ``ValueError``.

  Run before any dataset is built or read.  Size checks that need the split
  length are done later in :func:`create_train_iterator`.
  """
  name = _get(data_config, "name")
  if not name:
    raise ValueError("config.data.name must be set (e.g. 'fashion_mnist').")
  if local_batch_size is not None:
    _check_int("local_batch_size", local_batch_size, 1)
  _check_int("process_count", process_count, 1)
  _check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(
      f"process_index ({process_index}) must be < process_count ({process_count})"
    )
  if seed is not None:
    _check_int("seed (config.data.shuffle_seed)", seed, 0)
  _check_int("config.data.worker_count", _get(data_config, "worker_count", 0), 0)
  _check_int(
    "config.data.prefetch_buffer_size", _get(data_config, "prefetch_buffer_size", 2), 0
  )
  _check_int("config.data.read_threads", _get(data_config, "read_threads", DEFAULT_READ_THREADS), 1)
  _check_int("config.data.subset_per_class", _get(data_config, "subset_per_class", 0), 0)
  for field in ("image_size", "channels", "num_classes"):
    if _get(data_config, field) is not None:
      _check_int(f"config.data.{field}", _get(data_config, field), 1)
  if name == LATENTS:
    _latents_dir(data_config)
  if name in (FASHION_MNIST, captioned.FASHION_MNIST_CAPTIONS):
    expected = {"image_size": 28, "channels": 1, "num_classes": 10}
    for field, want in expected.items():
      got = _get(data_config, field)
      if got is not None and got != want:
        raise ValueError(
          f"config.data.{field}={got} but Fashion-MNIST has {field}={want}."
        )


def check_config(config: Any) -> None:
  """config.data on its own (no data is read), and the shuffle seed it resolves to."""
  validate_data_config(config.data, seed=train_seed(config))


def train_seed(config: Any) -> int:
  """The seed of the example order: config.data.shuffle_seed, or config.seed when it is −1."""
  seed = _get(config.data, "shuffle_seed", -1)
  return config.seed if seed == -1 else seed


def shuffle_seed_for(seed: int) -> int:
  """The seed handed to ``MapDataset.shuffle`` for a user seed.

  Grain reseeds the shuffle of epoch ``e`` with ``seed + e``, so seed ``s`` in
  epoch 1 would replay seed ``s + 1`` in epoch 0.  Hashing the user seed first
  removes that overlap between neighbouring seeds.
  """
  return int(np.random.SeedSequence([int(seed), 0x9AF3]).generate_state(1, np.uint32)[0])


# ---------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------


def load_source(data_config: Any, split: str | None = None) -> Sequence[dict[str, Any]]:
  """Random-access source of ``split`` (default ``data.split``).

  ``fashion_mnist`` is built from the IDX files into ``tfds_dir`` on first use
  (see :mod:`pafm_jax.data.fashion_mnist`).  Any other ``data.name`` must be a
  TFDS dataset already prepared as array_record under ``tfds_dir``.  With
  ``data.subset_per_class`` > 0 the training split (``data.split``) is the
  class-balanced subset of :class:`ClassBalancedSubset`, for every reader alike
  (pipeline, retrieval index, class sizes, memorisation); other splits are whole.
  """
  split = split or _get(data_config, "split", "train")
  source = _load_whole_source(data_config, split)
  per_class = _subset_per_class(data_config, split)
  if per_class:
    source = ClassBalancedSubset(
      source, subset_positions(source_labels(source), per_class,
                               int(_get(data_config, "subset_seed", 0)),
                               int(_get(data_config, "num_classes"))))
  return source


def is_captioned(data_config: Any) -> bool:
  """Whether config.data names a captioned dataset (text conditions in every batch)."""
  return _get(data_config, "name") in CAPTIONED_NAMES


def captioned_root(data_config: Any) -> str:
  """The directory of a captioned dataset's splits; Fashion-MNIST's is built when missing."""
  name = _get(data_config, "name")
  if name == CAPTIONED:
    root = _get(data_config, "captioned_dir", "")
    if not root:
      raise ValueError(
        "config.data.name='captioned' reads a packed dataset: set config.data.captioned_dir "
        "to the directory `python -m pafm_jax.tools.pack_captions` wrote.")
    return os.path.abspath(os.path.expanduser(root))
  from pafm_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top

  seed = int(_get(data_config, "caption_seed", 0))
  root = captioned.fashion_mnist_captions_root(resolve_tfds_dir(data_config), seed)
  if not all(captioned.is_written(root, s) for s in fashion_mnist.SPLIT_SIZES):
    idx_dir = _get(data_config, "idx_dir") or fashion_mnist.DEFAULT_IDX_DIR
    fashion_mnist.check_idx_files(idx_dir)
    captioned.build_fashion_mnist_captions(root, idx_dir, seed=seed)
  return root


def _subset_per_class(data_config: Any, split: str) -> int:
  """data.subset_per_class where `split` is the training split (0: read it whole)."""
  if split != _get(data_config, "split", "train"):
    return 0
  return int(_get(data_config, "subset_per_class", 0) or 0)


def whole_split(data_config: Any) -> Any:
  """A copy of config.data without the training subset: what belongs to the dataset rather
  than to a run (the domain classifier, reference statistics) is built from whole splits."""
  whole = data_config.copy_and_resolve_references()
  if "subset_per_class" in whole:
    whole.subset_per_class = 0
  return whole


# Examples per read when a whole split's labels are collected.
LABEL_CHUNK = 8192


def source_labels(source) -> np.ndarray:
  """int64 [N]: the label of every example of a random-access source, in order."""
  labels = np.zeros(len(source), np.int64)
  getitems = getattr(source, "__getitems__", None)
  for start in range(0, len(source), LABEL_CHUNK):
    idx = list(range(start, min(len(source), start + LABEL_CHUNK)))
    records = getitems(idx) if getitems is not None else [source[i] for i in idx]
    labels[start:start + len(idx)] = [r["label"] for r in records]
  return labels


def subset_positions(labels: np.ndarray, per_class: int, seed: int,
                     num_classes: int) -> np.ndarray:
  """int64 ascending positions of ``per_class`` examples of every class: for class c, the
  first ``per_class`` of its positions in an order drawn from (seed, c). Deterministic, and
  nested: a larger subset of the same seed contains the smaller one."""
  labels = np.asarray(labels)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(
        f"config.data.subset_per_class={per_class} but class {c} has only {len(members)} "
        "examples; lower it (0: the whole split).")
    order = np.random.default_rng([int(seed), c, 0x5B5E7]).permutation(len(members))
    chosen.append(members[order[:per_class]])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


class ClassBalancedSubset:
  """A random-access view of a source holding only the examples at ``positions``.

  Example i of the view is example ``positions[i]`` of the source: positions in the view are
  the rows' identities (the 'id' batch field, the retrieval index's ids). Picklable, so Grain
  worker processes read through it too.
  """

  def __init__(self, source, positions: np.ndarray):
    self.source = source
    self.positions = np.asarray(positions, np.int64)

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[int(self.positions[i])]

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    outer = [int(self.positions[i]) for i in indices]
    getitems = getattr(self.source, "__getitems__", None)
    return getitems(outer) if getitems is not None else [self.source[i] for i in outer]

  def __getattr__(self, name: str) -> Any:
    # A captioned source's batch reader (and its metadata), read through the positions.
    if name == "read_batch" and hasattr(self.source, "read_batch"):
      def read_batch(indices, max_tokens, tokens=True):
        indices = np.asarray(indices, np.int64)
        batch = self.source.read_batch(self.positions[indices], max_tokens, tokens)
        batch[fields.ID] = indices
        return batch
      return read_batch
    if name in ("metadata", "text_rows", "captions") and "source" in self.__dict__:
      return getattr(self.source, name)
    raise AttributeError(name)


def _load_whole_source(data_config: Any, split: str) -> Sequence[dict[str, Any]]:
  name = _get(data_config, "name")
  tfds_dir = resolve_tfds_dir(data_config)
  if name == FASHION_MNIST:
    from pafm_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top

    idx_dir = _get(data_config, "idx_dir") or fashion_mnist.DEFAULT_IDX_DIR
    return fashion_mnist.load_source(tfds_dir, idx_dir, split)
  if name == LATENTS:
    return _latent_source(data_config, split)
  if name in CAPTIONED_NAMES:
    lit_dir = _get(data_config, "lit_dir", "")
    embeddings = ""
    if lit_dir:
      embeddings = captioned.image_embeddings_path(lit_dir, split)
      finished = os.path.join(os.path.dirname(embeddings), "lit.json")
      if not (os.path.isfile(embeddings) and os.path.isfile(finished)):
        raise FileNotFoundError(
          f"config.data.lit_dir={lit_dir!r} has no {os.path.basename(embeddings)}; train the "
          "LiT towers there with --mode=train_lit.")
    source = captioned.CaptionedSource(
      captioned.split_directory(captioned_root(data_config), split), embeddings)
    captioned.check_against_config(source.metadata, data_config, source.directory)
    return source
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=tfds_dir)
  except Exception as e:  # DatasetNotFoundError and friends.
    raise FileNotFoundError(
      f"TFDS dataset {name!r} (config.data.name) was not found under "
      f"{tfds_dir} (config.data.tfds_dir / ${TFDS_DIR_ENV}); prepare it "
      "there as array_record first."
    ) from e
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared under {tfds_dir} "
      "(config.data.tfds_dir); prepare it there as array_record first."
    )
  return builder.as_data_source(split=split)


def _latents_dir(data_config: Any) -> str:
  root = _get(data_config, "latents_dir", "")
  if not root:
    raise ValueError(
      "config.data.name='latents' reads a latent dataset: set config.data.latents_dir to the "
      "directory `python -m pafm_jax.tools.encode_latents` wrote.")
  return root


def _latent_source(data_config: Any, split: str):
  from pafm_jax.data import latents  # pylint: disable=g-import-not-at-top

  root = _latents_dir(data_config)
  source = latents.LatentSource(os.path.expanduser(root), split)
  h, w, c = source.metadata["latent_shape"]
  want = (_get(data_config, "image_size"), _get(data_config, "image_size"),
          _get(data_config, "channels"))
  if (h, w, c) != want or source.metadata["num_classes"] != _get(data_config, "num_classes"):
    raise ValueError(
      f"the latents under {root} are {h}×{w}×{c} with {source.metadata['num_classes']} "
      f"classes, but config.data says {want[0]}×{want[1]}×{want[2]} with "
      f"{_get(data_config, 'num_classes')}; set config.data.image_size, channels and "
      "num_classes to match.")
  return source


def is_latent(data_config: Any) -> bool:
  """Whether config.data reads a latent dataset (data/latents.py)."""
  return _get(data_config, "name") == LATENTS


def latent_scale(metadata: dict) -> tuple[float, float]:
  """(scale, shift) of a latent dataset's metadata (latents.json): training, retrieval and
  the decoder all see scale·(latent − shift); SD's shift is 0, SD3/FLUX-style VAEs centre
  their latents."""
  return (float(metadata["scaling_factor"]),
          float(metadata.get("encoder", {}).get("shift_factor", 0.0) or 0.0))


def latent_metadata(data_config: Any) -> dict:
  """latents.json of the latent dataset config.data reads."""
  latent, _ = _latent_view(load_source(data_config))
  if latent is None:
    raise ValueError(f"config.data.name={_get(data_config, 'name')!r} is not a latent dataset.")
  return latent.metadata


def pixel_data_config(data_config: Any) -> Any:
  """config.data of the images behind latents (name pixel_source, pixel_size, pixel_channels):
  what the domain classifier, reference statistics and memorisation read; config.data
  itself for pixel datasets."""
  if not is_latent(data_config):
    return data_config
  if not _get(data_config, "pixel_source", ""):
    raise ValueError(
      "evaluating a latent model in pixel space needs the images' dataset: set "
      "config.data.pixel_source (e.g. 'fashion_mnist'), pixel_size and pixel_channels.")
  pixels = data_config.copy_and_resolve_references()
  pixels.name = data_config.pixel_source
  pixels.image_size = data_config.pixel_size
  pixels.channels = data_config.pixel_channels
  return pixels


def pixel_space_config(config: Any) -> Any:
  """The whole config with config.data the images behind latents (pixel_data_config): what
  evaluation, the domain classifier and REPA's encoder see; config itself for pixel data."""
  if not is_latent(config.data):
    return config
  pixels = config.copy_and_resolve_references()
  pixels.data = pixel_data_config(config.data)
  return pixels


def _latent_view(source) -> tuple[Any, np.ndarray | None]:
  """(the LatentSource under `source`, the subset's positions or None), or (None, None)."""
  # No LatentSource exists before its module is imported: pixel pipelines never import it.
  latents = sys.modules.get("pafm_jax.data.latents")
  if latents is None:
    return None, None
  if isinstance(source, ClassBalancedSubset):
    inner, positions = _latent_view(source.source)[0], source.positions
    return inner, (positions if inner is not None else None)
  return (source, None) if isinstance(source, latents.LatentSource) else (None, None)


def load_arrays(data_config: Any, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A whole (small) split in memory: images float32 [N, H, W, C] in [-1, 1], labels int32 [N].

  For tools that enumerate the dataset (exact posteriors, benchmarks); training streams.
  """
  source = load_source(data_config, split)
  read = _ReadBatch(source, _image_shape(data_config), _max_tokens(data_config))
  batch = read(np.arange(len(source)))
  return batch["image"], batch["label"]


def class_sizes(data_config: Any, split: str | None = None) -> np.ndarray:
  """Per-class example counts ``int64 [num_classes]`` of ``split`` (default ``data.split``).

  Read from the dataset's TFDS metadata (``metadata['class_sizes'][split]``), which the
  stratified PAFM estimator needs; the Fashion-MNIST builder writes it, and a dataset
  prepared elsewhere must store it the same way. A class-balanced training subset
  (``data.subset_per_class``) has ``subset_per_class`` of each class.
  """
  name = _get(data_config, "name")
  split = split or _get(data_config, "split", "train")
  per_class = _subset_per_class(data_config, split)
  if per_class:
    return np.full(int(_get(data_config, "num_classes")), per_class, np.int64)
  tfds_dir = resolve_tfds_dir(data_config)
  if name == FASHION_MNIST:
    from pafm_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top

    idx_dir = _get(data_config, "idx_dir") or fashion_mnist.DEFAULT_IDX_DIR
    return fashion_mnist.class_sizes(split, builder=fashion_mnist.prepare(tfds_dir, idx_dir))
  if name in CAPTIONED_NAMES:
    return np.asarray(load_source(data_config, split).metadata["class_sizes"], np.int64)
  if name == LATENTS:
    return np.asarray(load_source(data_config, split).metadata["splits"][split]["class_sizes"],
                      np.int64)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  meta = tfds.builder(name, data_dir=tfds_dir).info.metadata or {}
  if split not in meta.get("class_sizes", {}):
    raise ValueError(
      f"TFDS dataset {name!r} under {tfds_dir} has no metadata['class_sizes'][{split!r}]; "
      "the stratified PAFM combination needs the size of every class. Store it in the "
      "dataset's metadata, or set config.objective.pafm.stratified=False."
    )
  return np.asarray(meta["class_sizes"][split], dtype=np.int64)


def create_eval_source(data_config: Any, split: str = "test") -> Sequence[dict[str, Any]]:
  """Random-access source of the evaluation split (``source[i]`` is example i)."""
  validate_data_config(data_config)
  return load_source(data_config, split)


# ---------------------------------------------------------------------------
# Batch reading / preprocessing.
# ---------------------------------------------------------------------------


class _ReadBatch:
  """Maps an int64 array of example indices to a preprocessed batch.

  A picklable class (not a lambda) so that ``mp_prefetch`` workers can use it.
  """

  def __init__(self, source, image_shape: tuple[int, int, int] | None,
               max_tokens: int | None = None, text_tokens: bool = True):
    self._source = source
    self._image_shape = image_shape
    self._max_tokens = max_tokens
    self._text_tokens = text_tokens

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    latent, positions = _latent_view(self._source)
    if latent is not None:
      return self._read_latents(latent, indices, positions)
    if hasattr(self._source, "read_batch"):  # a captioned source: text fields too
      batch = self._source.read_batch(indices, self._max_tokens or DEFAULT_MAX_TOKENS,
                                      self._text_tokens)
      batch[fields.IMAGE] = self._scaled(batch[fields.IMAGE])
      return batch
    idx_list = [int(i) for i in indices]
    getitems = getattr(self._source, "__getitems__", None)
    records = getitems(idx_list) if getitems is not None else [self._source[i] for i in idx_list]
    images = self._scaled(np.stack([np.asarray(r["image"]) for r in records]))
    labels = np.asarray([r["label"] for r in records], dtype=np.int32)
    # A row's identity is its position in the source, whatever ids the records carry: the
    # retrieval index stores positions, and duplicate removal compares the two.
    return {fields.IMAGE: images, fields.LABEL: labels, fields.ID: indices}

  def _read_latents(self, source, indices: np.ndarray, positions) -> dict[str, np.ndarray]:
    """The scaled mean as 'image' (what retrieval indexes and candidates are), the scaled
    std for the per-epoch draw (LatentDraw), and the stored pixels in [−1, 1] if any."""
    rows = source.read_batch(indices if positions is None else positions[indices])
    scale, shift = map(np.float32, latent_scale(source.metadata))
    batch = {fields.IMAGE: self._scaled((rows["mean"] - shift) * scale),
             fields.LATENT_STD: rows["std"].astype(np.float32) * scale,
             fields.LABEL: rows["label"].astype(np.int32), fields.ID: indices}
    if "pixels" in rows:
      batch[fields.PIXELS] = rows["pixels"].astype(np.float32) * np.float32(1 / 127.5) - 1.0
    return batch

  def _scaled(self, images: np.ndarray) -> np.ndarray:
    if self._image_shape is not None and images.shape[1:] != self._image_shape:
      raise ValueError(
        f"dataset images have shape {images.shape[1:]} but config.data "
        f"(image_size, image_size, channels) says {self._image_shape}"
      )
    if images.dtype == np.uint8:
      return images.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
    return images.astype(np.float32)  # e.g. pre-scaled float latents.


class LatentDraw(grain.transforms.MapWithIndex):
  """'image' ← 'image' + 'latent_std'·ε: a fresh latent per example and epoch, as the anchors
  train (METHOD.md §7). ε is a pure function of (seed, global batch index, global row), so
  the draw resumes with the iterator and does not depend on how many processes share a batch.
  """

  def __init__(self, seed: int, first_row: int):
    self._seed, self._first_row = int(seed), int(first_row)

  def map_with_index(self, index: int, batch: dict) -> dict:
    batch = dict(batch)
    std = batch.pop(fields.LATENT_STD)
    eps = np.stack([np.random.default_rng(
        [self._seed, LATENT_DRAW_STREAM, int(index), self._first_row + r]).standard_normal(
            std.shape[1:], np.float32) for r in range(len(std))])
    batch[fields.IMAGE] = batch[fields.IMAGE] + std * eps
    return batch


def batch_reader(source, image_shape: tuple[int, int, int] | None,
                 max_tokens: int | None = None, text_tokens: bool = True):
  """int64 ids [n] → {'image': float32 [n, H, W, C] in [-1, 1], 'label', 'id'} (and the text
  fields of a captioned source, tokens padded to `max_tokens`; text_tokens=False: only the
  sentence vectors, for readers of candidates and keys): how every pipeline reads and
  preprocesses examples (picklable, so workers can use it)."""
  return _ReadBatch(source, image_shape, max_tokens, text_tokens)


def _max_tokens(data_config: Any) -> int:
  return int(_get(data_config, "max_tokens", DEFAULT_MAX_TOKENS) or DEFAULT_MAX_TOKENS)


def sample_shape(data_config: Any) -> tuple[int, int, int] | None:
  """(image_size, image_size, channels) of config.data, or None when unset."""
  return _image_shape(data_config)


def _image_shape(data_config: Any) -> tuple[int, int, int] | None:
  size, ch = _get(data_config, "image_size"), _get(data_config, "channels")
  if size is None or ch is None:
    return None
  return (int(size), int(size), int(ch))


def _read_options(data_config: Any) -> grain.ReadOptions:
  return grain.ReadOptions(
    num_threads=int(_get(data_config, "read_threads", DEFAULT_READ_THREADS)),
    prefetch_buffer_size=int(_get(data_config, "prefetch_buffer_size", 2)),
  )


def _maybe_mp_prefetch(ds: grain.IterDataset, data_config: Any) -> grain.IterDataset:
  workers = int(_get(data_config, "worker_count", 0))
  if workers <= 0:
    return ds
  # Grain reads its absl flags when starting workers; a library user that never
  # ran absl.app would otherwise get UnparsedFlagAccessError.
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(
    grain.MultiprocessingOptions(
      num_workers=workers,
      per_worker_buffer_size=max(1, int(_get(data_config, "prefetch_buffer_size", 2))),
    )
  )


# ---------------------------------------------------------------------------
# Train pipeline.
# ---------------------------------------------------------------------------


class _ProcessRows:
  """This process's rows [start, start + size) of a global batch of indices (picklable)."""

  def __init__(self, start: int, size: int):
    self._start, self._size = start, size

  def __call__(self, ids: np.ndarray) -> np.ndarray:
    return ids[self._start:self._start + self._size]


def train_index_dataset(
  num_examples: int,
  *,
  local_batch_size: int,
  process_index: int,
  process_count: int,
  seed: int,
) -> grain.MapDataset:
  """Infinite ``MapDataset`` of int64 [local_batch_size] example-index batches.

  Exactly the index stream of :func:`create_train_iterator` (its ``'id'``
  field), without reading any data.
  """
  _check_int("num_examples", num_examples, 1)
  _check_int("local_batch_size", local_batch_size, 1)
  global_batch = local_batch_size * process_count
  if global_batch > num_examples:
    raise ValueError(
      f"the global batch ({local_batch_size} per process x {process_count} "
      f"processes) is larger than the {num_examples} examples of an epoch; "
      f"lower the global batch size."
    )
  # Cut each epoch's permutation into global batches and give process p rows
  # [p*b, (p+1)*b) of each: the global batch assembled by
  # `jax.make_array_from_process_local_data` is then the same whatever the
  # number of processes, so a multi-host run reproduces a single-host one.
  ds = grain.MapDataset.range(num_examples).shuffle(seed=shuffle_seed_for(seed))
  ds = ds.batch(global_batch, drop_remainder=True)
  ds = ds.map(_ProcessRows(process_index * local_batch_size, local_batch_size))
  return ds.repeat(None)


def create_train_iterator(
  data_config: Any,
  *,
  local_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  seed: int | None = None,
  extra_stage: Any = None,
) -> grain.DatasetIterator:
  """Infinite, shuffled, per-process train iterator (supports get/set_state).

  Yields ``{'image': float32 [b,H,W,C] in [-1, 1], 'label': int32 [b],
  'id': int64 [b]}`` with ``b = local_batch_size`` for this process only.
  ``seed`` defaults to ``data.shuffle_seed``; it must be the same on every
  process.  Same arguments -> identical batches; every epoch is a new
  permutation.  Reads ``data.split`` (default 'train').

  ``extra_stage(source, first_row)`` may return a ``grain.transforms.MapWithIndex`` applied
  to every batch after reading, with the index of the global batch; ``first_row`` is this
  process's first row in it. It runs in the worker processes too, and resumes with the
  iterator because it is a pure function of (index, batch).
  """
  if seed is None:
    seed = _get(data_config, "shuffle_seed")
    if seed is None:
      raise ValueError(
        "create_train_iterator needs `seed=` or config.data.shuffle_seed."
      )
  validate_data_config(
    data_config,
    local_batch_size=local_batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=seed,
  )
  source = load_source(data_config, _get(data_config, "split", "train"))
  index_ds = train_index_dataset(
    len(source),
    local_batch_size=local_batch_size,
    process_index=process_index,
    process_count=process_count,
    seed=seed,
  )
  ds = index_ds.map(_ReadBatch(source, _image_shape(data_config), _max_tokens(data_config)))
  if is_latent(data_config):
    ds = ds.map_with_index(LatentDraw(seed, process_index * local_batch_size))
  if extra_stage is not None:
    ds = ds.map_with_index(extra_stage(source, process_index * local_batch_size))
  ds = ds.to_iter_dataset(_read_options(data_config))
  ds = _maybe_mp_prefetch(ds, data_config)
  return iter(ds)


def create_eval_iterator(
  data_config: Any,
  *,
  local_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  split: str = "test",
) -> grain.DatasetIterator:
  """One in-order pass over ``split`` (this process's ``[p::n]`` slice).

  The last batch may be smaller than ``local_batch_size``; no example is dropped.
  """
  validate_data_config(
    data_config,
    local_batch_size=local_batch_size,
    process_index=process_index,
    process_count=process_count,
  )
  source = load_source(data_config, split)
  ds = grain.MapDataset.range(len(source))[process_index::process_count]
  ds = ds.batch(local_batch_size, drop_remainder=False)
  ds = ds.map(_ReadBatch(source, _image_shape(data_config), _max_tokens(data_config)))
  ds = ds.to_iter_dataset(_read_options(data_config))
  return iter(ds)


# ---------------------------------------------------------------------------
# Orbax integration.
# ---------------------------------------------------------------------------


def iterator_checkpoint_handler() -> Any:
  """Handler to register for the ``'data'`` item of an ``ocp.CheckpointManager``."""
  return grain.checkpoint.CheckpointHandler()


def iterator_save_args(it: grain.DatasetIterator) -> Any:
  """``grain.checkpoint.CheckpointSave(it)``: the ``'data'`` entry of ``ocp.args.Composite``."""
  return grain.checkpoint.CheckpointSave(it)


def iterator_restore_args(it: grain.DatasetIterator) -> Any:
  """``grain.checkpoint.CheckpointRestore(it)``; Orbax restores ``it`` in place."""
  return grain.checkpoint.CheckpointRestore(it)
