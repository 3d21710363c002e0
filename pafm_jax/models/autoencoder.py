"""A small KL autoencoder for Fashion-MNIST: Stable Diffusion's latent recipe in miniature.

SD trains its diffusion model on the latents of a KL-regularised autoencoder (models/vae.py
loads SD's own); this module trains one small enough for a laptop CPU, so the whole "SiT on
VAE latents" path runs on real data:

  encoder  conv_in → per level [ResBlock × blocks_per_level, then (but after the last level)
           a stride-2 3×3 conv to the next level's width] → GroupNorm → SiLU → conv_out:
           mean | logvar (2 × latent_channels, logvar clipped to [−30, 20] as SD does)
  decoder  conv_in → per level, deepest first [ResBlock × blocks_per_level, then (but after
           the last level) nearest ×2 and a 3×3 conv to the next level's width] → GroupNorm
           → SiLU → conv_out

ResBlock is x + conv(SiLU(GN(conv(SiLU(GN(x)))))); `widths` has one entry per resolution
level, so the downsampling factor is 2^(len(widths) − 1): 28×28×1 images ↔ 7×7×latent_channels
latents with three widths.

Training (`train`): Adam (constant rate) on reconstruction (L1 by default) + kl_weight ·
KL(N(mean, σ²) ‖ N(0, I)), each a mean over its entries, through one posterior draw per image;
then, as SD/LDM do, scaling_factor = 1 / std of posterior draws over the training set, so a
diffusion model sees unit-variance latents (no shift: their mean is near 0).

Saved under one directory (as the domain classifier, evaluation/classifier.py, whose helpers
this reuses):
  params/            Orbax checkpoint of the parameters (a plain nested dict)
  autoencoder.json   architecture, training settings, scaling factor, test MSE/PSNR, weights
                     digest and fingerprint; written atomically and last (a complete save)

`load(directory)` returns an `Autoencoder` with the interface of models/vae.py's VAE:
encode(images) → (mean, logvar), decode(latents) → images (both unscaled), scaling_factor,
latent_channels, downsample_factor, fingerprint; jitted, the batch split over the devices.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
import orbax.checkpoint as ocp

from pafm_jax.data import pipeline
from pafm_jax.evaluation import classifier as classifier_lib
from pafm_jax.models import vae
from pafm_jax.sampling import grids

ARCHITECTURE_VERSION = 'kl-autoencoder-v1'
INFO_FILE = 'autoencoder.json'         # sampling/decoding.py recognises a directory by it
LOGVAR_RANGE = (-30.0, 20.0)           # SD's DiagonalGaussianDistribution clamp
RECON_LOSSES = ('l1', 'l2')
TRAIN_COMMAND = ('python -m pafm_jax.main --mode=train_autoencoder '
                 '--config=configs/fmnist_autoencoder.py --workdir=<dir>')


# ------------------------------------------------------------------------------ network


def _conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs, stride: int = 1) -> nnx.Conv:
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding='SAME',
                  rngs=rngs)


def _norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Narrow layers cannot have more groups than channels.
  return nnx.GroupNorm(channels, num_groups=math.gcd(groups, channels), epsilon=1e-6,
                       rngs=rngs)


class ResBlock(nnx.Module):
  """x + conv(SiLU(GN(conv(SiLU(GN(x)))))): [B, H, W, width] → the same shape."""

  def __init__(self, width: int, groups: int, rngs: nnx.Rngs):
    self.norm1 = _norm(width, groups, rngs)
    self.conv1 = _conv(width, width, 3, rngs)
    self.norm2 = _norm(width, groups, rngs)
    self.conv2 = _conv(width, width, 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    return x + self.conv2(jax.nn.silu(self.norm2(h)))


def _level(width: int, blocks: int, groups: int, rngs: nnx.Rngs) -> nnx.List:
  return nnx.List([ResBlock(width, groups, rngs) for _ in range(blocks)])


class Encoder(nnx.Module):
  """images [B, H, W, channels] → moments [B, H/f, W/f, 2·latent_channels]."""

  def __init__(self, arch: dict[str, Any], rngs: nnx.Rngs):
    widths, groups, blocks = arch['widths'], arch['groups'], arch['blocks_per_level']
    self.conv_in = _conv(arch['channels'], widths[0], 3, rngs)
    self.levels = nnx.List([_level(w, blocks, groups, rngs) for w in widths])
    # The stride-2 conv also widens to the next level: each conv then runs at the resolution
    # and width where it is cheapest, and no residual block needs a 1×1 shortcut conv.
    self.down = nnx.List([_conv(w, v, 3, rngs, stride=2) for w, v in zip(widths, widths[1:])])
    self.norm_out = _norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], 2 * arch['latent_channels'], 3, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for i, level in enumerate(self.levels):
      for block in level:
        x = block(x)
      if i < len(self.down):
        x = self.down[i](x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
  """latents [B, h, w, latent_channels] → images [B, h·f, w·f, channels]."""

  def __init__(self, arch: dict[str, Any], rngs: nnx.Rngs):
    widths, groups, blocks = arch['widths'][::-1], arch['groups'], arch['blocks_per_level']
    self.conv_in = _conv(arch['latent_channels'], widths[0], 3, rngs)
    self.levels = nnx.List([_level(w, blocks, groups, rngs) for w in widths])
    # Nearest ×2 then a 3×3 conv that narrows to the next level (SD keeps the width here and
    # narrows in the next resnet: at 28×28 on a CPU that conv alone would cost as much as a
    # whole level).
    self.up = nnx.List([_conv(w, v, 3, rngs) for w, v in zip(widths, widths[1:])])
    self.norm_out = _norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], arch['channels'], 3, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.conv_in(z)
    for i, level in enumerate(self.levels):
      for block in level:
        x = block(x)
      if i < len(self.up):
        x = self.up[i](jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The trainable network; float32 throughout (it is small, and CPUs gain nothing from bf16)."""

  def __init__(self, arch: dict[str, Any], rngs: nnx.Rngs):
    self.encoder = Encoder(arch, rngs)
    self.decoder = Decoder(arch, rngs)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, C] in [−1, 1] → (mean, logvar), each [B, H/f, W/f, latent_channels]."""
    mean, logvar = jnp.split(self.encoder(images.astype(jnp.float32)), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: jax.Array) -> jax.Array:
    """unscaled latents [B, h, w, latent_channels] → images [B, h·f, w·f, C] (not clipped)."""
    return self.decoder(latents.astype(jnp.float32))


def architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything that fixes the network's function shape (part of the fingerprint)."""
  ac = config.autoencoder
  return {'version': ARCHITECTURE_VERSION, 'image_size': int(config.data.image_size),
          'channels': int(config.data.channels), 'latent_channels': int(ac.latent_channels),
          'widths': [int(w) for w in ac.widths], 'blocks_per_level': int(ac.blocks_per_level),
          'groups': int(ac.norm_groups)}


