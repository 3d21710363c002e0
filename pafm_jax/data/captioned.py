"""Captioned datasets: (image or latent, caption) pairs with the captions' encodings stored.

Text-conditional training reads the text encoder's output from disk and never runs the
encoder. One split is one directory:

  <root>/<split>/
    metadata.json      format, counts, sample shape, encoder name and width, token length L,
                       class names and sizes (labels are optional: 0 for every row without)
    images.npy         uint8 [N, H, W, C] pixels, or float16/float32 latents
    labels.npy         int64 [N]
    caption_ids.npy    int64 [N]: each example's row of the caption table
    captions.json      the caption table's U strings; row 0 is the empty caption ""
    text_tokens.npy    float32 or float16 [U, L, E] token states, zero past each caption's end
    text_mask.npy      int8 [U, L] (1 = token)
    text_pooled.npy    float32 [U, E] the sentence vectors (L2-normalised mean of the tokens)

Examples share rows of the caption table (templated captions repeat; a web dataset's do not,
and then U = N + 1). Row 0, the empty caption, is the null condition of classifier-free
guidance. Every array is memory-mapped, so a split larger than memory is read by position.
A split is written into a temporary directory and renamed into place when complete: a
failed or interrupted write never leaves a split that reads as finished.

Two producers write this format: `build_fashion_mnist_captions` (Fashion-MNIST with the
templated captions of captions.py; built on first use) and `pafm_jax.tools.pack_captions`
(a folder of images with a captions .jsonl or .tsv, e.g. a CC12M-style download).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Sequence

from absl import logging
import numpy as np

from pafm_jax import batch_contract as fields

FORMAT = 'pafm_jax.captioned/1'
FASHION_MNIST_CAPTIONS = fields.CAPTIONED_DATASETS[0]
NULL_CAPTION_ROW = 0
IMAGE_EMBEDDINGS_FILE = 'image_embeddings_{split}.npy'   # in a LiT workdir (text/lit.py)
ENCODE_CHUNK = 256


def image_embeddings_path(lit_dir: str, split: str) -> str:
  """Where a LiT workdir (text/lit.py) keeps its image tower's embeddings of `split`."""
  directory = os.path.abspath(os.path.expanduser(lit_dir))
  if not os.path.isfile(os.path.join(directory, 'lit.json')):
    directory = os.path.join(directory, 'lit')
  return os.path.join(directory, IMAGE_EMBEDDINGS_FILE.format(split=split))


def split_directory(root: str, split: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(root)), split)


def is_written(root: str, split: str) -> bool:
  return os.path.isfile(os.path.join(split_directory(root, split), 'metadata.json'))


def encoder_name(encoder) -> str:
  return getattr(encoder, 'name', type(encoder).__name__)


