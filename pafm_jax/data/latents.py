"""Latent datasets: an image encoder's moments (mean, std) per image, for training on latents.

SiT and REPA train on Stable-Diffusion-VAE latents with a fresh draw z = mean + std·ε per
example and epoch, so a latent dataset stores the encoder's posterior moments, not one
sample. `python -m pafm_jax.tools.encode_latents` writes it (see that module for the commands);
`LatentSource` reads it with random access (Grain, worker processes included).

Layout of a dataset root:

  <root>/encode_settings.json                      what the writer was asked to do (written
                                                   first; a resumed run must match it)
  <root>/<split>/shard-00003-of-00016.array_record one ArrayRecord file per shard
  <root>/<split>/shard-00003-of-00016.json         the shard's summary, written after its
                                                   records: only a shard with it is finished
  <root>/<split>/split.json                        the split's summary, once every shard is
  <root>/latents.json                              the dataset's metadata, once every split is

Records are fixed-layout raw bytes: the fields of metadata['record_fields'] = [[name, dtype,
shape], ...] concatenated in that order, C order, little-endian:

  mean    float32 [h, w, c]   the encoder's posterior mean, UNSCALED (× scaling_factor to train)
  std     float32 [h, w, c]   exp(logvar / 2), unscaled
  label   int32   []          the class index
  pixels  uint8   [H, W, C]   optional (--store_pixels): the preprocessed image itself, for
                              REPA's frozen encoder during latent training

decoded with one np.frombuffer per batch (no pickle, no TensorFlow). Order: source example i
goes to shard ⌊i·S/N⌋ (contiguous ranges, `shard_examples`); with flips every example is
followed by its horizontally flipped copy, so a split of N images has 2N records. Files:

  shard json   {"shard", "num_shards", "first" (global index of its first record), "count",
                "class_counts"}
  split.json   {"num_examples" (records), "class_sizes" (records per class), "num_shards",
                "shards" (file names in order)}
  latents.json {"format_version": 1, "latent_shape", "pixel_shape" (or null), "record_fields",
                "scaling_factor", "num_classes", "class_names" (or null), "image_size",
                "flips", "source", "encoder": {"kind", "path", "fingerprint"},
                "splits": {name: split.json}}

Every file's content is deterministic (no times, no host names), so two runs with the same
inputs write the same bytes. A shard is written to `<name>.array_record.tmp`, closed, renamed
to its name, and only then gets its .json (atomically, through a temporary file).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Sequence

from array_record.python import array_record_module
import grain
import numpy as np

FORMAT_VERSION = 1
METADATA_FILE = 'latents.json'
SETTINGS_FILE = 'encode_settings.json'
SPLIT_FILE = 'split.json'
RECORD_SUFFIX = '.array_record'
TMP_SUFFIX = '.tmp'
# group_size 1: every record is its own chunk, which random access needs (Grain refuses
# larger groups); zstd level 3 (ArrayRecord's default) halves stored pixels at little cost.
WRITER_OPTIONS = 'group_size:1'
WRITE_COMMAND = 'python -m pafm_jax.tools.encode_latents'


# ---------------------------------------------------------------------------- layout


def shard_name(shard: int, num_shards: int) -> str:
  """'shard-00003-of-00016' (no suffix)."""
  return f'shard-{shard:05d}-of-{num_shards:05d}'


def shard_paths(root: str, split: str, shard: int, num_shards: int) -> tuple[str, str]:
  """(records file, summary json) of one shard."""
  base = os.path.join(root, split, shard_name(shard, num_shards))
  return base + RECORD_SUFFIX, base + '.json'


def shard_examples(num_examples: int, num_shards: int, shard: int) -> tuple[int, int]:
  """[start, stop) of the SOURCE examples of `shard`: example i is in shard ⌊i·S/N⌋."""
  first = lambda s: -(-s * num_examples // num_shards)    # ⌈s·N/S⌉
  return first(shard), first(shard + 1)


def record_fields(latent_shape: Sequence[int],
                  pixel_shape: Sequence[int] | None) -> list[list[Any]]:
  """metadata['record_fields'] of records with these shapes."""
  fields = [['mean', 'float32', list(latent_shape)], ['std', 'float32', list(latent_shape)],
            ['label', 'int32', []]]
  if pixel_shape is not None:
    fields.append(['pixels', 'uint8', list(pixel_shape)])
  return fields


def record_dtype(fields: Sequence[Sequence[Any]]) -> np.dtype:
  """The packed little-endian numpy structured dtype of one record (its bytes, exactly)."""
  return np.dtype([(name, np.dtype(dtype).newbyteorder('<'), tuple(shape))
                   for name, dtype, shape in fields])


def write_json(path: str, content: Any) -> None:
  """Atomically: a reader sees the old file or the whole new one, never a part. The temporary
  file's name is unique, as processes on several hosts may write the same file at once."""
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix=TMP_SUFFIX,
                             dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(content, f, indent=1, sort_keys=True)
      f.write('\n')
    os.chmod(tmp, 0o644)   # mkstemp makes it private; the dataset is for every reader
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def is_shard_finished(root: str, split: str, shard: int, num_shards: int) -> bool:
  records, summary = shard_paths(root, split, shard, num_shards)
  return os.path.isfile(summary) and os.path.isfile(records)