def downsample_factor(arch: dict[str, Any]) -> int:
  return 2 ** (len(arch['widths']) - 1)


def abstract_model(arch: dict[str, Any]):
  """(graphdef, abstract parameter pure dict) of the network, nothing allocated."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(arch, nnx.Rngs(0))),
                              nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, e^logvar) ‖ N(0, 1)) per entry, closed form: ½(mean² + e^logvar − 1 − logvar)."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def init_params(arch: dict[str, Any], seed: int) -> dict:
  """Fresh parameters as flax initialises them (conv kernels LeCun-normal truncated at ±2σ,
  zero biases, unit GroupNorm scales), drawn by numpy from `seed`: one JAX random op compiles
  for seconds on a busy CPU, and the network has dozens of parameter shapes."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name != 'kernel':
      return (np.ones if name == 'scale' else np.zeros)(leaf.shape, np.float32)
    z = rng.standard_normal(leaf.shape)
    while (outside := np.abs(z) > 2).any():
      z[outside] = rng.standard_normal(int(outside.sum()))
    # 0.8796 is the std of a unit normal truncated at ±2, as flax's variance_scaling divides.
    std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1])) / 0.87962566103423978
    return (z * std).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_model(arch)[1])


def fingerprint(arch: dict[str, Any], weights_digest: str) -> str:
  key = json.dumps([arch, weights_digest], sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- using a model


class Autoencoder(vae.BatchedAutoencoder):
  """A trained autoencoder (models/vae.py BatchedAutoencoder's batch-sharded encode/decode).

  Attributes: info (autoencoder.json), arch, scaling_factor, shift_factor (0: latents are only
  scaled), latent_channels, downsample_factor (f), fingerprint, mesh, graphdef, params.
  """

  def __init__(self, params: dict, info: dict[str, Any], *, mesh: Mesh | None = None):
    arch = info['architecture']
    super().__init__(abstract_model(arch)[0], params, in_channels=int(arch['channels']),
                     latent_channels=int(arch['latent_channels']), mesh=mesh)
    self.info, self.arch = info, arch
    self.scaling_factor, self.shift_factor = float(info['scaling_factor']), 0.0
    self.downsample_factor = downsample_factor(arch)
    self.fingerprint = info['fingerprint']


def load(directory: str, *, mesh: Mesh | None = None) -> Autoencoder:
  """An autoencoder saved by `train`; its weights are checked against the recorded digest.

  Raises:
    FileNotFoundError: no complete save under `directory` (names the command that trains one).
    ValueError: the weights differ from the ones autoencoder.json describes.
  """
  directory = epath.Path(directory)
  info_path = directory / INFO_FILE
  if not info_path.exists():
    raise FileNotFoundError(
        f'no autoencoder at {directory} ({INFO_FILE} missing). Train one with\n  '
        f'{TRAIN_COMMAND}\nor point config.autoencoder.dir at an existing one.')
  info = json.loads(info_path.read_text())
  _, abstract = abstract_model(info['architecture'])
  params = ocp.StandardCheckpointer().restore(directory / 'params', abstract)
  if classifier_lib.weights_digest(params) != info['weights_digest']:
    raise ValueError(f'the autoencoder weights under {directory} do not match the digest in '
                     f'{INFO_FILE}; retrain with --mode=train_autoencoder.')
  return Autoencoder(params, info, mesh=mesh)


# ----------------------------------------------------------------------------- training


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses settings the autoencoder cannot train with, naming the field."""
  ac = config.autoencoder
  if ac.recon_loss not in RECON_LOSSES:
    raise ValueError(f'config.autoencoder.recon_loss={ac.recon_loss!r}: use one of '
                     f'{RECON_LOSSES}.')
  f = 2 ** (len(ac.widths) - 1)
  if not ac.widths or config.data.image_size % f:
    raise ValueError(f'config.autoencoder.widths={tuple(ac.widths)} downsamples by {f}, which '
                     f'does not divide config.data.image_size={config.data.image_size}.')
  for name in ('latent_channels', 'blocks_per_level', 'norm_groups', 'steps', 'batch_size',
               'log_every_steps', 'scale_examples'):
    if int(ac[name]) <= 0:
      raise ValueError(f'config.autoencoder.{name} must be positive, got {ac[name]}.')


@functools.lru_cache(maxsize=8)
def _train_step(arch_json: str, learning_rate: float, kl_weight: float, recon_loss: str):
  """The jitted step (params, opt_state, images [B, H, W, C], ε [B, h, w, latent_channels]) →
  (params, opt_state, (loss, recon, kl)); cached, so runs of one setting compile it once."""
  graphdef, _ = abstract_model(json.loads(arch_json))
  # A constant rate, as SD's autoencoder trains: on this short budget a cosine decay to 0
  # cost 0.9 dB of test PSNR (it slows the middle of a run that is still far from converged).
  tx = optax.adam(learning_rate)

  def loss_fn(params, images, eps):
    model = nnx.merge(graphdef, params)
    mean, logvar = model.encode(images)
    recon = model.decode(mean + jnp.exp(0.5 * logvar) * eps) - images   # a posterior draw
    recon = jnp.mean(jnp.abs(recon) if recon_loss == 'l1' else jnp.square(recon))
    kl = jnp.mean(kl_divergence(mean, logvar))
    return recon + kl_weight * kl, (recon, kl)

  @jax.jit
  def step(params, opt_state, images, eps):
    (loss, (recon, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, eps)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, (loss, recon, kl)

  return tx, step


def fit(config: ml_collections.ConfigDict,
        images: np.ndarray) -> tuple[dict, dict[str, float]]:
  """Trains a fresh network on `images` [N, H, W, C] in [−1, 1] for config.autoencoder.steps
  steps; returns (the parameter pure dict, the loss terms averaged over the last logging
  interval). Same config (seed included) → same weights."""
  ac = config.autoencoder
  if len(images) < int(ac.batch_size):
    raise ValueError(f'{len(images)} training images cannot fill a batch of '
                     f'config.autoencoder.batch_size={ac.batch_size}.')
  arch = architecture(config)
  params = init_params(arch, int(ac.seed))
  tx, step = _train_step(json.dumps(arch, sort_keys=True), float(ac.learning_rate),
                         float(ac.kl_weight), str(ac.recon_loss))
  opt_state = jax.jit(tx.init)(params)
  # Batch order and posterior noise from numpy, seeded apart from the initialisation.
  order_rng, noise_rng = (np.random.default_rng([int(ac.seed), k]) for k in (1, 2))
  batch, steps, every = int(ac.batch_size), int(ac.steps), int(ac.log_every_steps)
  f = downsample_factor(arch)
  latent = (batch, arch['image_size'] // f, arch['image_size'] // f, arch['latent_channels'])
  order, pos, sums, final = order_rng.permutation(len(images)), 0, np.zeros(3), {}
  for i in range(steps):
    if pos + batch > len(order):   # a new epoch: reshuffle, drop the incomplete last batch
      order, pos = order_rng.permutation(len(images)), 0
    idx = np.sort(order[pos:pos + batch])
    pos += batch
    eps = noise_rng.standard_normal(latent, np.float32)
    params, opt_state, terms = step(params, opt_state, images[idx], eps)
    sums += np.asarray(jax.device_get(terms), np.float64)
    if i == 0:  # the first step compiles: rates and ETA count from after it
      t0, t_log, i_log = time.time(), time.time(), 0
    if (i + 1) % every == 0 or i + 1 == steps:
      now = time.time()
      n = i % every + 1   # steps summed since the last line
      rate = (i - i_log) * batch / max(now - t_log, 1e-9)
      eta = (steps - i - 1) * (now - t0) / max(i, 1)
      final = dict(zip(('loss', 'recon', 'kl'), (float(v) for v in sums / n)))
      logging.info('autoencoder step %d/%d: loss %.5f, recon (%s) %.5f, KL %.3f, %.0f images/s, '
                   'ETA %.0f s', i + 1, steps, final['loss'], ac.recon_loss, final['recon'],
                   final['kl'], rate, eta)
      sums[:], t_log, i_log = 0.0, now, i
  return jax.device_get(params), final


def psnr(mse: float) -> float:
  """PSNR in dB on the [0, 1] scale of an MSE in [−1, 1] units (halving errors quarters it)."""
  return float(10.0 * np.log10(4.0 / max(mse, 1e-12)))


def reconstruction_errors(model: Autoencoder, images: np.ndarray, seed: int,
                          batch_size: int = 1000) -> tuple[float, float]:
  """MSEs in [−1, 1] units over `images` [N, H, W, C] of the (clipped) decoded posterior mean
  and of a decoded posterior draw (how much the KL's noise costs), from one encoding pass."""
  rng = np.random.default_rng(seed)
  sq = np.zeros(2)
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    mean, logvar = jax.device_get(model.encode(chunk))
    draw = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape).astype(np.float32)
    for k, z in enumerate((mean, draw)):
      out = np.clip(np.asarray(model.decode(z), np.float64), -1.0, 1.0)
      sq[k] += np.sum(np.square(out - chunk))
  return float(sq[0] / images.size), float(sq[1] / images.size)


def latent_moments(model: Autoencoder, images: np.ndarray, seed: int,
                   batch_size: int = 1000) -> tuple[float, float]:
  """(mean, std) over every entry of posterior draws z = mean + σ·ε of `images`: LDM's
  scaling factor is 1 / that std, so the diffusion model sees unit-variance latents."""
  rng = np.random.default_rng(seed)
  total, total_sq, count = 0.0, 0.0, 0
  for i in range(0, len(images), batch_size):
    mean, logvar = jax.device_get(model.encode(images[i:i + batch_size]))
    z = mean.astype(np.float64) + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape)
    total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
  mu = total / count
  return float(mu), float(math.sqrt(max(total_sq / count - mu * mu, 0.0)))


