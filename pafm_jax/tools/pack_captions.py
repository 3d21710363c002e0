"""Packs a folder of images and a captions file into a captioned dataset split.

  python -m pafm_jax.tools.pack_captions --images=my_pairs/images \\
      --captions=my_pairs/captions.jsonl --out=data/my_pairs --split=train --image_size=64

then train with `--config.data.name=captioned --config.data.captioned_dir=data/my_pairs`
(and config.data.image_size / channels to match). The format is data/captioned.py's; the
text encoder (--encoder, default all-MiniLM-L6-v2) runs here, once per distinct caption, so
training never runs it.

Captions file, one pair per line:
  .jsonl  {"file": "0001.jpg", "caption": "a red bicycle", "label": 3}   (label optional)
  .tsv    0001.jpg<TAB>a red bicycle[<TAB>3]                             (no header)
`file` is relative to --images. Images are centre-cropped to a square and resized to
--image_size (bicubic), as grayscale (--channels=1) or RGB (3). A split is written into a
temporary directory and only appears under --out when complete; an existing split is never
overwritten.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from absl import app, flags, logging
import numpy as np

from pafm_jax.data import captioned

LOG_EVERY = 1000


def read_pairs(path: str) -> list[tuple[str, str, int]]:
  """(file, caption, label) of every line of a .jsonl or .tsv captions file (label 0 when
  absent); raises naming the line of a malformed entry."""
  pairs = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip():
        continue
      if path.endswith('.jsonl'):
        try:
          entry = json.loads(line)
          pairs.append((entry['file'], entry['caption'], int(entry.get('label', 0))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
          raise ValueError(f'{path}:{n}: expected {{"file": ..., "caption": ..., "label": int '
                           f'(optional)}}, got {line[:80]!r} ({e}).') from e
      elif path.endswith('.tsv'):
        cols = line.split('\t')
        if len(cols) not in (2, 3) or (len(cols) == 3 and not cols[2].strip().isdigit()):
          raise ValueError(f'{path}:{n}: expected file<TAB>caption[<TAB>label], got '
                           f'{line[:80]!r}.')
        pairs.append((cols[0], cols[1], int(cols[2]) if len(cols) == 3 else 0))
      else:
        raise ValueError(f'{path}: the captions file must end in .jsonl or .tsv.')
  if not pairs:
    raise ValueError(f'{path} holds no (image, caption) pairs.')
  negative = [n for n, (_, _, y) in enumerate(pairs, 1) if y < 0]
  if negative:
    raise ValueError(f'{path}: labels must be ≥ 0 (pair {negative[0]} has '
                     f'{pairs[negative[0] - 1][2]}).')
  return pairs


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """uint8 [image_size, image_size, channels]: centre square crop, bicubic resize."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    im = im.convert('L' if channels == 1 else 'RGB')
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != image_size:
      im = im.resize((image_size, image_size), Image.BICUBIC)
    array = np.asarray(im, np.uint8)
  return array[..., None] if channels == 1 else array


def pack(images_dir: str, captions_path: str, out: str, *, split: str = 'train',
         image_size: int, channels: int = 3, encoder=None, token_dtype: str = 'float32',
         class_names: Sequence[str] = ()) -> str:
  """Writes split `split` of the captioned dataset at `out`; returns its directory."""
  if channels not in (1, 3):
    raise ValueError(f'--channels must be 1 or 3, got {channels}.')
  if captioned.is_written(out, split):
    raise FileExistsError(f'{captioned.split_directory(out, split)} exists; remove it or pick '
                          'another --out or --split.')
  pairs = read_pairs(captions_path)
  missing = [f for f, _, _ in pairs if not os.path.isfile(os.path.join(images_dir, f))]
  if missing:
    raise FileNotFoundError(f'{len(missing)} image(s) of {captions_path} are not under '
                            f'{images_dir}, e.g. {missing[:3]}.')
  if encoder is None:
    from pafm_jax import text  # pylint: disable=g-import-not-at-top
    encoder = text.default_encoder()
  table_text, caption_ids = captioned.caption_table([c for _, c, _ in pairs])
  logging.info('packing %d pairs (%d distinct captions) into %s/%s', len(pairs),
               len(table_text) - 1, out, split)
  table = captioned.encode_table(encoder, table_text, token_dtype=np.dtype(token_dtype))
  with captioned.split_writer(out, split) as tmp:
    images = np.lib.format.open_memmap(os.path.join(tmp, 'images.npy'), mode='w+',
                                       dtype=np.uint8,
                                       shape=(len(pairs), image_size, image_size, channels))
    t0 = time.time()
    for i, (name, _, _) in enumerate(pairs):
      images[i] = load_image(os.path.join(images_dir, name), image_size, channels)
      if (i + 1) % LOG_EVERY == 0 or i + 1 == len(pairs):
        rate = (i + 1) / max(time.time() - t0, 1e-9)
        logging.info('images %d/%d (%.0f images/s, ETA %.0f s)', i + 1, len(pairs), rate,
                     (len(pairs) - i - 1) / rate)
    images.flush()
    del images
    captioned.write_tables(
        tmp, sample_shape=(image_size, image_size, channels), sample_dtype=np.uint8,
        labels=np.asarray([y for _, _, y in pairs], np.int64),
        caption_ids=caption_ids,
        captions=table_text, table=table, encoder=captioned.encoder_name(encoder),
        class_names=class_names, extra={'source': os.path.abspath(captions_path)})
  return captioned.split_directory(out, split)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no global flags."""
  flags.DEFINE_string('images', None, 'Folder the captions file names its images in.')
  flags.DEFINE_string('captions', None, 'Captions file: .jsonl or .tsv (module docstring).')
  flags.DEFINE_string('out', None, 'Dataset directory (config.data.captioned_dir).')
  flags.DEFINE_string('split', 'train', 'Split to write (train, test, ...).')
  flags.DEFINE_integer('image_size', None, 'Side of the square images (config.data.image_size).')
  flags.DEFINE_integer('channels', 3, '1 (grayscale) or 3 (RGB).')
  flags.DEFINE_string('encoder', '', "Text encoder directory; '' = all-MiniLM-L6-v2.")
  flags.DEFINE_enum('token_dtype', 'float32', ['float32', 'float16'],
                    'Storage of the token states (float16 halves the table).')
  flags.DEFINE_list('class_names', [], 'Names of the labels 0, 1, ... (optional).')
  flags.mark_flags_as_required(['images', 'captions', 'out', 'image_size'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from pafm_jax import logs, text  # pylint: disable=g-import-not-at-top
  logs.quiet_library_info()
  encoder = text.load_encoder(FLAGS.encoder or None)
  directory = pack(FLAGS.images, FLAGS.captions, FLAGS.out, split=FLAGS.split,
                   image_size=FLAGS.image_size, channels=FLAGS.channels, encoder=encoder,
                   token_dtype=FLAGS.token_dtype, class_names=FLAGS.class_names)
  print(f'wrote {directory}', flush=True)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
