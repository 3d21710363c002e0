"""Base for the paper-scale SiT runs on ImageNet-256 VAE latents (32×32×4, 1000 classes).

Global batch 256, AdamW 1e-4, EMA 0.9999, 400 K steps (SiT, Ma et al. 2024). The latents are
SD-VAE moments written once by the encoding tool (docs/training.md, "ImageNet-256 latents"):

  python -m pafm_jax.tools.encode_latents --encoder=/path/to/sd-vae-ft-ema \
      --image_folder=train=/data/imagenet/train --image_size=256 --flip --store_pixels \
      --num_shards=1024 --out=/data/imagenet256_latents

(a local or gcsfuse-mounted path on every host) and pointed at with
--config.data.latents_dir=/data/imagenet256_latents; samples are
decoded through the same VAE (config.data.decoder, default the one the dataset records).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = 'latents'
  c.data.latents_dir = ''   # required: where encode_latents wrote the dataset
  c.data.idx_dir = ''
  c.data.pixel_source = 'imagenet'
  c.data.pixel_size = 256
  c.data.pixel_channels = 3
  c.data.image_size = 32
  c.data.channels = 4
  c.data.num_classes = 1000
  c.data.worker_count = 8
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.sample_every_steps = 50_000
  c.sample.method = 'heun'
  c.sample.num_steps = 50
  c.sample.cfg_scale = 1.5
  c.sample.per_class = 4
  # FID50K with the FID Inception-v3 on decoded samples (user-supplied weights and reference
  # statistics; docs/evaluation.md).
  c.eval.num_samples = 50_000
  c.eval.features = 'inception'
  # Exact nearest neighbours over 1.28 M latents (21 GB) do not fit this code path.
  c.eval.memorization = False
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
