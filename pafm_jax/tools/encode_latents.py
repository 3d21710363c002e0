"""Encodes a dataset into a latent dataset (data/latents.py): the encoder's moments per image.

ImageNet-256 through SD's VAE on one TPU host (the VAE directory holds config.json and
diffusion_pytorch_model.safetensors, e.g. stabilityai/sd-vae-ft-ema downloaded beforehand):

  python -m pafm_jax.tools.encode_latents --encoder=/models/sd-vae-ft-ema \\
      --image_folder=train=/data/imagenet/train,val=/data/imagenet/val --splits=train,val \\
      --image_size=256 --flip --store_pixels --num_shards=1024 --out=/data/imagenet256_latents

Several hosts split the shards: pass --distributed (a TPU pod finds its peers) or
--num_processes=P --process_id=p on each; process p writes the shards s with s % P == p.

Fashion-MNIST through the small autoencoder (models/autoencoder.py, a directory holding
autoencoder.json, written by --mode=train_autoencoder):

  python -m pafm_jax.tools.encode_latents --encoder=runs/fmnist_autoencoder \\
      --config=configs/fmnist_sit.py --splits=train,test --store_pixels --out=runs/fmnist_latents

Then train on the result with `--config.data.name=latents --config.data.latents_dir=<out>`
(and config.data.image_size / channels / num_classes set to the latents' shape, as
configs/fmnist_latent_sit.py and configs/imagenet_latents.py do).

Inputs:
  --image_folder  ImageNet layout: one sub-folder per class (classes = sorted folder names,
                  files sorted; .jpg/.jpeg/.png/.webp, any PIL mode converted to RGB, or to L
                  for a 1-channel encoder); `split=dir,split=dir` or one folder for 'train'.
                  Preprocessing is ADM's centre crop (`center_crop`) to --image_size.
  --config        a pafm_jax config whose config.data the training pipeline reads
                  (data/pipeline.py load_source: Fashion-MNIST, any prepared TFDS dataset;
                  --config.data.subset_per_class applies to config.data.split). Images keep
                  their size, in [-1, 1] as the pipeline's batch reader gives them; a
                  1-channel source is repeated to 3 channels for a 3-channel encoder.
  --encoder       a diffusers AutoencoderKL directory (models/vae.py) or an autoencoder
                  directory (autoencoder.json, models/autoencoder.py).

Output (format in data/latents.py): per record the posterior mean and std = exp(logvar / 2),
both unscaled, the label and with --store_pixels the uint8 preprocessed image (of the source's
channels). --flip follows every image by its horizontally flipped copy (2N records; with
--store_pixels ImageNet-256 then takes about 2 × 1.28 M × 197 KB before compression).
--num_shards defaults to about 1000 records a shard (at most one per image).

A run is resumable: finished shards (those with their .json) are skipped, unfinished ones are
redone from their first record, and the batches of a shard start at its first record, so a
killed and restarted run writes the same bytes as an uninterrupted one (same device count and
--batch_size). <out>/encode_settings.json, written first, records the settings; a rerun with
other settings is refused. split.json and latents.json are written by whichever process finds
every shard finished; `--finalize` only does that.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Sequence

from absl import app, flags, logging
import numpy as np

from pafm_jax.data import latents
from pafm_jax.retrieval import index as index_lib

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
LOG_SECONDS = 5.0
VAE_WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
AUTOENCODER_INFO = 'autoencoder.json'    # models/autoencoder.py's INFO_FILE


# ------------------------------------------------------------------- preprocessing


def center_crop(image, image_size: int) -> np.ndarray:
  """ADM's centre crop (Dhariwal & Nichol 2021): uint8 [image_size, image_size, C].

  While the smaller side is at least 2·image_size the image is halved with a box filter
  (cheap and alias-free), then resized with bicubic so the smaller side is image_size, and
  the centre image_size × image_size window is cut out (offsets rounded down).

  Args:
    image: a PIL image, already in the wanted mode (RGB or L).
    image_size: side of the output.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  while min(image.size) >= 2 * image_size:
    image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
  scale = image_size / min(image.size)
  size = tuple(round(side * scale) for side in image.size)
  if size != image.size:
    image = image.resize(size, resample=Image.BICUBIC)
  array = np.asarray(image, np.uint8)
  top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
  array = array[top:top + image_size, left:left + image_size]
  return array[..., None] if array.ndim == 2 else array


