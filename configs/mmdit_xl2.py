"""MMDiT-XL/2 text-to-image on CC12M-scale data: SD-VAE latents (32×32×4) with captions.

  python -m pafm_jax.tools.pack_captions ...   # your (latent or image, caption) pairs
  python -m pafm_jax.main --config=configs/mmdit_xl2.py --workdir=gs://BUCKET/mmdit_xl2 \\
      --config.data.captioned_dir=/data/cc12m_latents

PAFM's paper trains MMDiT on CC12M (Stoica et al. 2026); the architecture is SD3's (Esser et
al. 2024) at SiT-XL/2's depth and width (28 blocks of 1152, 16 heads), with captions encoded
once by the text encoder (all-MiniLM-L6-v2 by default, 384 wide; set data.text_width and
data.max_tokens for another). docs/training.md lists its parameter count. The target is text
PAFM: the Gaussian likelihood plus cos(e(y_i), e(y_j))/τ of the candidates' own captions, over
the global batch and the retrieved neighbours of x_t/α_t (one partition: web captions have no
classes; label 0 for every pair, so data.num_classes = 1).
"""

from configs import imagenet_latents


def get_config():
  c = imagenet_latents.get_config()
  c.model.name = 'MMDiT-XL/2'
  c.model.remat = True
  c.data.name = 'captioned'
  c.data.captioned_dir = ''     # required: the packed dataset (pafm_jax.tools.pack_captions)
  c.data.num_classes = 1
  c.data.max_tokens = 77
  c.data.text_width = 384
  c.objective.name = 'pafm'
  c.objective.pafm.condition = 'text'
  c.objective.pafm.text_tau = 0.05
  c.objective.pafm.sources = 'batch+retrieved'
  c.objective.pafm.stratified = True
  c.retrieval.mode = 'noisy'
  c.retrieval.k = 16
  # Inception FID needs class-free reference statistics of the user's images; the class-wise
  # accuracy does not apply (one class).
  c.sample.per_class = 4
  return c
