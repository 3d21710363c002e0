"""Defaults shared by every pafm_jax experiment; the other configs override a few fields.

Not a job by itself: use configs/fmnist_sit.py, configs/sit_b2.py or configs/sit_xl2.py.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 400_000
  c.global_batch_size = 256
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.keep_checkpoints = 3
  c.sample_every_steps = 50_000

  # Device mesh ('data', 'fsdp'); -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  # Logical axis -> mesh axis (None = replicated). Parameters are FSDP-sharded along their
  # hidden dim; activations along the batch, which is split over both mesh axes.
  # StableVM's memory bank is split along its slots.
  c.logical_axis_rules = (
      ('embed', 'fsdp'),
      ('act_batch', ('data', 'fsdp')),
      ('bank_slot', ('data', 'fsdp')),
  )

  c.model = ml_collections.ConfigDict()
  c.model.name = 'SiT-XL/2'
  c.model.dtype = 'float32'      # compute dtype; parameters stay float32
  c.model.remat = False          # rematerialise each transformer block in the backward pass
  # REPA projector head for VA-REPA (METHOD.md §4). Not implemented yet: must stay False; an
  # imported REPA/StableVM checkpoint's projector weights are dropped while it is.
  c.model.projector = False

  c.objective = ml_collections.ConfigDict()
  c.objective.name = 'fm'
  c.objective.path = 'linear'
  c.objective.t_sampling = 'uniform'
  c.objective.label_drop = 0.1
  # PAFM (METHOD.md §3): posterior-mean target over candidate endpoints.
  c.objective.pafm = ml_collections.ConfigDict()
  c.objective.pafm.sources = 'batch'       # 'batch' | 'retrieved' | 'batch+retrieved'
  c.objective.pafm.stratified = False      # METHOD.md §3 stratified combination (both sources)
  c.objective.pafm.t_min = 0.0             # plain FM below this t
  c.objective.pafm.temperature = 1.0       # likelihood temperature; 1 = the exact posterior
  c.objective.pafm.condition = 'class'     # 'class' mask or 'text' similarity
  c.objective.pafm.text_tau = 0.1          # τ of the text term cos(e_i, e_j)/τ
  # StableVM (METHOD.md §4): SNIS over a per-class FIFO memory bank.
  c.objective.stablevm = ml_collections.ConfigDict()
  c.objective.stablevm.bank_capacity = 256  # samples per class (and in the null label's pool)
  c.objective.stablevm.bank_dtype = 'float32'
  c.objective.stablevm.t_min = 0.5
  c.objective.stablevm.temperature = 1.0

  # Retrieved posterior candidates delivered by the data pipeline as batch fields.
  c.retrieval = ml_collections.ConfigDict()
  c.retrieval.mode = 'none'                # 'none' | 'clean' (kNN of x0) | 'noisy' (of x_t/α_t)
  c.retrieval.k = 16                       # neighbours per sample

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0
  c.optimizer.ema_decay = 0.9999

  c.data = ml_collections.ConfigDict()
  c.data.name = 'fashion_mnist'
  c.data.idx_dir = '/usr/share/datasets/fashion-mnist'
  c.data.tfds_dir = ''           # '' = $PAFM_TFDS_DIR or ~/.cache/pafm_jax/tfds
  c.data.split = 'train'
  c.data.image_size = 28
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.worker_count = 0        # Grain worker processes (0 = in the main process)
  c.data.prefetch_buffer_size = 2

  c.sample = ml_collections.ConfigDict()
  c.sample.method = 'heun'
  c.sample.num_steps = 32
  c.sample.cfg_scale = 1.0
  c.sample.per_class = 8
  c.sample.use_ema = True
  return c