def load_image(path: str, image_size: int, channels: int) -> np.ndarray:
  """uint8 [image_size, image_size, channels] of an image file (RGB, or L for 1 channel)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    return center_crop(image.convert('L' if channels == 1 else 'RGB'), image_size)


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 → float32 in [−1, 1], the formula of the training pipeline's batch reader."""
  return pixels.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)


def to_pixels(images: np.ndarray) -> np.ndarray:
  """float [−1, 1] → uint8 (the inverse of to_unit_range, rounded)."""
  return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------- inputs


def parse_image_folders(spec: str) -> dict[str, str]:
  """'train=/a,val=/b' → {'train': '/a', 'val': '/b'}; '/a' → {'train': '/a'}."""
  parts = [p for p in spec.split(',') if p.strip()]
  if len(parts) == 1 and '=' not in parts[0]:
    return {'train': parts[0]}
  folders = {}
  for part in parts:
    split, sep, path = part.partition('=')
    if not sep or not split or not path:
      raise ValueError(f'--image_folder: expected split=folder[,split=folder...] or one folder, '
                       f'got {spec!r}.')
    folders[split.strip()] = path.strip()
  return folders


def scan_image_folder(folder: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(class names, [(file, label)]) of an ImageNet-layout folder; raises on a missing or empty
  folder or a class folder without images."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'--image_folder {folder} does not exist; give a folder with one '
                            'sub-folder of images per class (the ImageNet layout).')
  classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and
                   not e.name.startswith('.'))
  if not classes:
    raise ValueError(f'--image_folder {folder} has no class sub-folders; put the images of '
                     'each class in a sub-folder of their own (the ImageNet layout).')
  files = []
  for label, name in enumerate(classes):
    entries = sorted(e.name for e in os.scandir(os.path.join(folder, name)) if e.is_file())
    images = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
      raise ValueError(f'class folder {os.path.join(folder, name)} holds no images '
                       f'({"/".join(IMAGE_EXTENSIONS)}); add some or remove the folder.')
    if len(images) < len(entries):
      logging.warning('%s: ignoring %d files that are not %s images', name,
                      len(entries) - len(images), '/'.join(IMAGE_EXTENSIONS))
    files += [(os.path.join(folder, name, f), label) for f in images]
  return classes, files