def caption_table(per_example: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """(the table's captions: "" then each distinct caption once, sorted; int64 [N] each
  example's row of it)."""
  table = [''] + sorted(set(per_example))
  row_of = {c: r for r, c in enumerate(table)}
  return table, np.asarray([row_of[c] for c in per_example], np.int64)


def encode_table(encoder, captions: Sequence[str], *, token_dtype=np.float32,
                 log_every: int = 20) -> dict[str, np.ndarray]:
  """The caption table of `captions` (row 0 must be ""): tokens [U, L, E], mask, pooled."""
  chunks, longest = [], 0
  t0 = time.time()
  for n, start in enumerate(range(0, len(captions), ENCODE_CHUNK)):
    tokens, mask, pooled = encoder.encode(list(captions[start:start + ENCODE_CHUNK]))
    chunks.append((tokens, mask, pooled))
    longest = max(longest, tokens.shape[1])
    done = min(len(captions), start + ENCODE_CHUNK)
    if n % log_every == 0 or done == len(captions):
      logging.info('encoded %d/%d captions (%.0f captions/s)', done, len(captions),
                   done / max(time.time() - t0, 1e-9))
  width = chunks[0][2].shape[1]
  table = {'text_tokens': np.zeros((len(captions), longest, width), token_dtype),
           'text_mask': np.zeros((len(captions), longest), np.int8),
           'text_pooled': np.zeros((len(captions), width), np.float32)}
  start = 0
  for tokens, mask, pooled in chunks:
    rows = slice(start, start + len(pooled))
    table['text_tokens'][rows, :tokens.shape[1]] = tokens * mask[..., None]
    table['text_mask'][rows, :mask.shape[1]] = mask
    table['text_pooled'][rows] = pooled
    start += len(pooled)
  return table


@contextlib.contextmanager
def split_writer(root: str, split: str):
  """Yields a temporary directory to write one split into; renamed to <root>/<split> when the
  block finishes, deleted when it raises (so nothing half-written is ever a split)."""
  final = split_directory(root, split)
  if os.path.exists(final):
    raise FileExistsError(f'{final} exists; remove it to rewrite the split.')
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{split}.incomplete-', dir=os.path.dirname(final))
  try:
    yield tmp
    os.chmod(tmp, 0o755)   # mkdtemp makes it private; the split is for every reader
    try:
      os.replace(tmp, final)
    except OSError:
      if not is_written(root, split):
        raise
      # Another process wrote the same split first (two runs building captioned
      # Fashion-MNIST at once): theirs is complete, ours is dropped.
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_tables(directory: str, *, sample_shape, sample_dtype, labels: np.ndarray,
                 caption_ids: np.ndarray, captions: Sequence[str], table: dict[str, np.ndarray],
                 encoder: str, class_names: Sequence[str] = (), extra: dict | None = None):
  """Everything of a split but its images (module docstring), metadata.json last."""
  n = len(labels)
  if not captions or captions[NULL_CAPTION_ROW] != '':
    raise ValueError('row 0 of the caption table must be the empty caption "".')
  if len(caption_ids) != n:
    raise ValueError(f'{n} labels but {len(caption_ids)} caption ids.')
  if n and (caption_ids.min() < 1 or caption_ids.max() >= len(captions)):
    raise ValueError('caption ids must point into rows 1..U-1 of the caption table.')
  np.save(os.path.join(directory, 'labels.npy'), np.asarray(labels, np.int64))
  np.save(os.path.join(directory, 'caption_ids.npy'), np.asarray(caption_ids, np.int64))
  for name, array in table.items():
    np.save(os.path.join(directory, f'{name}.npy'), array)
  with open(os.path.join(directory, 'captions.json'), 'w') as f:
    json.dump(list(captions), f)
  num_classes = max(len(class_names), int(np.max(labels)) + 1 if n else 1)
  metadata = {
      'format': FORMAT, 'num_examples': n, 'num_captions': len(captions),
      'sample_shape': [int(d) for d in sample_shape], 'dtype': str(np.dtype(sample_dtype)),
      'encoder': encoder, 'text_width': int(table['text_pooled'].shape[1]),
      'text_tokens': int(table['text_tokens'].shape[1]),
      'class_names': list(class_names), 'num_classes': num_classes,
      'class_sizes': np.bincount(np.asarray(labels, np.int64), minlength=num_classes).tolist(),
      **(extra or {})}
  with open(os.path.join(directory, 'metadata.json'), 'w') as f:
    json.dump(metadata, f, indent=1)


def write_split(root: str, split: str, *, images: np.ndarray, labels: np.ndarray,
                caption_ids: np.ndarray, captions: Sequence[str], table: dict[str, np.ndarray],
                encoder: str, class_names: Sequence[str] = (), extra: dict | None = None) -> str:
  """Writes one split held in memory, atomically (module docstring); returns its directory."""
  if len(images) != len(labels):
    raise ValueError(f'{len(images)} images but {len(labels)} labels.')
  with split_writer(root, split) as tmp:
    np.save(os.path.join(tmp, 'images.npy'), images)
    write_tables(tmp, sample_shape=images.shape[1:], sample_dtype=images.dtype, labels=labels,
                 caption_ids=caption_ids, captions=captions, table=table, encoder=encoder,
                 class_names=class_names, extra=extra)
  return split_directory(root, split)


def check_against_config(metadata: dict, data_config, directory: str) -> None:
  """The split's sample shape, text width and caption length against config.data; raises
  naming the field to change (before anything is compiled)."""
  get = lambda name, default=None: data_config.get(name, default)
  want_shape = [get('image_size'), get('image_size'), get('channels')]
  problems = []
  if None not in want_shape and metadata['sample_shape'] != want_shape:
    problems.append(f'its samples are {tuple(metadata["sample_shape"])}, config.data has '
                    f'image_size={want_shape[0]}, channels={want_shape[2]}')
  if metadata['text_width'] != get('text_width', metadata['text_width']):
    problems.append(f'its encoder ({metadata["encoder"]}) is {metadata["text_width"]} wide, '
                    f'config.data.text_width={get("text_width")}')
  if metadata['num_classes'] > get('num_classes', metadata['num_classes']):
    # Label C is the null condition of CFG: a real label ≥ C would read as a dropped caption.
    problems.append(f'its labels span {metadata["num_classes"]} classes, '
                    f'config.data.num_classes={get("num_classes")}')
  if metadata['text_tokens'] > get('max_tokens', metadata['text_tokens']):
    problems.append(f'its captions have up to {metadata["text_tokens"]} tokens, '
                    f'config.data.max_tokens={get("max_tokens")}')
  if problems:
    raise ValueError(f'the captioned split {directory} does not fit the config: '
                     + '; '.join(problems) + '. Set those config.data fields to match.')


class CaptionedSource:
  """Random access to one written split: `read_batch(ids)` gives the batch fields.

  Picklable (it reopens its memory maps in each Grain worker).
  """

  def __init__(self, directory: str, image_embeddings: str = ''):
    """image_embeddings: an .npy [N, E] of the LiT image tower's embeddings of this split
    (text/lit.py), added to every batch as 'image_embedding'."""
    self.directory = directory
    self.image_embeddings = image_embeddings
    path = os.path.join(directory, 'metadata.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'no captioned split at {directory} (no metadata.json). Build it with '
          '`python -m pafm_jax.tools.pack_captions` (or, for Fashion-MNIST, set '
          f"config.data.name='{FASHION_MNIST_CAPTIONS}', which builds it on first use).")
    with open(path) as f:
      self.metadata = json.load(f)
    if self.metadata.get('format') != FORMAT:
      raise ValueError(f'{directory} is format {self.metadata.get("format")!r}, not {FORMAT}.')
    self._arrays = None

  def __getstate__(self):
    return {'directory': self.directory, 'metadata': self.metadata, '_arrays': None,
            'image_embeddings': self.image_embeddings}

  def arrays(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      self._arrays = {name: np.load(os.path.join(self.directory, f'{name}.npy'), mmap_mode='r')
                      for name in ('images', 'labels', 'caption_ids', 'text_tokens',
                                   'text_mask', 'text_pooled')}
      if self.image_embeddings:
        emb = np.load(self.image_embeddings, mmap_mode='r')
        if emb.shape[0] != len(self):
          raise ValueError(f'{self.image_embeddings} holds {emb.shape[0]} image embeddings '
                           f'but {self.directory} has {len(self)} examples; retrain the LiT '
                           'towers on this dataset (--mode=train_lit).')
        self._arrays['image_embeddings'] = emb
    return self._arrays

  def __len__(self) -> int:
    return int(self.metadata['num_examples'])

  def __getitem__(self, i: int) -> dict[str, Any]:
    a = self.arrays()
    return {'image': np.asarray(a['images'][i]), 'label': int(a['labels'][i]), 'id': int(i),
            'caption_id': int(a['caption_ids'][i])}

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    return [self[int(i)] for i in indices]

  def captions(self) -> list[str]:
    with open(os.path.join(self.directory, 'captions.json')) as f:
      return json.load(f)

  def text_rows(self, rows: np.ndarray, max_tokens: int,
                tokens: bool = True) -> dict[str, np.ndarray]:
    """Rows of the caption table as batch fields, tokens padded to `max_tokens` (tokens=False:
    the sentence vectors alone, for readers that need no token states)."""
    a = self.arrays()
    rows = np.asarray(rows, np.int64)
    if not tokens:
      return {fields.COND_EMBEDDING: np.asarray(a['text_pooled'][rows], np.float32)}
    length = a['text_tokens'].shape[1]
    if length > max_tokens:
      raise ValueError(f'{self.directory} stores captions of up to {length} tokens but '
                       f'config.data.max_tokens={max_tokens}; raise config.data.max_tokens.')
    order = np.argsort(rows, kind='stable')  # sorted reads of the memory map
    tokens = np.zeros((len(rows), max_tokens, a['text_tokens'].shape[2]), np.float32)
    mask = np.zeros((len(rows), max_tokens), np.int32)
    tokens[order, :length] = a['text_tokens'][rows[order]]
    mask[order, :length] = a['text_mask'][rows[order]]
    return {fields.TEXT_TOKENS: tokens, fields.TEXT_MASK: mask,
            fields.COND_EMBEDDING: np.asarray(a['text_pooled'][rows], np.float32)}

  def read_batch(self, indices: np.ndarray, max_tokens: int,
                 tokens: bool = True) -> dict[str, np.ndarray]:
    """ids [n] → image [n, *S] (uint8 or float), label, id and the text fields (without
    token states for tokens=False)."""
    a = self.arrays()
    indices = np.asarray(indices, np.int64)
    order = np.argsort(indices, kind='stable')
    images = np.empty((len(indices),) + a['images'].shape[1:], a['images'].dtype)
    images[order] = a['images'][indices[order]]
    out = {fields.IMAGE: images, fields.LABEL: np.asarray(a['labels'][indices], np.int32),
           fields.ID: indices}
    out.update(self.text_rows(a['caption_ids'][indices], max_tokens, tokens))
    if 'image_embeddings' in a:
      out[fields.IMAGE_EMBEDDING] = np.asarray(a['image_embeddings'][indices], np.float32)
    return out


# --------------------------------------------------------------------------------------------
# Fashion-MNIST with templated captions.


def fashion_mnist_captions_root(tfds_dir: str, seed: int) -> str:
  return os.path.join(os.path.dirname(tfds_dir.rstrip('/')), 'captioned',
                      f'{FASHION_MNIST_CAPTIONS}_seed{seed}')


def build_fashion_mnist_captions(root: str, idx_dir: str, *, seed: int = 0, encoder=None,
                                 splits: Iterable[str] = ('train', 'test')) -> str:
  """Captions every Fashion-MNIST image (captions.caption_for) and writes the splits that are
  missing; idempotent. The encoder (default all-MiniLM-L6-v2) runs once per unique caption."""
  from pafm_jax import text  # pylint: disable=g-import-not-at-top
  from pafm_jax.data import captions as captions_lib  # pylint: disable=g-import-not-at-top
  from pafm_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  for split in splits:
    if is_written(root, split):
      continue
    images, labels = fashion_mnist.read_idx_split(idx_dir, split)
    per_example = [captions_lib.caption_for(int(y), i, seed) for i, y in enumerate(labels)]
    table_text, caption_ids = caption_table(per_example)
    encoder = encoder or text.default_encoder()
    logging.info('captioning Fashion-MNIST %s: %d images, %d distinct captions', split,
                 len(labels), len(table_text) - 1)
    table = encode_table(encoder, table_text)
    write_split(root, split, images=images, labels=labels.astype(np.int64),
                caption_ids=caption_ids,
                captions=table_text, table=table, encoder=encoder_name(encoder),
                class_names=fashion_mnist.CLASS_NAMES, extra={'caption_seed': seed})
  return root


# --------------------------------------------------------------------------------------------
# Captions to sample from.


def text_condition(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Batch text fields → the text network's condition y (models/network.py)."""
  return {'tokens': rows[fields.TEXT_TOKENS], 'mask': rows[fields.TEXT_MASK],
          'pooled': rows[fields.COND_EMBEDDING]}


def captions_for_labels(source: CaptionedSource, labels: np.ndarray, max_tokens: int):
  """Real captions of the split to sample from, one per requested label.

  Request n of class c takes the caption of the n-th example of class c (cycling), so a
  class-balanced request spreads over many captions, deterministically. Returns (y, caption
  strings [N], example ids [N]).
  """
  labels = np.asarray(labels)
  all_labels = np.asarray(source.arrays()['labels'])
  ids = np.zeros(len(labels), np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(all_labels == c)
    if not len(members):
      raise ValueError(f'{source.directory} has no example of class {c} to take a caption from.')
    rows = np.flatnonzero(labels == c)
    ids[rows] = members[np.arange(len(rows)) % len(members)]
  caption_ids = np.asarray(source.arrays()['caption_ids'])[ids]
  table = source.captions()
  return (text_condition(source.text_rows(caption_ids, max_tokens)),
          [table[i] for i in caption_ids], ids)


def typed_captions(encoder, captions: Sequence[str], max_tokens: int) -> dict[str, np.ndarray]:
  """The condition y of captions typed by a user, encoded now."""
  tokens, mask, pooled = encoder.encode(list(captions))
  if tokens.shape[1] > max_tokens:
    raise ValueError(f'a caption has {tokens.shape[1]} tokens, more than the model\'s '
                     f'config.data.max_tokens={max_tokens}; shorten it.')
  padded = np.zeros((len(captions), max_tokens, tokens.shape[2]), np.float32)
  padded[:, :tokens.shape[1]] = tokens * mask[..., None]
  full_mask = np.zeros((len(captions), max_tokens), np.int32)
  full_mask[:, :mask.shape[1]] = mask
  return {'tokens': padded, 'mask': full_mask, 'pooled': np.asarray(pooled, np.float32)}
