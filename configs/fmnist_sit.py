"""The default job: class-conditional SiT on Fashion-MNIST pixels (28×28×1), on a laptop CPU.

  python -m pafm_jax.main --config=configs/fmnist_sit.py --workdir=runs/fmnist_sit

1 000 steps of batch 128: the budget at which `make train` finishes within 15 minutes, set-up
included, on the slower of this project's 2-core CPU machines. It was chosen from the FD-vs-steps
curves of experiments/fm_vs_pafm.py: the loop's learning rate is constant after warm-up, so this
run is exactly the 1 000-step checkpoint of that sweep's stratified-PAFM run.
docs/experiments.md has the curves; README.md the measured wall time and the sample grid.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.total_steps = 1_000
  c.global_batch_size = 128
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.sample_every_steps = 500

  c.model.name = 'SiT-T/4'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.ema_decay = 0.999
  c.sample.cfg_scale = 1.5
  # PAFM with METHOD.md §3's stratified combination: the whole global batch plus, for each
  # sample, the 16 training images of its class nearest to x_t/α_t, which ScaNN retrieves in
  # the data pipeline (a worker process, so it overlaps the step). The index is built into
  # <workdir>/retrieval_index on the first run (about 20 s). In-batch PAFM only:
  # --config.objective.pafm.sources=batch --config.objective.pafm.stratified=False
  # --config.retrieval.mode=none; FM: the same with --config.objective.name=fm.
  c.objective.name = 'pafm'
  c.objective.pafm.sources = 'batch+retrieved'
  c.objective.pafm.stratified = True
  c.retrieval.mode = 'noisy'
  c.retrieval.k = 16
  c.data.worker_count = 1
  return c