class FolderSplit:
  """One split read from an image folder: ADM centre crop, uint8 pixels."""

  def __init__(self, folder: str, image_size: int, channels: int):
    self.classes, self.files = scan_image_folder(folder)
    self.folder, self.image_size, self.channels = os.path.abspath(folder), image_size, channels
    self.pixel_shape = (image_size, image_size, channels)
    self.num_classes = len(self.classes)
    listing = '\n'.join(os.path.relpath(f, self.folder) for f, _ in self.files)
    self.description = {'kind': 'image_folder', 'path': self.folder,
                        'num_images': len(self.files), 'num_classes': len(self.classes),
                        'files_sha256': hashlib.sha256(listing.encode()).hexdigest()}

  def __len__(self) -> int:
    return len(self.files)

  def read(self, indices: Sequence[int], pool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(encoder input float32 [n, S, S, C] in [−1, 1], pixels uint8 [n, S, S, C], labels
    int32 [n])."""
    load = lambda i: load_image(self.files[i][0], self.image_size, self.channels)
    pixels = np.stack(list(pool.map(load, indices)))
    labels = np.asarray([self.files[i][1] for i in indices], np.int32)
    return to_unit_range(pixels), pixels, labels


class ConfigSplit:
  """One split of the dataset config.data names, read by the training pipeline's reader."""

  def __init__(self, data_config, split: str):
    from pafm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    name = data_config.get('name')
    if name == pipeline.LATENTS:
      raise ValueError('--config reads a latent dataset already (config.data.name=latents); '
                       'point it at the images behind the latents.')
    try:
      self.source = pipeline.load_source(data_config, split)
    except (ValueError, KeyError) as e:
      raise ValueError(f'unknown split {split!r} of config.data.name={name!r} ({e}); pick '
                       'another with --splits.') from e
    shape = pipeline.sample_shape(data_config)
    self.reader = pipeline.batch_reader(self.source, shape)
    self.pixel_shape = tuple(shape)
    self.num_classes = int(data_config.get('num_classes'))
    self.classes = _config_class_names(data_config, self.source, self.num_classes)
    # load_source takes the subset of config.data.split alone; other splits are whole.
    per_class = (int(data_config.get('subset_per_class', 0) or 0)
                 if split == data_config.get('split', 'train') else 0)
    self.description = {'kind': 'config', 'name': name, 'split': split,
                        'subset_per_class': per_class,
                        'subset_seed': int(data_config.get('subset_seed', 0)) if per_class else 0,
                        'num_images': len(self.source), 'image_shape': list(shape)}

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: Sequence[int], pool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As FolderSplit.read; the images as the pipeline gives them (pixels rounded from them)."""
    del pool
    batch = self.reader(np.asarray(indices, np.int64))
    images = np.asarray(batch['image'], np.float32)
    return images, to_pixels(images), np.asarray(batch['label'], np.int32)


def _config_class_names(data_config, source, num_classes: int) -> list[str] | None:
  """The label names of a config's dataset where it has them (TFDS ClassLabel), else None."""
  from pafm_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  if data_config.get('name') == 'fashion_mnist':
    names = list(fashion_mnist.CLASS_NAMES)
  else:
    try:
      names = list(getattr(source, 'source', source).dataset_info.features['label'].names)
    except (AttributeError, KeyError, TypeError):
      return None
  return names if len(names) == num_classes else None


# ------------------------------------------------------------------- the encoder


def describe_encoder(path: str) -> dict[str, Any]:
  """What the dataset records of the encoder at `path`, read without loading its weights:
  kind, path, fingerprint, in_channels, latent_channels, downsample_factor, scaling_factor."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(os.path.join(path, AUTOENCODER_INFO)):
    autoencoder = _autoencoder_module(path)
    info = latents.read_json(os.path.join(path, AUTOENCODER_INFO))
    arch = info['architecture']
    return {'kind': 'autoencoder', 'path': path, 'fingerprint': info['fingerprint'],
            'in_channels': int(arch['channels']), 'latent_channels': int(arch['latent_channels']),
            'downsample_factor': autoencoder.downsample_factor(arch),
            'scaling_factor': float(info['scaling_factor']), 'shift_factor': 0.0}
  weights = [os.path.join(path, w) for w in VAE_WEIGHTS if os.path.isfile(os.path.join(path, w))]
  if os.path.isfile(os.path.join(path, 'config.json')) and weights:
    from pafm_jax.models import vae  # pylint: disable=g-import-not-at-top
    shape = vae.read_shape(path)
    return {'kind': 'sd-vae', 'path': path, 'fingerprint': index_lib.sha256_file(weights[0]),
            'config_sha256': index_lib.sha256_file(os.path.join(path, 'config.json')),
            'in_channels': shape.in_channels, 'latent_channels': shape.latent_channels,
            'downsample_factor': shape.downsample_factor,
            'scaling_factor': shape.scaling_factor, 'shift_factor': shape.shift_factor}
  raise ValueError(
      f'--encoder={path} is neither a diffusers AutoencoderKL directory (config.json and '
      f'{VAE_WEIGHTS[0]}, e.g. stabilityai/sd-vae-ft-ema downloaded beforehand) nor an '
      f'autoencoder directory ({AUTOENCODER_INFO}, written by python -m pafm_jax.main '
      '--mode=train_autoencoder).')


def load_encoder(description: dict[str, Any]):
  """The encoder, its batches split over this process's devices only (hosts work apart)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.local_devices()), ('batch',))
  if description['kind'] == 'sd-vae':
    from pafm_jax.models import vae  # pylint: disable=g-import-not-at-top
    return vae.load_vae(description['path'], mesh=mesh)
  return _autoencoder_module(description['path']).load(description['path'], mesh=mesh)


def _autoencoder_module(path: str):
  try:
    from pafm_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f'--encoder={path} is an autoencoder directory ({AUTOENCODER_INFO}), but '
                     f'pafm_jax.models.autoencoder cannot be imported ({e}).') from e
  return autoencoder


# ------------------------------------------------------------------- settings


