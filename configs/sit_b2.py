"""SiT-B/2 (≈130 M parameters) on ImageNet-256 latents. SiT reports FID50K 33.0 at 400 K steps.

  python -m pafm_jax.main --config=configs/sit_b2.py --workdir=gs://BUCKET/sit_b2
"""

from configs import imagenet_latents


def get_config():
  c = imagenet_latents.get_config()
  c.model.name = 'SiT-B/2'
  return c
