"""Fashion-MNIST packed into ArrayRecord from the local IDX files.

The Debian package ``dataset-fashion-mnist`` ships the four original IDX files
(gzip-compressed) under ``/usr/share/datasets/fashion-mnist``.  This module
turns them into a TFDS dataset stored as ``array_record`` so that Grain can
read it with random access and without TensorFlow:

* :class:`FashionMnistIdx` -- a ``tfds.core.GeneratorBasedBuilder`` named
  ``fashion_mnist_idx`` (distinct from TFDS' own ``fashion_mnist``, which would
  try to download).  Features:

  - ``image``: ``uint8`` tensor ``(28, 28, 1)`` (raw bytes, not PNG, so reading
    needs no image codec / TensorFlow),
  - ``label``: ``ClassLabel`` with the 10 Fashion-MNIST class names,
  - ``id``: ``int64`` position of the example in its split (= its position in
    the IDX file).  Record ``i`` of a split has ``id == i`` because shuffling
    at write time is disabled, so ``source[id]`` gathers an example by id.

  Splits ``train`` (60 000) and ``test`` (10 000).  Per-class counts are stored
  in ``builder.info.metadata['class_sizes'][split]`` (see :func:`class_sizes`).

* :func:`prepare` -- build once (idempotent), :func:`load_source` -- the random
  access data source of one split.

TensorFlow is only needed to *write* the dataset (TFDS serializes
``tf.train.Example`` records); reading goes through TFDS' numpy parser.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
DATASET_NAME = "fashion_mnist_idx"

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
CLASS_NAMES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
# split -> (images file, labels file); IDX file name prefix is 't10k' for test.
IDX_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim


# ---------------------------------------------------------------------------
# IDX reading (plain numpy + gzip).
# ---------------------------------------------------------------------------


def check_idx_files(idx_dir: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
  """Checks that all four IDX files exist; returns split -> (images, labels).

  Raises:
    FileNotFoundError: naming the first missing file, how to install it and
      the config field to point elsewhere.
  """
  idx_dir = os.fspath(os.path.expanduser(idx_dir))
  paths = {}
  for split, names in IDX_FILES.items():
    full = tuple(os.path.join(idx_dir, n) for n in names)
    for p in full:
      if not os.path.isfile(p):
        raise FileNotFoundError(
          f"Fashion-MNIST IDX file not found: {p}\n"
          "Install the Debian package that provides it with\n"
          "    sudo apt-get install dataset-fashion-mnist\n"
          f"(files go to {DEFAULT_IDX_DIR}), or set the config field "
          "`config.data.idx_dir` to the directory that holds the four "
          "files " + ", ".join(n for ns in IDX_FILES.values() for n in ns)
          + "."
        )
    paths[split] = full
  return paths


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  if len(data) < 4 + 4 * ndim:
    raise ValueError(f"{path}: truncated IDX header")
  got_magic = struct.unpack(">i", data[:4])[0]
  if got_magic != magic:
    raise ValueError(f"{path}: bad IDX magic {got_magic}, expected {magic}")
  dims = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
  arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if arr.size != int(np.prod(dims)):
    raise ValueError(
      f"{path}: expected {int(np.prod(dims))} bytes of data for shape "
      f"{dims}, found {arr.size}"
    )
  return arr.reshape(dims)


def read_idx_split(
  idx_dir: str | os.PathLike[str], split: str
) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(images uint8 [n,28,28,1], labels uint8 [n])`` for a split."""
  if split not in IDX_FILES:
    raise ValueError(f"Unknown split {split!r}; expected one of {sorted(IDX_FILES)}")
  images_path, labels_path = check_idx_files(idx_dir)[split]
  images = _read_idx(images_path, _IMAGES_MAGIC, 3)
  labels = _read_idx(labels_path, _LABELS_MAGIC, 1)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(
      f"{split}: {images.shape[0]} images but {labels.shape[0]} labels"
    )
  if images.shape[1:] != IMAGE_SHAPE[:2]:
    raise ValueError(f"{split}: unexpected image shape {images.shape[1:]}")
  if labels.size and int(labels.max()) >= NUM_CLASSES:
    raise ValueError(f"{split}: label {int(labels.max())} out of range")
  return images[..., None], labels