@dataclasses.dataclass
class Plan:
  """Everything a run needs, checked before any encoding."""
  root: str
  inputs: dict[str, Any]             # split → FolderSplit | ConfigSplit
  settings: dict[str, Any]           # encode_settings.json
  encoder: dict[str, Any]            # describe_encoder
  repeat_channels: bool              # a 1-channel source for a 3-channel encoder
  batch_size: int
  flip: bool
  store_pixels: bool

  @property
  def dtype(self) -> np.dtype:
    return latents.record_dtype(self.settings['metadata']['record_fields'])


def make_settings(inputs: dict[str, Any], encoder: dict[str, Any], *, image_size: int,
                  flip: bool, store_pixels: bool, num_shards: int, batch_size: int,
                  source_kind: str) -> tuple[dict[str, Any], bool]:
  """(encode_settings.json content, whether to repeat 1 channel to 3); raises when the
  images do not fit the encoder."""
  first = next(iter(inputs.values()))
  h, w, c = first.pixel_shape
  f, want = encoder['downsample_factor'], encoder['in_channels']
  if c != want and not (c == 1 and want == 3):
    raise ValueError(f'the images have {c} channels but the encoder takes {want}.')
  if h % f or w % f:
    raise ValueError(f'the images are {h}×{w}, not divisible by the encoder\'s downsampling '
                     f'factor {f}; pick an --image_size that is.')
  classes = [tuple(s.classes) if s.classes is not None else None for s in inputs.values()]
  if len(set(classes)) > 1:
    raise ValueError(f'the splits have different classes ({", ".join(inputs)}); the labels '
                     'would not agree between them.')
  latent_shape = [h // f, w // f, encoder['latent_channels']]
  pixel_shape = list(first.pixel_shape) if store_pixels else None
  recorded = {k: v for k, v in encoder.items() if k in ('kind', 'path', 'fingerprint',
                                                         'config_sha256', 'shift_factor')}
  metadata = {
      'format_version': latents.FORMAT_VERSION, 'latent_shape': latent_shape,
      'pixel_shape': pixel_shape,
      'record_fields': latents.record_fields(latent_shape, pixel_shape),
      'scaling_factor': encoder['scaling_factor'], 'num_classes': first.num_classes,
      'class_names': list(first.classes) if first.classes is not None else None,
      'image_size': int(h), 'flips': bool(flip),
      'source': {'kind': source_kind,
                 'splits': {name: s.description for name, s in inputs.items()}},
      'encoder': recorded}
  splits = {}
  for name, s in inputs.items():
    if num_shards > len(s):
      raise ValueError(f'--num_shards={num_shards} but split {name!r} has only {len(s)} images; '
                       'use at most one shard per image.')
    splits[name] = {'num_source_examples': len(s),
                    'num_shards': num_shards or latents.default_num_shards(len(s), flip)}
  settings = {'metadata': metadata, 'splits': splits, 'batch_size': int(batch_size),
              'store_pixels': bool(store_pixels)}
  return json.loads(json.dumps(settings)), c == 1 and want == 3


def check_or_write_settings(root: str, settings: dict[str, Any]) -> None:
  """Refuses an --out written with other settings; writes encode_settings.json first."""
  path = os.path.join(root, latents.SETTINGS_FILE)
  if os.path.isfile(path):
    old = latents.read_json(path)
    if old != settings:
      diff = sorted(_differences(old, settings))
      raise ValueError(
          f'--out={root} holds a latent dataset written with other settings ({"; ".join(diff[:6])}'
          f'{" …" if len(diff) > 6 else ""}). Rerun with the flags it was written with to resume '
          'it, or pick a new --out.')
    return
  if os.path.exists(os.path.join(root, latents.METADATA_FILE)):
    raise ValueError(f'--out={root} holds a latent dataset without {latents.SETTINGS_FILE}; '
                     'pick a new --out.')
  os.makedirs(root, exist_ok=True)
  latents.write_json(path, settings)


def _differences(old: Any, new: Any, prefix: str = '') -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += _differences(old.get(key), new.get(key), f'{prefix}{key}.')
    return out
  if old == new:
    return []
  show = lambda v: (json.dumps(v) if len(json.dumps(v)) < 60 else json.dumps(v)[:57] + '...')
  return [f'{prefix.rstrip(".")}: was {show(old)}, now {show(new)}']


def plan(out: str, encoder: str, *, image_folders: dict[str, str] | None = None,
         data_config=None, splits: Sequence[str] | None = None, image_size: int = 256,
         flip: bool = False, store_pixels: bool = False, num_shards: int = 0,
         batch_size: int = 64) -> Plan:
  """Checks every input and writes (or checks) encode_settings.json; encodes nothing."""
  if (image_folders is None) == (data_config is None):
    raise ValueError('give exactly one of --image_folder and --config.')
  if batch_size < 1 or (flip and batch_size % 2):
    raise ValueError(f'--batch_size={batch_size}: must be ≥ 1, and even with --flip (an image '
                     'and its flipped copy share a batch).')
  if num_shards < 0 or image_size < 1:
    raise ValueError(f'--num_shards={num_shards} must be ≥ 0 (0: automatic) and '
                     f'--image_size={image_size} ≥ 1.')
  if not out:
    raise ValueError('--out is required: the directory to write the latent dataset to.')
  described = describe_encoder(encoder)
  if image_folders is not None:
    splits = list(splits or image_folders)
    unknown = [s for s in splits if s not in image_folders]
    if unknown:
      raise ValueError(f'unknown split(s) {unknown}: --image_folder names '
                       f'{sorted(image_folders)}; give split=folder for each of --splits.')
    channels = 1 if described['in_channels'] == 1 else 3
    inputs = {s: FolderSplit(image_folders[s], image_size, channels) for s in splits}
    kind = 'image_folder'
  else:
    splits = list(splits or [data_config.get('split', 'train')])
    inputs = {s: ConfigSplit(data_config, s) for s in splits}
    kind = 'config'
  if len(set(splits)) != len(splits) or not splits:
    raise ValueError(f'--splits={",".join(splits)}: name each split once.')
  settings, repeat = make_settings(inputs, described, image_size=image_size, flip=flip,
                                   store_pixels=store_pixels, num_shards=num_shards,
                                   batch_size=batch_size, source_kind=kind)
  root = os.path.abspath(os.path.expanduser(out))
  check_or_write_settings(root, settings)
  return Plan(root, inputs, settings, described, repeat, batch_size, flip, store_pixels)


# ------------------------------------------------------------------- encoding


class Progress:
  """Logs records done / total, records per second and the ETA every LOG_SECONDS."""

  def __init__(self, total: int):
    self.total, self.done = total, 0
    self.start = self.last = time.perf_counter()

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.last >= LOG_SECONDS or self.done == self.total:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      logging.info('encoded %d/%d records (%.1f images/s, ETA %.0f s)', self.done, self.total,
                   rate, (self.total - self.done) / max(rate, 1e-9))

  def rate(self) -> float:
    return self.done / max(time.perf_counter() - self.start, 1e-9)


def encode_rows(plan: Plan, encoder, images: np.ndarray, pixels: np.ndarray,
                labels: np.ndarray) -> np.ndarray:
  """One batch of source images → its records (structured array [n or 2n], record order).

  The encoder always sees plan.batch_size rows (zero rows pad the last batch of a shard), so
  one compiled program serves every batch and a row's numbers never depend on how many
  rows its batch had.
  """
  x = np.repeat(images, 3, axis=-1) if plan.repeat_channels else images
  if plan.flip:    # [x0, flip(x0), x1, flip(x1), ...]
    x = np.stack([x, x[:, :, ::-1]], axis=1).reshape((-1,) + x.shape[1:])
    pixels = np.stack([pixels, pixels[:, :, ::-1]], axis=1).reshape((-1,) + pixels.shape[1:])
    labels = np.repeat(labels, 2)
  n = len(x)
  padded = np.zeros((plan.batch_size,) + x.shape[1:], np.float32)
  padded[:n] = x
  mean, logvar = encoder.encode(padded)
  mean, logvar = np.asarray(mean)[:n], np.asarray(logvar)[:n]
  rows = np.zeros(n, plan.dtype)
  rows['mean'] = mean
  rows['std'] = np.exp(np.float32(0.5) * logvar)
  rows['label'] = labels
  if plan.store_pixels:
    rows['pixels'] = pixels
  return rows


def encode_shard(plan: Plan, encoder, split: str, shard: int, pool, progress: Progress,
                 pause_s: float = 0.0) -> None:
  """Writes one shard from its first record (data/latents.py ShardWriter: atomic)."""
  info = plan.settings['splits'][split]
  per_example = 2 if plan.flip else 1
  start, stop = latents.shard_examples(info['num_source_examples'], info['num_shards'], shard)
  writer = latents.ShardWriter(plan.root, split, shard, info['num_shards'],
                               first=start * per_example, count=(stop - start) * per_example,
                               dtype=plan.dtype,
                               num_classes=plan.settings['metadata']['num_classes'])
  source = plan.inputs[split]
  step = plan.batch_size // per_example
  batches = [list(range(b, min(b + step, stop))) for b in range(start, stop, step)]
  # Reads the next batch (on `pool`'s threads) while the encoder runs on this one.
  with concurrent.futures.ThreadPoolExecutor(1) as ahead:
    try:
      pending = ahead.submit(source.read, batches[0], pool)
      for k in range(len(batches)):
        images, pixels, labels = pending.result()
        if k + 1 < len(batches):
          pending = ahead.submit(source.read, batches[k + 1], pool)
        rows = encode_rows(plan, encoder, images, pixels, labels)
        writer.write(rows)
        progress.update(len(rows))
        if pause_s:
          time.sleep(pause_s)
      writer.finish()
    except BaseException:
      writer.abort()
      raise


def my_shards(plan: Plan, split: str, num_processes: int, process_id: int) -> list[int]:
  num_shards = plan.settings['splits'][split]['num_shards']
  return [s for s in range(num_shards) if s % num_processes == process_id]


def run(plan: Plan, *, num_processes: int = 1, process_id: int = 0, read_threads: int = 8,
        pause_s: float = 0.0) -> bool:
  """Encodes this process's unfinished shards, then finalizes if every shard is finished;
  returns whether the dataset is complete."""
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must lie in [0, --num_processes='
                     f'{num_processes}).')
  per_example = 2 if plan.flip else 1
  todo = []
  for split, info in plan.settings['splits'].items():
    skipped = []
    for s in my_shards(plan, split, num_processes, process_id):
      if latents.is_shard_finished(plan.root, split, s, info['num_shards']):
        skipped.append(s)
        continue
      start, stop = latents.shard_examples(info['num_source_examples'], info['num_shards'], s)
      todo.append((split, s, (stop - start) * per_example))
    if skipped:
      logging.info('%s: skipping %d finished shards of %d (%s%s)', split, len(skipped),
                   info['num_shards'], ', '.join(map(str, skipped[:10])),
                   ' …' if len(skipped) > 10 else '')
  logging.info('process %d of %d: %d shards (%d records) to encode into %s', process_id,
               num_processes, len(todo), sum(n for _, _, n in todo), plan.root)
  if todo:
    encoder = load_encoder(plan.encoder)
    progress = Progress(sum(n for _, _, n in todo))
    with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool:
      for split, s, _ in todo:
        encode_shard(plan, encoder, split, s, pool, progress, pause_s)
    logging.info('encoded %d records in %.1f s: %.1f images/s', progress.done,
                 time.perf_counter() - progress.start, progress.rate())
  return finalize(plan.root)


def finalize(out: str) -> bool:
  """Writes split.json of every split whose shards are all finished and, once every split
  is, latents.json (deterministic content, atomic writes); logs what is missing otherwise.
  Returns whether the dataset is complete."""
  root = os.path.abspath(os.path.expanduser(out))
  path = os.path.join(root, latents.SETTINGS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: --out={root} was not written by this tool. '
                            'Run it with the inputs first (module docstring).')
  settings = latents.read_json(path)
  metadata = settings['metadata']
  per_example = 2 if metadata['flips'] else 1
  summaries, missing = {}, {}
  for split, info in settings['splits'].items():
    lacking = latents.missing_shards(root, split, info['num_shards'])
    if lacking:
      missing[split] = lacking
      continue
    summaries[split] = latents.split_summary(
        root, split, info['num_shards'], metadata['num_classes'],
        info['num_source_examples'] * per_example)
    latents.write_json(os.path.join(root, split, latents.SPLIT_FILE), summaries[split])
  if missing:
    for split, lacking in missing.items():
      logging.info('%s: %d of %d shards are not finished yet (%s%s)', split, len(lacking),
                   settings['splits'][split]['num_shards'], ', '.join(map(str, lacking[:10])),
                   ' …' if len(lacking) > 10 else '')
    logging.info('latents.json is written once they are: rerun any process (the same flags) '
                 'or `python -m pafm_jax.tools.encode_latents --finalize --out=%s` then.', root)
    return False
  latents.write_json(os.path.join(root, latents.METADATA_FILE), {**metadata, 'splits': summaries})
  logging.info('the latent dataset %s is complete: %s', root,
               ', '.join(f'{s} {v["num_examples"]} records' for s, v in summaries.items()))
  return True


def encode(out: str, encoder: str, *, num_processes: int = 1, process_id: int = 0,
           read_threads: int = 8, pause_s: float = 0.0, **inputs) -> bool:
  """plan + run: the Python entry point of the command (keyword arguments as `plan`'s)."""
  return run(plan(out, encoder, **inputs), num_processes=num_processes, process_id=process_id,
             read_threads=read_threads, pause_s=pause_s)


# ------------------------------------------------------------------- command line


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no global flags."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('image_folder', None, 'split=folder[,split=folder...] of ImageNet-layout '
                      'folders, or one folder (split train).')
  config_flags.DEFINE_config_file('config', None, 'A pafm_jax config whose config.data to '
                                  'encode (instead of --image_folder).')
  flags.DEFINE_list('splits', None, 'Splits to encode (default: those of --image_folder, or '
                    'config.data.split).')
  flags.DEFINE_string('encoder', None, 'diffusers AutoencoderKL directory or autoencoder '
                      'directory (autoencoder.json).')
  flags.DEFINE_string('out', None, 'Directory of the latent dataset (config.data.latents_dir).')
  flags.DEFINE_integer('image_size', 256, 'Side of the centre crop of --image_folder images.')
  flags.DEFINE_bool('flip', False, 'Follow every image by its horizontally flipped copy.')
  flags.DEFINE_bool('store_pixels', False, 'Store the uint8 preprocessed image in each record.')
  flags.DEFINE_integer('num_shards', 0, 'Shards per split (0: about 1000 records each).')
  flags.DEFINE_integer('batch_size', 64, 'Images per encoder call (with --flip, half of them '
                       'flipped copies); keep it when resuming.')
  flags.DEFINE_integer('read_threads', 8, 'Threads decoding image files.')
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() first, so that '
                    '--num_processes/--process_id default to the job\'s (TPU pods).')
  flags.DEFINE_integer('num_processes', None, 'Processes sharing the shards (default: '
                       'jax.process_count()).')
  flags.DEFINE_integer('process_id', None, 'This process (default: jax.process_index()); it '
                       'writes the shards s with s % num_processes == process_id.')
  flags.DEFINE_bool('finalize', False, 'Only check the shards and write split.json and '
                    'latents.json if all are finished.')
  flags.DEFINE_float('pause_after_batch_s', 0.0, 'Testing aid: sleep this long after each '
                     'written batch (to interrupt a run mid-shard).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.out:
    raise app.UsageError('--out is required.')
  if FLAGS.finalize:
    complete = finalize(FLAGS.out)
    print(f'{FLAGS.out}: {"complete" if complete else "incomplete"}', flush=True)
    return
  from pafm_jax import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_library_info()
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize()
  if not FLAGS.encoder:
    raise app.UsageError('--encoder is required.')
  p = plan(FLAGS.out, FLAGS.encoder,
           image_folders=parse_image_folders(FLAGS.image_folder) if FLAGS.image_folder else None,
           data_config=FLAGS.config.data if FLAGS.config is not None else None,
           splits=FLAGS.splits, image_size=FLAGS.image_size, flip=FLAGS.flip,
           store_pixels=FLAGS.store_pixels, num_shards=FLAGS.num_shards,
           batch_size=FLAGS.batch_size)
  num_processes = (FLAGS.num_processes if FLAGS.num_processes is not None
                   else jax.process_count())
  process_id = FLAGS.process_id if FLAGS.process_id is not None else jax.process_index()
  complete = run(p, num_processes=num_processes, process_id=process_id,
                 read_threads=FLAGS.read_threads, pause_s=FLAGS.pause_after_batch_s)
  print(f'{FLAGS.out}: {"complete" if complete else "incomplete"}', flush=True)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
