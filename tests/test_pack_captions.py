"""The packing command: real images and captions in, the captioned format out, round-trip."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import fmnist_mmdit
from pafm_jax import text
from pafm_jax.data import captioned, captions as captions_lib, fashion_mnist, pipeline
from pafm_jax.tools import pack_captions


def _real_pairs(tmp_path, n=12):
  """n Fashion-MNIST test images written as PNG files, with their templated captions."""
  from PIL import Image
  images, labels = fashion_mnist.read_idx_split(fashion_mnist.DEFAULT_IDX_DIR, 'test')
  folder = tmp_path / 'images'
  folder.mkdir()
  rows = []
  for i in range(n):
    name = f'{i:04d}.png'
    Image.fromarray(images[i, :, :, 0]).save(folder / name)
    rows.append((name, captions_lib.caption_for(int(labels[i]), i), int(labels[i])))
  rows.append(('0000.png', rows[0][1], rows[0][2]))   # a repeated pair shares its caption row
  return folder, rows, images[:n], labels[:n]


def _check_round_trip(directory, rows, images, with_labels=True):
  source = captioned.CaptionedSource(directory)
  assert len(source) == len(rows)
  arrays = source.arrays()
  np.testing.assert_array_equal(arrays['images'][:len(images)], images)
  np.testing.assert_array_equal(arrays['images'][len(images)], images[0])
  table = source.captions()
  assert [table[i] for i in arrays['caption_ids']] == [c for _, c, _ in rows]
  assert source.metadata['num_captions'] == len({c for _, c, _ in rows}) + 1
  expected_labels = [y for _, _, y in rows] if with_labels else [0] * len(rows)
  np.testing.assert_array_equal(arrays['labels'], expected_labels)
  _, _, pooled = text.encode([c for _, c, _ in rows])
  batch = source.read_batch(np.arange(len(rows)), 32)
  np.testing.assert_allclose(batch['cond_embedding'], pooled, atol=1e-5)


def test_pack_jsonl_round_trips_real_images_and_captions(tmp_path):
  folder, rows, images, _ = _real_pairs(tmp_path)
  path = tmp_path / 'captions.jsonl'
  path.write_text(''.join(json.dumps({'file': f, 'caption': c, 'label': y}) + '\n'
                          for f, c, y in rows))
  directory = pack_captions.pack(str(folder), str(path), str(tmp_path / 'out'),
                                 image_size=28, channels=1)
  _check_round_trip(directory, rows, images)
  # A config reads it as a training split, class sizes from its labels.
  config = fmnist_mmdit.get_config()
  config.data.name, config.data.captioned_dir = 'captioned', str(tmp_path / 'out')
  assert len(pipeline.load_source(config.data)) == len(rows)
  assert pipeline.class_sizes(config.data).sum() == len(rows)
  with pytest.raises(FileExistsError):   # an existing split is never overwritten
    pack_captions.pack(str(folder), str(path), str(tmp_path / 'out'), image_size=28,
                       channels=1)


@pytest.mark.slow
def test_pack_tsv_from_the_command_line(tmp_path):
  folder, rows, images, _ = _real_pairs(tmp_path)
  path = tmp_path / 'captions.tsv'
  path.write_text(''.join(f'{f}\t{c}\n' for f, c, _ in rows))
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'pafm_jax.tools.pack_captions', f'--images={folder}',
       f'--captions={path}', f'--out={out}', '--split=test', '--image_size=28', '--channels=1'],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'images 13/13' in result.stderr
  _check_round_trip(str(out / 'test'), rows, images, with_labels=False)


def test_bad_captions_files_fail_before_anything_is_written(tmp_path):
  folder, rows, _, _ = _real_pairs(tmp_path, n=2)
  bad = tmp_path / 'captions.jsonl'
  bad.write_text('{"file": "0000.png"}\n')
  with pytest.raises(ValueError, match=r'captions.jsonl:1'):
    pack_captions.pack(str(folder), str(bad), str(tmp_path / 'out'), image_size=28)
  missing = tmp_path / 'missing.tsv'
  missing.write_text('nope.png\ta bag\n')
  with pytest.raises(FileNotFoundError, match='nope.png'):
    pack_captions.pack(str(folder), str(missing), str(tmp_path / 'out'), image_size=28)
  assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_a_split_that_does_not_fit_the_config_is_refused_by_name(tmp_path):
  folder, rows, _, _ = _real_pairs(tmp_path, n=3)
  path = tmp_path / 'captions.tsv'
  path.write_text(''.join(f'{f}\t{c}\n' for f, c, _ in rows))
  pack_captions.pack(str(folder), str(path), str(tmp_path / 'out'), image_size=28, channels=1)
  config = fmnist_mmdit.get_config()
  config.data.name, config.data.captioned_dir = 'captioned', str(tmp_path / 'out')
  config.data.channels, config.data.max_tokens = 3, 4
  with pytest.raises(ValueError, match=r'channels=3.*max_tokens=4'):
    pipeline.load_source(config.data)
