"""Latents → pixels for samples of a latent model: sample grids, `--mode=sample` and evaluation.

The decoder is the autoencoder the latent dataset was written with (recorded in its
latents.json) or config.data.decoder: a diffusers AutoencoderKL directory (models/vae.py) or
a pafm_jax autoencoder directory (models/autoencoder.py, holding autoencoder.json). Samples
are scaled latents scale·(z − shift) (the dataset's scaling and shift factors; SD's shift is 0),
so the decoder sees latents / scale + shift.
"""

from __future__ import annotations

import os
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from pafm_jax.data import pipeline

AUTOENCODER_INFO = 'autoencoder.json'
DECODE_PER_DEVICE = 32


def decoder_path(config: ml_collections.ConfigDict, metadata: dict) -> str:
  """config.data.decoder, else the encoder the latent dataset's `metadata` records ('' when
  neither)."""
  if config.data.decoder:
    return os.path.expanduser(config.data.decoder)
  return metadata.get('encoder', {}).get('path', '')


def load_autoencoder(path: str):
  """The VAE or autoencoder at `path`: an object with encode/decode and scaling_factor."""
  if os.path.isfile(os.path.join(path, AUTOENCODER_INFO)):
    from pafm_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
    return autoencoder.load(path)
  from pafm_jax.models import vae  # pylint: disable=g-import-not-at-top
  return vae.load_vae(path)


def latent_decoder(config: ml_collections.ConfigDict,
                   required: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
  """scaled latents [N, h, w, c] → images [N, H, W, C] in [−1, 1] (clipped), or None for pixel
  data, or when no decoder can be found and `required` is False (grids then show the first
  three latent channels)."""
  if not pipeline.is_latent(config.data):
    return None
  metadata = pipeline.latent_metadata(config.data)
  path = decoder_path(config, metadata)
  if not path or not os.path.exists(path):
    message = (f'no decoder for the latents ({path or "none recorded"}): set '
               'config.data.decoder to the VAE or autoencoder directory the dataset was '
               'encoded with.')
    if required:
      raise FileNotFoundError(message)
    logging.warning('%s Sample grids show the first three latent channels.', message)
    return None
  model = load_autoencoder(path)
  recorded = metadata.get('encoder', {}).get('fingerprint')
  ours = getattr(model, 'fingerprint', None)
  if recorded and ours and recorded != ours:
    # Retrained since the dataset was written: its decoder no longer inverts these latents.
    raise ValueError(f'the autoencoder at {path} (fingerprint {ours}) is not the one the '
                     f'latent dataset was encoded with ({recorded}); re-encode the dataset '
                     'with it, or set config.data.decoder to the original.')
  scale, shift = pipeline.latent_scale(metadata)

  # Bounded memory for 50 K-sample evaluations: SD's decoder at 256 px holds ~0.3 GB of
  # float32 activations per image, so a few dozen per device at a time.
  chunk_size = DECODE_PER_DEVICE * jax.device_count()

  def decode(latents: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(latents), chunk_size):
      chunk = np.asarray(latents[i:i + chunk_size], np.float32) / np.float32(scale) + shift
      out.append(np.clip(np.asarray(jax.device_get(model.decode(chunk)), np.float32), -1, 1))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  logging.info('latent decoder: %s (latents / %.5g + %g)', path, scale, shift)
  return decode
