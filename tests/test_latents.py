"""The latent dataset format and the tool that writes it, on real images through a real VAE.

Truths: the tiny diffusers VAE fixture run directly on images preprocessed here with PIL
(closed forms of ADM's crop for these sizes), Fashion-MNIST's IDX bytes, the format's shard
formula computed here, and an uninterrupted one-process run for the byte-identity checks of
resumed and split runs.
"""

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from configs import fmnist_sit
from pafm_jax.data import fashion_mnist, latents, pipeline
from pafm_jax.tools import encode_latents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_DIR = os.path.join(REPO, 'tests', 'fixtures', 'vae_tiny')
# Created in this order; labels follow the sorted names: bag 0, sneaker 1, trouser 2.
CLASSES = ('sneaker', 'bag', 'trouser')
PER_CLASS = 8
IMAGE_SIZE = 16
NUM_SHARDS = 5
BATCH = 8
# XLA's float32 convolutions differ in the last bits with the batch size, and the tiny VAE's
# narrow GroupNorms amplify that to ~2e-5; a wrong image, flip or crop moves moments by ~1e-1.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
FOLDER_FLAGS = dict(image_size=IMAGE_SIZE, flip=True, store_pixels=True, num_shards=NUM_SHARDS,
                    batch_size=BATCH)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """3 classes × 8 Fashion-MNIST test images as files: 32×32 grayscale PNGs, some 36×32 RGB
  PNGs (non-square) and one CMYK JPEG (converted to RGB by the tool)."""
  images, _ = fashion_mnist.read_idx_split(fashion_mnist.DEFAULT_IDX_DIR, 'test')
  root = tmp_path_factory.mktemp('images')
  n = 0
  for name in CLASSES:
    (root / name).mkdir()
    for k in range(PER_CLASS):
      im = Image.fromarray(images[n, :, :, 0]).resize((32, 32), Image.BILINEAR)
      if k % 3 == 1:   # wider than tall, with a coloured border on the right
        wide = Image.new('RGB', (36, 32), (200, 30, 90))
        wide.paste(im.convert('RGB'), (0, 0))
        wide.save(root / name / f'{k:03d}.png')
      elif k == 5:
        im.convert('CMYK').save(root / name / f'{k:03d}.jpg', quality=95)
      else:
        im.save(root / name / f'{k:03d}.png')
      n += 1
  (root / 'bag' / 'notes.txt').write_text('not an image')   # ignored
  return str(root)