def is_complete(root: str) -> bool:
  """Whether every split of the dataset at `root` is finished and latents.json is written."""
  root = os.path.abspath(os.path.expanduser(root))
  path = os.path.join(root, METADATA_FILE)
  if not os.path.isfile(path):
    return False
  for split, info in read_json(path)['splits'].items():
    if not os.path.isfile(os.path.join(root, split, SPLIT_FILE)):
      return False
    if not all(os.path.isfile(os.path.join(root, split, f)) for f in info['shards']):
      return False
  return True


def class_sizes(root: str, split: str) -> np.ndarray:
  """int64 [num_classes]: records per class of `split` (flipped copies count)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(root)), split, SPLIT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_message(root, split, path))
  return np.asarray(read_json(path)['class_sizes'], np.int64)


# ---------------------------------------------------------------------------- writing


class ShardWriter:
  """Writes one shard: records go to `<name>.array_record.tmp`; `finish` closes it, checks the
  count, renames it into place and then writes the summary json (which marks it finished).

  Usage: `w = ShardWriter(...); w.write(rows) ...; w.finish()`, or `w.abort()` on failure
  (which removes the temporary file; a finished shard is never touched).
  """

  def __init__(self, root: str, split: str, shard: int, num_shards: int, *, first: int,
               count: int, dtype: np.dtype, num_classes: int):
    self.path, self.summary_path = shard_paths(root, split, shard, num_shards)
    self.shard, self.num_shards, self.first, self.count = shard, num_shards, first, count
    self.dtype = dtype
    self.class_counts = np.zeros(num_classes, np.int64)
    self.written = 0
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    # A .tmp left by a killed run is overwritten: the writer truncates it.
    self._writer = array_record_module.ArrayRecordWriter(self.path + TMP_SUFFIX, WRITER_OPTIONS)

  def write(self, rows: np.ndarray) -> None:
    """rows: a structured array [n] of `dtype`, in record order."""
    rows = np.ascontiguousarray(rows, self.dtype)
    labels = rows['label']
    if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_counts)):
      raise ValueError(f'labels must lie in [0, {len(self.class_counts)}), got '
                       f'[{labels.min()}, {labels.max()}].')
    self.class_counts += np.bincount(labels, minlength=len(self.class_counts))
    raw = rows.tobytes()
    size = self.dtype.itemsize
    for k in range(len(rows)):
      self._writer.write(raw[k * size:(k + 1) * size])
    self.written += len(rows)

  def finish(self) -> dict:
    """Closes, checks and publishes the shard; returns its summary."""
    self._writer.close()
    reader = array_record_module.ArrayRecordReader(self.path + TMP_SUFFIX)
    on_disk = reader.num_records()
    reader.close()
    if on_disk != self.count or self.written != self.count:
      raise RuntimeError(f'{self.path}: wrote {self.written} records ({on_disk} on disk), '
                         f'expected {self.count}.')
    os.replace(self.path + TMP_SUFFIX, self.path)
    summary = {'shard': self.shard, 'num_shards': self.num_shards, 'first': self.first,
               'count': self.count, 'class_counts': self.class_counts.tolist()}
    write_json(self.summary_path, summary)
    return summary

  def abort(self) -> None:
    try:
      self._writer.close()
    finally:
      if os.path.exists(self.path + TMP_SUFFIX):
        os.remove(self.path + TMP_SUFFIX)


def missing_shards(root: str, split: str, num_shards: int) -> list[int]:
  return [s for s in range(num_shards) if not is_shard_finished(root, split, s, num_shards)]


def split_summary(root: str, split: str, num_shards: int, num_classes: int,
                  num_records: int) -> dict:
  """split.json of a split whose shards are all finished, checked against their summaries
  (counts, first records, contiguity)."""
  sizes = np.zeros(num_classes, np.int64)
  names, expected_first = [], 0
  for s in range(num_shards):
    records, summary_path = shard_paths(root, split, s, num_shards)
    summary = read_json(summary_path)
    if (summary['shard'], summary['num_shards'], summary['first']) != (s, num_shards,
                                                                       expected_first):
      raise ValueError(f'{summary_path} does not continue the shards before it (first record '
                       f'{summary["first"]}, expected {expected_first}); remove the shard and '
                       f'rerun `{WRITE_COMMAND}`.')
    expected_first += summary['count']
    sizes += np.asarray(summary['class_counts'], np.int64)
    names.append(os.path.basename(records))
  if expected_first != num_records:
    raise ValueError(f'the shards of {os.path.join(root, split)} hold {expected_first} records, '
                     f'expected {num_records}.')
  return {'num_examples': int(num_records), 'class_sizes': sizes.tolist(),
          'num_shards': int(num_shards), 'shards': names}


# ---------------------------------------------------------------------------- reading


def _missing_message(root: str, split: str, path: str) -> str:
  return (f'the latent dataset {root} has no complete split {split!r}: {path} is missing. '
          f'Write it with `{WRITE_COMMAND} --out={root} ...` (see that module); a run that '
          'stopped resumes when rerun with the same flags, and `--finalize` writes the metadata '
          'once every shard is finished.')


class LatentSource:
  """Random access to one split of a latent dataset: record i as numpy arrays.

  Picklable: ArrayRecord readers are reopened lazily in each Grain worker process.

  Attributes:
    root, split: where it reads.
    metadata: latents.json.
  """

  def __init__(self, root: str, split: str):
    """Raises FileNotFoundError (naming the file and the command that writes it) when the
    dataset or the split is missing or incomplete."""
    self.root = os.path.abspath(os.path.expanduser(root))
    self.split = split
    path = os.path.join(self.root, METADATA_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(_missing_message(self.root, split, path))
    self.metadata = read_json(path)
    if self.metadata.get('format_version') != FORMAT_VERSION:
      raise ValueError(f'{path} is format {self.metadata.get("format_version")!r}; this code '
                       f'reads format {FORMAT_VERSION}. Rewrite it with `{WRITE_COMMAND}`.')
    if split not in self.metadata['splits']:
      raise FileNotFoundError(
          f'the latent dataset {self.root} has no split {split!r} (it has '
          f'{sorted(self.metadata["splits"])}). Write it into a new --out with `{WRITE_COMMAND} '
          f'--splits=...`.')
    info = self.metadata['splits'][split]
    split_path = os.path.join(self.root, split, SPLIT_FILE)
    if not os.path.isfile(split_path):
      raise FileNotFoundError(_missing_message(self.root, split, split_path))
    self._dtype = record_dtype(self.metadata['record_fields'])
    per_example = 2 if self.metadata['flips'] else 1
    num_source = info['num_examples'] // per_example
    paths = []
    for s, name in enumerate(info['shards']):
      file = os.path.join(self.root, split, name)
      if not os.path.isfile(file):
        raise FileNotFoundError(_missing_message(self.root, split, file))
      start, stop = shard_examples(num_source, info['num_shards'], s)
      # The count is the format's (shard_examples); naming it avoids opening every file here.
      paths.append(f'{file}[0:{(stop - start) * per_example}]')
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != info['num_examples']:
      raise ValueError(f'{self.root}/{split}: the shards hold {len(self._records)} records but '
                       f'split.json says {info["num_examples"]}.')

  def __len__(self) -> int:
    return len(self._records)

  def _decode(self, raw: Sequence[bytes]) -> np.ndarray:
    if any(len(r) != self._dtype.itemsize for r in raw):
      raise ValueError(f'a record of {self.root}/{self.split} is not {self._dtype.itemsize} '
                       'bytes long; the files do not match latents.json.')
    return np.frombuffer(b''.join(raw), self._dtype)

  def __getitem__(self, i) -> dict[str, Any]:
    """{'mean': float32 [h, w, c], 'std': same, 'label': int, 'pixels': uint8 [H, W, C] if
    stored}."""
    row = self._decode([self._records[int(i)]])[0]
    out = {name: np.array(row[name]) for name in self._dtype.names}
    out['label'] = int(out['label'])
    return out

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    rows = self.read_batch(np.asarray(indices, np.int64))
    return [{name: (int(rows[name][k]) if name == 'label' else rows[name][k])
             for name in rows} for k in range(len(rows['label']))]

  def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """indices [n] → {'mean': float32 [n, h, w, c], 'std': same, 'label': int32 [n],
    'pixels': uint8 [n, H, W, C] if stored}, each a fresh native-endian array."""
    indices = [int(i) for i in np.asarray(indices, np.int64).reshape(-1)]
    native = {name: self._dtype[name].base.newbyteorder('=') for name in self._dtype.names}
    if not indices:
      return {name: np.zeros((0,) + self._dtype[name].shape, native[name])
              for name in self._dtype.names}
    rows = self._decode(self._records.__getitems__(indices))
    return {name: np.ascontiguousarray(rows[name], native[name]) for name in self._dtype.names}


def num_records(num_examples: int, flips: bool) -> int:
  return num_examples * (2 if flips else 1)


def default_num_shards(num_examples: int, flips: bool, per_shard: int = 1000) -> int:
  """About `per_shard` records a shard, at most one shard per source example."""
  return max(1, min(num_examples, math.ceil(num_records(num_examples, flips) / per_shard)))
