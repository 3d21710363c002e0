"""The default job: class-conditional SiT on Fashion-MNIST pixels (28×28×1), on a laptop CPU.

  python -m pafm_jax.main --config=configs/fmnist_sit.py --workdir=runs/fmnist_sit

Trains in about 12 minutes on 2 CPU cores; see README.md for the measured speed, final loss
and the sample grid it produces.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.total_steps = 2_000
  c.global_batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.sample_every_steps = 1_000

  c.model.name = 'SiT-T/4'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.ema_decay = 0.999
  c.sample.cfg_scale = 1.5
  # PAFM over the whole global batch; FM is one override away: --config.objective.name=fm.
  c.objective.name = 'pafm'
  return c