def save(directory: str | epath.Path, params: dict, info: dict[str, Any]) -> None:
  """params/ then autoencoder.json (atomic, last): a directory with the json is complete."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / INFO_FILE).unlink(missing_ok=True)  # an older save is incomplete from here on
  classifier_lib.save_params(directory, params)
  classifier_lib.write_info(directory / INFO_FILE, info)


def load_images(config: ml_collections.ConfigDict, split: str,
                limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The first `limit` (0 = all) examples of a whole split of config.data, in order: images
  float32 [N, H, W, C] in [−1, 1], labels int32 [N] (read as pipeline.load_arrays reads them;
  a limit spares reading 60 000 images for a quick run)."""
  # The autoencoder belongs to the dataset, not to a run on a subset of it.
  data = pipeline.whole_split(config.data)
  if not limit:
    return pipeline.load_arrays(data, split)
  source = pipeline.load_source(data, split)
  batch = pipeline.batch_reader(source, pipeline.sample_shape(data))(
      np.arange(min(limit, len(source))))
  return batch['image'], batch['label']


def train(config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
  """Trains the autoencoder of config.autoencoder on config.data's train split (its first
  config.autoencoder.train_examples images, 0 = all), measures it on the test split, computes
  the scaling factor and saves everything to `directory`; returns the saved info."""
  check_config(config)
  ac, t0 = config.autoencoder, time.time()
  train_x, _ = load_images(config, 'train', int(ac.train_examples))
  test_x, _ = load_images(config, 'test', int(ac.test_examples))
  logging.info('autoencoder data: %d train, %d test images (%.1f s)', len(train_x), len(test_x),
               time.time() - t0)
  t_fit = time.time()
  params, final = fit(config, train_x)
  train_seconds = time.time() - t_fit
  arch = architecture(config)
  digest = classifier_lib.weights_digest(params)
  info = {'architecture': arch, 'weights_digest': digest,
          'fingerprint': fingerprint(arch, digest), 'scaling_factor': 1.0}
  model = Autoencoder(params, info)
  mu, std = latent_moments(model, train_x[:int(ac.scale_examples)], int(ac.seed))
  mse, mse_sampled = reconstruction_errors(model, test_x, int(ac.seed))
  f = downsample_factor(arch)
  info.update({
      'scaling_factor': 1.0 / std,
      'latent_std': std,
      'latent_mean': mu,
      'latent_shape': [arch['image_size'] // f, arch['image_size'] // f, arch['latent_channels']],
      'test_mse': mse,                    # images in [−1, 1], decoded posterior mean
      'test_psnr': psnr(mse),             # dB, on the [0, 1] scale
      'test_psnr_sampled': psnr(mse_sampled),   # from a posterior draw instead
      'final_train_terms': final,
      'dataset': str(config.data.name),
      'train_examples': len(train_x),
      'test_examples': len(test_x),
      'train_digest': classifier_lib.digest(train_x),
      'settings': {k: ac[k] for k in ('steps', 'batch_size', 'learning_rate', 'kl_weight',
                                      'recon_loss', 'seed', 'scale_examples')},
      'train_seconds': round(train_seconds, 1),
      'total_seconds': round(time.time() - t0, 1),
  })
  save(directory, params, info)
  logging.info('autoencoder saved to %s (fingerprint %s): test MSE %.5f, PSNR %.2f dB (%.2f dB '
               'from a posterior draw), latent std %.4f → scaling factor %.4f', directory,
               info['fingerprint'], mse, info['test_psnr'], info['test_psnr_sampled'], std,
               info['scaling_factor'])
  return info


def run_train_autoencoder(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=train_autoencoder: trains into config.autoencoder.dir ('' = the workdir), then
  writes <workdir>/reconstructions.png: a column per class, rows 1 and 3 test images, rows 2
  and 4 their reconstructions (through the posterior mean)."""
  directory = config.autoencoder.dir or workdir
  info = train(config, directory)
  model = load(directory)   # what a later run will see, digest checked
  images, labels = load_images(config, 'test', 500)
  # The first two test images of each class present in those 500 (all ten of Fashion-MNIST).
  picks = [np.flatnonzero(labels == k)[:2] for k in range(int(config.data.num_classes))]
  picks = [p for p in picks if len(p) == 2]
  if picks:
    rows = []
    for j in range(2):
      originals = images[[p[j] for p in picks]]
      rows += [originals, np.clip(np.asarray(model.decode(model.encode(originals)[0])), -1, 1)]
    path = epath.Path(workdir) / 'reconstructions.png'
    grids.save_grid_png(grids.image_grid(np.concatenate(rows), len(picks)), path)
    logging.info('test images over their reconstructions: %s', path)
  print(f'autoencoder: latents {"×".join(map(str, info["latent_shape"]))}, test MSE '
        f'{info["test_mse"]:.5f}, PSNR {info["test_psnr"]:.2f} dB, scaling factor '
        f'{info["scaling_factor"]:.4f}, trained in {info["train_seconds"]:.0f} s, fingerprint '
        f'{info["fingerprint"]} → {directory}', flush=True)
  return info
