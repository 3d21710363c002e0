"""Representation alignment: REPA (Yu et al. 2024) and its variance-aware form VA-REPA (Lin et
al. 2026, METHOD.md §4), an auxiliary loss of the same train step as FM, PAFM or StableVM.

The SiT's residual stream after block `config.model.projector_depth` goes through the projector
MLP (models/sit.py) to z̃ [B, N, F], one vector per token; a frozen encoder gives the clean
image's patch features z [B, N, F] (repa_encoders.py). The per-sample loss is the negative
cosine similarity averaged over tokens,

    ℓ_b = −(1/N) Σ_n ⟨z̃_bn, z_bn⟩ / (‖z̃_bn‖·‖z_bn‖),

and the batch loss weighs it by a schedule of the sample's time t, normalised by the weights:

    L_align = Σ_b w(t_b)·ℓ_b / Σ_b w(t_b)        (0 when every weight vanishes).

The step minimises L_velocity + λ·L_align (λ = config.objective.repa.weight).

Schedules w(t) (t = 0 data, t = 1 noise; τ = config.objective.repa.tau, k = .sharpness), the
formulas of the StableVelocity reference code:

    uniform   1                                   REPA: align at every t
    hard      1[t < τ]
    sigmoid   σ(k·(τ − t))                        VA-REPA's default, τ = 0.7, k = 20
    cosine    ½(1 + cos(π·t/τ)) for t < τ, else 0
    snr       SNR(t) / (SNR(t) + SNR(τ)),  SNR = (α_t/σ_t)² of the training path

VA-REPA's reasoning: near the data (small t) the posterior over clean images is narrow, so the
clean image's features are a sound target for the noisy input's representation; near the noise
it is wide and the same target pulls towards one arbitrary image.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pafm_jax import paths

SCHEDULES = ('uniform', 'hard', 'sigmoid', 'cosine', 'snr')
ENCODERS = ('classifier', 'dinov2')
# SNR is finite on the open interval only; the clamp keeps w(0) = 1 and w(1) = 0 finite.
_SNR_T_CLAMP = 1e-6
# Below this total weight the batch has no sample to align (e.g. every t ≥ τ for 'hard').
_MIN_TOTAL_WEIGHT = 1e-8


def schedule_weights(t: jax.Array, schedule: str, *, tau: float = 0.7, sharpness: float = 20.0,
                     path=None) -> jax.Array:
  """w(t) of `schedule` (module docstring): t [B] → [B] float32 in [0, 1]."""
  t = jnp.asarray(t, jnp.float32)
  if schedule == 'uniform':
    return jnp.ones_like(t)
  if schedule == 'hard':
    return (t < tau).astype(jnp.float32)
  if schedule == 'sigmoid':
    return jax.nn.sigmoid(sharpness * (tau - t))
  if schedule == 'cosine':
    return jnp.where(t < tau, 0.5 * (1.0 + jnp.cos(jnp.pi * t / tau)), 0.0)
  if schedule == 'snr':
    path = path or paths.LinearPath()
    snr = lambda s: jnp.square(path.alpha(s) / path.sigma(s))
    clamp = lambda s: jnp.clip(s, _SNR_T_CLAMP, 1.0 - _SNR_T_CLAMP)
    at_t, at_tau = snr(clamp(t)), snr(clamp(jnp.float32(tau)))
    return at_t / (at_t + at_tau)
  raise ValueError(f'unknown alignment schedule {schedule!r}; choose one of {SCHEDULES}.')


def negative_cosine(projected: jax.Array, features: jax.Array) -> jax.Array:
  """ℓ_b: projected, features [B, N, F] → [B], −cos averaged over the N tokens (float32)."""
  unit = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  z_tilde, z = unit(projected.astype(jnp.float32)), unit(features.astype(jnp.float32))
  return -jnp.mean(jnp.sum(z_tilde * z, axis=-1), axis=-1)


def alignment_loss(projected: jax.Array, features: jax.Array, weights: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """Σ w_b·ℓ_b / Σ w_b (0 without weight) and the per-sample ℓ [B].

  projected: z̃ [B, N, F] of the network; features: z [B, N, F] of the frozen encoder (no
  gradient flows into them); weights: w(t) [B].
  """
  per_sample = negative_cosine(projected, jax.lax.stop_gradient(features))
  total = jnp.sum(weights)
  safe_total = jnp.where(total > _MIN_TOTAL_WEIGHT, total, 1.0)
  loss = jnp.where(total > _MIN_TOTAL_WEIGHT, jnp.sum(weights * per_sample) / safe_total, 0.0)
  return loss, per_sample


def check_config(config) -> None:
  """config.objective.repa against the model it trains; raises naming the field to change."""
  r = config.objective.repa
  if r.weight < 0:
    raise ValueError(f'config.objective.repa.weight (λ) must be ≥ 0, got {r.weight}.')
  if r.schedule not in SCHEDULES:
    raise ValueError(f'config.objective.repa.schedule must be one of {SCHEDULES}, got '
                     f'{r.schedule!r}.')
  if not 0.0 < r.tau <= 1.0:
    raise ValueError(f'config.objective.repa.tau must lie in (0, 1], got {r.tau}.')
  if r.sharpness <= 0:
    raise ValueError(f'config.objective.repa.sharpness must be > 0, got {r.sharpness}.')
  if r.encoder not in ENCODERS:
    raise ValueError(f'config.objective.repa.encoder must be one of {ENCODERS}, got '
                     f'{r.encoder!r}.')
  if not is_active(config):
    return
  if not config.model.projector:
    raise ValueError('config.objective.repa.weight > 0 trains a projector head: set '
                     'config.model.projector=True (and its projector_* fields).')
  if config.objective.name == 'flow_map':
    raise ValueError('representation alignment trains velocity models (FM, PAFM, StableVM); '
                     'set config.objective.repa.weight=0 for a flow map.')
  if config.data.name == 'latents' and not config.data.pixel_size:
    raise ValueError('REPA on latents aligns to features of the images behind them: write the '
                     'latent dataset with --store_pixels and set config.data.pixel_source, '
                     'pixel_size and pixel_channels.')
  if config.data.name == 'latents' and config.objective.name == 'stablevm':
    raise ValueError("StableVM's memory bank keeps latents, not the pixels REPA's encoder needs "
                     'for its drawn pairs: use FM or PAFM with REPA on latents, or StableVM '
                     'without it.')
  if r.encoder == 'dinov2' and not r.encoder_path:
    raise ValueError("config.objective.repa.encoder='dinov2' reads DINOv2 weights from a local "
                     'directory (config.json + model.safetensors of transformers\' Dinov2Model, '
                     'e.g. facebook/dinov2-base): set config.objective.repa.encoder_path.')
  tokens, width = encoder_output_shape(config)
  from pafm_jax.models import sit  # pylint: disable=g-import-not-at-top
  p = sit.SIT_SIZES[config.model.name]['patch_size']
  model_tokens = (config.data.image_size // p) ** 2
  if tokens != model_tokens:
    raise ValueError(
        f'the {r.encoder} encoder gives {tokens} patch features per image but '
        f'{config.model.name} on {config.data.image_size}×{config.data.image_size} inputs has '
        f'{model_tokens} tokens; REPA aligns them one to one. Pick a model patch size or '
        'config.objective.repa.encoder_resolution that makes them equal.')
  if width != config.model.projector_features:
    raise ValueError(f'the {r.encoder} encoder has {width} features per patch: set '
                     f'config.model.projector_features={width}.')


def is_active(config) -> bool:
  """Whether the step adds the alignment loss (λ > 0)."""
  return config.objective.repa.weight > 0


# ---------------------------------------------------------------------------------------------
# Frozen encoders: params (a pure dict, carried in the train state as 'repa_encoder' and never
# updated) and a pure apply(params, images [B, H, W, C] in [−1, 1]) → z [B, N, F].


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  name: str
  abstract_params: Any     # nested dict of jax.ShapeDtypeStruct
  apply: Callable          # (params, images) → [B, N, F]
  load_params: Callable[[], Any]   # reads the weights (numpy pure dict)


def encoder_output_shape(config) -> tuple[int, int]:
  """(N, F): patch features per image and their width, from the config alone."""
  r = config.objective.repa
  if r.encoder == 'classifier':
    from pafm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from pafm_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top
    arch = classifier.architecture(pipeline.pixel_space_config(config).data)
    side = arch['image_size'] // 4
    return side * side, arch['widths'][1]
  from pafm_jax.models import dinov2  # pylint: disable=g-import-not-at-top
  return dinov2.output_shape(r.encoder_path, r.encoder_resolution)


def encoder_input_field(config) -> str:
  """The batch field the frozen encoder reads: the clean images, or for latent data the
  pixels stored with them."""
  from pafm_jax import batch_contract  # pylint: disable=g-import-not-at-top
  from pafm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return batch_contract.PIXELS if pipeline.is_latent(config.data) else batch_contract.IMAGE


def frozen_encoder(config) -> FrozenEncoder:
  """The encoder of config.objective.repa, built abstractly (its weights are read by
  `load_params`, once, when a fresh run starts; a resumed run restores them with the state)."""
  r = config.objective.repa
  if r.encoder == 'classifier':
    return _classifier_encoder(config)
  from pafm_jax.models import dinov2  # pylint: disable=g-import-not-at-top
  parts = dinov2.frozen_encoder(r.encoder_path, r.encoder_resolution)
  return FrozenEncoder(parts.name, parts.abstract_params, parts.apply, parts.load_params)


def _classifier_encoder(config) -> FrozenEncoder:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pafm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from pafm_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top

  config = pipeline.pixel_space_config(config)
  arch = classifier.architecture(config.data)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: classifier.build(arch)), nnx.Param)

  def apply(params, images):
    model = nnx.merge(graphdef, params)
    fmap = model.feature_map(jnp.clip(images, -1.0, 1.0))   # [B, h, w, F]
    return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])

  def load_params():
    return jax.tree.map(np.asarray, classifier.load_for(config).params)

  return FrozenEncoder('classifier', nnx.to_pure_dict(abstract), apply, load_params)