def _expected_pixels(path: str) -> np.ndarray:
  """ADM's crop to 16 of a 32-tall image, in closed form: one box halving (32 ≥ 2·16) leaves
  the smaller side at 16 (no bicubic step), then the centre 16 columns."""
  with Image.open(path) as im:
    im = im.convert('RGB')
    w, h = im.size
    assert h == 32 and w in (32, 36)
    half = np.asarray(im.resize((w // 2, h // 2), Image.BOX))
  left = (w // 2 - IMAGE_SIZE) // 2
  return half[:, left:left + IMAGE_SIZE]


def _files_in_label_order(folder):
  out = []
  for label, name in enumerate(sorted(CLASSES)):
    for f in sorted(os.listdir(os.path.join(folder, name))):
      if f.endswith(('.png', '.jpg')):
        out.append((os.path.join(folder, name, f), label))
  return out


def _tree(root) -> dict[str, bytes]:
  """Every file under root: relative path → bytes."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out


@pytest.fixture(scope='module')
def vae():
  from pafm_jax.models import vae as vae_lib
  return vae_lib.load_vae(VAE_DIR)


@pytest.fixture(scope='module')
def reference(folder, tmp_path_factory):
  """An uninterrupted one-process run over the folder."""
  root = str(tmp_path_factory.mktemp('reference') / 'latents')
  assert encode_latents.encode(root, VAE_DIR, image_folders={'train': folder}, **FOLDER_FLAGS)
  return root


def test_records_are_the_encoders_moments_of_the_preprocessed_images(reference, folder, vae):
  files = _files_in_label_order(folder)
  pixels = np.stack([_expected_pixels(f) for f, _ in files])
  labels = np.asarray([y for _, y in files])
  x = pixels.astype(np.float32) / 127.5 - 1.0
  mean, logvar = (np.asarray(a) for a in vae.encode(x))
  flip_mean, flip_logvar = (np.asarray(a) for a in vae.encode(x[:, :, ::-1]))

  source = latents.LatentSource(reference, 'train')
  assert len(source) == 2 * len(files) == 48
  batch = source.read_batch(np.arange(len(source)))
  assert batch['mean'].shape == (48, 4, 4, 4) and batch['mean'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and batch['pixels'].dtype == np.uint8
  tol = TOLERANCE
  assert np.abs(flip_mean - mean).max() > 100 * tol['atol']   # the flip check can tell
  np.testing.assert_allclose(batch['mean'][0::2], mean, **tol)
  np.testing.assert_allclose(batch['std'][0::2], np.exp(logvar / 2), **tol)
  np.testing.assert_allclose(batch['mean'][1::2], flip_mean, **tol)
  np.testing.assert_allclose(batch['std'][1::2], np.exp(flip_logvar / 2), **tol)
  np.testing.assert_array_equal(batch['label'], np.repeat(labels, 2))
  np.testing.assert_array_equal(batch['pixels'][0::2], pixels)
  np.testing.assert_array_equal(batch['pixels'][1::2], pixels[:, :, ::-1])
  # The single and list readers agree with the batch reader, also after pickling (Grain).
  for reader in (source, pickle.loads(pickle.dumps(source))):
    item = reader[17]
    assert item['label'] == labels[8] and isinstance(item['label'], int)
    np.testing.assert_array_equal(item['mean'], batch['mean'][17])
    items = reader.__getitems__([40, 3])
    np.testing.assert_array_equal(items[0]['pixels'], batch['pixels'][40])
    np.testing.assert_array_equal(items[1]['std'], batch['std'][3])
  np.testing.assert_array_equal(source.read_batch(np.array([5, 2]))['mean'], batch['mean'][[5, 2]])


def test_metadata_and_shards_follow_the_format(reference):
  meta = latents.read_json(os.path.join(reference, 'latents.json'))
  with open(os.path.join(VAE_DIR, 'diffusion_pytorch_model.safetensors'), 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert meta['encoder']['kind'] == 'sd-vae' and meta['encoder']['fingerprint'] == digest
  assert meta['encoder']['path'] == VAE_DIR
  assert meta['latent_shape'] == [4, 4, 4] and meta['pixel_shape'] == [16, 16, 3]
  assert meta['record_fields'] == [['mean', 'float32', [4, 4, 4]], ['std', 'float32', [4, 4, 4]],
                                   ['label', 'int32', []], ['pixels', 'uint8', [16, 16, 3]]]
  assert meta['class_names'] == sorted(CLASSES) and meta['num_classes'] == 3
  assert meta['scaling_factor'] == 0.18215 and meta['flips'] and meta['image_size'] == 16
  assert latents.is_complete(reference)
  np.testing.assert_array_equal(latents.class_sizes(reference, 'train'), [16, 16, 16])
  # Source example i is in shard ⌊i·S/N⌋, each followed by its flipped copy.
  n = len(CLASSES) * PER_CLASS
  per_shard = np.bincount([i * NUM_SHARDS // n for i in range(n)], minlength=NUM_SHARDS)
  firsts = 2 * np.concatenate([[0], np.cumsum(per_shard)[:-1]])
  names = []
  for s in range(NUM_SHARDS):
    name = f'shard-{s:05d}-of-{NUM_SHARDS:05d}'
    summary = latents.read_json(os.path.join(reference, 'train', name + '.json'))
    assert (summary['shard'], summary['num_shards'], summary['first'], summary['count']) == (
        s, NUM_SHARDS, firsts[s], 2 * per_shard[s])
    names.append(name + '.array_record')
  split = meta['splits']['train']
  assert split == latents.read_json(os.path.join(reference, 'train', 'split.json'))
  assert split['shards'] == names and split['num_examples'] == 48
  # One record is the fields' bytes back to back: 2·64·4 + 4 + 768 bytes.
  assert latents.record_dtype(meta['record_fields']).itemsize == 2 * 64 * 4 + 4 + 16 * 16 * 3


def test_adm_center_crop_against_closed_forms():
  # 4×4 blocks whose colour names the block: two box halvings (96 ≥ 48, then 48 ≥ 48) leave
  # one pixel per block, the smaller side is then 24 (no bicubic), and the crop takes the
  # centre 24 of the 32 columns: out[y, x] = block (y, x + 4).
  by, bx = np.mgrid[0:24, 0:32]
  blocks = np.stack([bx * 8, by * 8, np.full_like(bx, 77)], -1).astype(np.uint8)
  image = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)            # 96 tall, 128 wide
  out = encode_latents.center_crop(Image.fromarray(image), 24)
  y, x = np.mgrid[0:24, 0:24]
  np.testing.assert_array_equal(out, np.stack([(x + 4) * 8, y * 8, np.full_like(x, 77)], -1))
  # Taller than wide: the window moves down instead.
  out = encode_latents.center_crop(Image.fromarray(np.ascontiguousarray(
      image.transpose(1, 0, 2))), 24)
  np.testing.assert_array_equal(out[..., 0], (y + 4) * 8)
  np.testing.assert_array_equal(out[..., 1], x * 8)
  # Upsampling (bicubic): 10 wide × 20 tall → 16 × 32, centre rows 8..23; the image's red
  # top half and blue bottom half meet at row 16 of the resized image, row 8 of the crop.
  halves = np.zeros((20, 10, 3), np.uint8)
  halves[:10, :, 0] = 255
  halves[10:, :, 2] = 255
  out = encode_latents.center_crop(Image.fromarray(halves), 16).astype(int)
  assert out.shape == (16, 16, 3)
  assert (np.abs(out[:6] - [255, 0, 0]) <= 2).all()
  assert (np.abs(out[10:] - [0, 0, 255]) <= 2).all()
  # Grayscale keeps one channel; a constant image stays constant through both filters.
  out = encode_latents.center_crop(Image.new('L', (70, 45), 123), 20)
  assert out.shape == (20, 20, 1) and (out == 123).all()


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(reference, folder, tmp_path):
  out = str(tmp_path / 'latents')
  command = [sys.executable, '-m', 'pafm_jax.tools.encode_latents', f'--encoder={VAE_DIR}',
             f'--image_folder={folder}', f'--image_size={IMAGE_SIZE}', '--flip',
             '--store_pixels', f'--num_shards={NUM_SHARDS}', f'--batch_size={BATCH}',
             f'--out={out}', '--pause_after_batch_s=0.4']
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
  finished = lambda: [s for s in range(NUM_SHARDS)
                      if latents.is_shard_finished(out, 'train', s, NUM_SHARDS)]
  deadline = time.time() + 120
  while not finished() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  log = process.communicate()[0].decode()
  done = finished()
  assert 1 <= len(done) < NUM_SHARDS, (done, log[-3000:])
  assert not os.path.exists(os.path.join(out, 'latents.json'))
  with pytest.raises(FileNotFoundError, match='latents.json.*encode_latents'):
    latents.LatentSource(out, 'train')
  # What else a kill can leave: a stale .tmp, and a renamed file whose .json was not written.
  todo = [s for s in range(NUM_SHARDS) if s not in done]
  records, _ = latents.shard_paths(out, 'train', todo[-1], NUM_SHARDS)
  with open(records + '.tmp', 'wb') as f:
    f.write(b'partial records of a killed run')
  if len(todo) > 1:
    with open(latents.shard_paths(out, 'train', todo[-2], NUM_SHARDS)[0], 'wb') as f:
      f.write(b'renamed, summary never written')
  kept = {s: os.stat(latents.shard_paths(out, 'train', s, NUM_SHARDS)[0]).st_mtime_ns
          for s in done}
  assert encode_latents.encode(out, VAE_DIR, image_folders={'train': folder}, **FOLDER_FLAGS)
  assert {s: os.stat(latents.shard_paths(out, 'train', s, NUM_SHARDS)[0]).st_mtime_ns
          for s in done} == kept       # finished shards were skipped, not rewritten
  tree, want = _tree(out), _tree(reference)
  assert sorted(tree) == sorted(want)
  assert not [p for p in tree if p.endswith('.tmp')]
  assert [p for p in want if tree[p] != want[p]] == []


def test_two_processes_write_disjoint_shards_whose_union_is_the_whole(reference, folder,
                                                                     tmp_path):
  out = str(tmp_path / 'latents')
  kwargs = dict(image_folders={'train': folder}, **FOLDER_FLAGS)
  assert not encode_latents.encode(out, VAE_DIR, num_processes=2, process_id=0, **kwargs)
  first = _tree(out)
  shards = sorted(p for p in first if p.endswith('.array_record'))
  assert shards == [f'train/shard-{s:05d}-of-{NUM_SHARDS:05d}.array_record' for s in (0, 2, 4)]
  assert 'latents.json' not in first and 'train/split.json' not in first
  assert not latents.is_complete(out) and not encode_latents.finalize(out)
  assert encode_latents.encode(out, VAE_DIR, num_processes=2, process_id=1, **kwargs)
  tree, want = _tree(out), _tree(reference)
  assert sorted(tree) == sorted(want)
  assert [p for p in want if tree[p] != want[p]] == []
  assert all(tree[p] == first[p] for p in first)    # process 1 left process 0's files alone
  assert encode_latents.finalize(out) and _tree(out) == want


def test_config_source_subset_of_fashion_mnist(fmnist_tfds_dir, vae, tmp_path):
  config = fmnist_sit.get_config()
  config.data.tfds_dir = fmnist_tfds_dir
  config.data.split = 'test'
  config.data.subset_per_class = 2
  out = str(tmp_path / 'latents')
  assert encode_latents.encode(out, VAE_DIR, data_config=config.data, splits=['test'],
                               store_pixels=True, batch_size=BATCH)
  raw, raw_labels = fashion_mnist.read_idx_split(fashion_mnist.DEFAULT_IDX_DIR, 'test')
  positions = pipeline.subset_positions(raw_labels, 2, 0, 10)
  images, labels = pipeline.load_arrays(config.data, 'test')   # [-1, 1] as training reads them
  np.testing.assert_array_equal(labels, raw_labels[positions])
  x = np.repeat(images, 3, axis=-1)
  mean, logvar = (np.asarray(a) for a in vae.encode(x))
  source = latents.LatentSource(out, 'test')
  batch = source.read_batch(np.arange(len(source)))
  assert len(source) == 20 and batch['mean'].shape == (20, 7, 7, 4)
  np.testing.assert_allclose(batch['mean'], mean, **TOLERANCE)
  np.testing.assert_allclose(batch['std'], np.exp(logvar / 2), **TOLERANCE)
  np.testing.assert_array_equal(batch['label'], raw_labels[positions])
  np.testing.assert_array_equal(batch['pixels'], raw[positions])   # the source's 1 channel
  assert source.metadata['class_names'] == list(fashion_mnist.CLASS_NAMES)
  assert source.metadata['pixel_shape'] == [28, 28, 1] and not source.metadata['flips']
  np.testing.assert_array_equal(latents.class_sizes(out, 'test'), [2] * 10)
  with pytest.raises(FileNotFoundError, match="no split 'train'"):
    latents.LatentSource(out, 'train')
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    encode_latents.encode(str(tmp_path / 'other'), VAE_DIR, data_config=config.data,
                          splits=['validation'])


def test_bad_inputs_are_refused_before_any_encoding(reference, folder, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  no_images = tmp_path / 'no_images'
  (no_images / 'cat').mkdir(parents=True)
  (no_images / 'cat' / 'readme.txt').write_text('x')
  not_an_encoder = tmp_path / 'not_an_encoder'
  not_an_encoder.mkdir()
  out = str(tmp_path / 'out')
  cases = [
      (dict(image_folders={'train': str(tmp_path / 'missing')}), FileNotFoundError,
       'does not exist'),
      (dict(image_folders={'train': str(empty)}), ValueError, 'no class sub-folders'),
      (dict(image_folders={'train': str(no_images)}), ValueError, 'cat holds no images'),
      (dict(image_folders={'train': folder}, splits=['val']), ValueError,
       r"unknown split\(s\) \['val'\]"),
      (dict(image_folders={'train': folder}, batch_size=7, flip=True), ValueError,
       'even with --flip'),
  ]
  for kwargs, error, message in cases:
    with pytest.raises(error, match=message):
      encode_latents.encode(out, VAE_DIR, **kwargs)
    assert not os.path.exists(out)
  with pytest.raises(ValueError, match='neither a diffusers AutoencoderKL directory'):
    encode_latents.encode(out, str(not_an_encoder), image_folders={'train': folder})
  assert not os.path.exists(out)
  # An --out written with other settings is refused, naming what differs, and left alone.
  before = _tree(reference)
  with pytest.raises(ValueError, match='other settings.*metadata.image_size: was 16, now 32'):
    encode_latents.encode(reference, VAE_DIR, image_folders={'train': folder},
                          **{**FOLDER_FLAGS, 'image_size': 32})
  assert _tree(reference) == before