# ---------------------------------------------------------------------------
# TFDS builder.
# ---------------------------------------------------------------------------


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files, stored as ArrayRecord."""

  # Registered name: `fashion_mnist_idx` (derived from the class name).
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Raw uint8 image tensor, label, id = position."}
  # TFDS derives `code_path` only to find a download checksums file, through
  # `importlib_resources` (which tfds 4.9.10 imports lazily without declaring
  # it; requirements.txt pins it).  Nothing is downloaded here, so there is no
  # checksums file: skip the lookup.
  code_path = None

  def __init__(
    self,
    *,
    idx_dir: str | os.PathLike[str] = DEFAULT_IDX_DIR,
    file_format: str | None = "array_record",
    **kwargs: Any,
  ):
    self._idx_dir = os.fspath(os.path.expanduser(idx_dir))
    super().__init__(file_format=file_format, **kwargs)

  @property
  def idx_dir(self) -> str:
    return self._idx_dir

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Fashion-MNIST (Xiao et al. 2017) read from the local IDX files "
        "of the Debian package dataset-fashion-mnist. `id` is the "
        "position of the example in its split."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
          "id": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://github.com/zalandoresearch/fashion-mnist",
      # Keep generation order so that record i has id i.
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    paths = check_idx_files(self._idx_dir)
    sizes = {}
    for split, (_, labels_path) in paths.items():
      labels = _read_idx(labels_path, _LABELS_MAGIC, 1)
      sizes[split] = np.bincount(labels, minlength=NUM_CLASSES).tolist()
    self.info.metadata["class_sizes"] = sizes
    self.info.metadata["class_names"] = list(CLASS_NAMES)
    self.info.metadata["idx_dir"] = self._idx_dir
    return {split: self._generate_examples(split) for split in paths}

  def _generate_examples(self, split: str):
    images, labels = read_idx_split(self._idx_dir, split)
    for i in range(labels.shape[0]):
      # Key = position; with disable_shuffling the records keep this order.
      yield i, {"image": images[i], "label": int(labels[i]), "id": i}


# ---------------------------------------------------------------------------
# Public helpers.
# ---------------------------------------------------------------------------


def get_builder(
  data_dir: str | os.PathLike[str], idx_dir: str | os.PathLike[str] = DEFAULT_IDX_DIR
) -> FashionMnistIdx:
  """Returns the builder (cheap; reads existing metadata if already built)."""
  data_dir = os.fspath(os.path.expanduser(data_dir))
  return FashionMnistIdx(data_dir=data_dir, idx_dir=idx_dir)


def prepare(
  data_dir: str | os.PathLike[str], idx_dir: str | os.PathLike[str] = DEFAULT_IDX_DIR
) -> FashionMnistIdx:
  """Builds the ArrayRecord dataset under ``data_dir`` once; returns the builder.

  Idempotent: if ``data_dir/fashion_mnist_idx/1.0.0`` is already complete this
  returns immediately (the IDX files are then not needed).  Otherwise the IDX
  files are checked *before* any work (clear ``FileNotFoundError``).

  TFDS (4.9.10, ``utils.incomplete_dir``) writes into
  ``fashion_mnist_idx/incomplete.<random>_1.0.0`` and renames it to ``1.0.0``
  only after every split, ``dataset_info.json`` and ``metadata.json`` are
  written; the temp dir is deleted on an exception (a killed process can leave
  it behind, but ``is_prepared()`` only looks at ``1.0.0``), so an interrupted
  build is never mistaken for a complete one.  If several processes build into the same shared directory
  concurrently, the losers of the final rename accept the winner's result.
  """
  builder = get_builder(data_dir, idx_dir)
  if builder.is_prepared():
    return builder
  check_idx_files(idx_dir)  # Fail fast, before TFDS creates anything.
  os.makedirs(os.fspath(os.path.expanduser(data_dir)), exist_ok=True)
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception:
    # A concurrent builder may have won the final rename.
    other = get_builder(data_dir, idx_dir)
    if other.is_prepared():
      return other
    raise
  # Re-open so the info (metadata, file format, shard lengths) is read back
  # exactly as a later run would see it.
  return get_builder(data_dir, idx_dir)


def load_source(
  data_dir: str | os.PathLike[str],
  idx_dir: str | os.PathLike[str] = DEFAULT_IDX_DIR,
  split: str = "train",
  *,
  build: bool = True,
) -> Sequence[dict[str, Any]]:
  """Random-access data source (``ArrayRecordDataSource``) of one split.

  ``source[i]`` is ``{'image': uint8 [28,28,1], 'label': int64, 'id': int64}``
  with ``id == i``.  Reading uses TFDS' numpy example parser (no TensorFlow).
  With ``build=False`` a missing dataset raises instead of being built.
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f"Unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
  if build:
    builder = prepare(data_dir, idx_dir)
  else:
    builder = get_builder(data_dir, idx_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
        f"{DATASET_NAME} is not prepared under {data_dir}; call "
        "pafm_jax.data.fashion_mnist.prepare() first."
      )
  return builder.as_data_source(split=split)


def class_sizes(
  split: str,
  data_dir: str | os.PathLike[str] | None = None,
  *,
  builder: FashionMnistIdx | None = None,
) -> np.ndarray:
  """Per-class example counts ``int64 [10]`` of a prepared split.

  Read from ``builder.info.metadata['class_sizes']`` (computed from the labels
  at build time).  Pass either a prepared ``builder`` or its ``data_dir``.
  """
  if builder is None:
    if data_dir is None:
      raise ValueError("class_sizes needs `builder` or `data_dir`.")
    builder = get_builder(data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(f"{DATASET_NAME} is not prepared under {data_dir}.")
  meta = builder.info.metadata or {}
  if "class_sizes" not in meta:
    raise KeyError(f"No class_sizes in the metadata of {builder.data_dir}")
  sizes = meta["class_sizes"]
  if split not in sizes:
    raise ValueError(f"Unknown split {split!r}; expected one of {sorted(sizes)}")
  return np.asarray(sizes[split], dtype=np.int64)
