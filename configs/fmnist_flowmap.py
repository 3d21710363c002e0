"""A few-step flow map distilled from the default job's model (METHOD.md §5).

  make train                                   # the teacher, into runs/fmnist_sit
  python -m pafm_jax.main --config=configs/fmnist_flowmap.py --workdir=runs/fmnist_flowmap
  python -m pafm_jax.main --config=configs/fmnist_flowmap.py --workdir=runs/fmnist_flowmap \\
      --mode=eval --config.sample.num_steps=1   # any number of jumps, chosen at sampling time

The student starts from the teacher's EMA weights (its gap embedder at zero, so it starts as
one Euler step of the teacher) and learns φ_{s,t} from the teacher's guided velocity
(CFG 1.5 on t ≤ 0.7, as the teacher samples), so it samples guided at one pass per jump.
Loss: MeanFlow's identity with the teacher's velocity as v (the Eulerian condition
∂_s X + v·∇X = 0); `--config.objective.flow_map.loss=lmd` distils through the Lagrangian
condition ∂_t X = b(X, t) instead, at 2.1× the step time here.

Measured (2-core CPU, 2 000 samples, docs/experiments.md "Flow maps: FD against the number
of jumps"): FD 31.4 / 23.0 / 19.2 / 18.8 at
1 / 2 / 4 / 8 jumps, against 18.7 for the teacher's Heun 32 (64 NFE).
"""

from configs import fmnist_sit


def get_config():
  c = fmnist_sit.get_config()
  c.total_steps = 1_500
  c.checkpoint_every_steps = 250
  c.sample_every_steps = 500
  c.optimizer.learning_rate = 1e-3

  c.objective.name = 'flow_map'
  c.objective.flow_map.loss = 'meanflow'
  c.objective.flow_map.diagonal_target = 'teacher'
  # The diagonal is the teacher's velocity from the first step on: spend most rows on jumps.
  c.objective.flow_map.diagonal_fraction = 0.25
  c.objective.flow_map.teacher_workdir = 'runs/fmnist_sit'
  c.objective.flow_map.teacher_cfg_scale = 1.5
  c.objective.flow_map.teacher_guidance_interval = (0.0, 0.7)
  c.objective.flow_map.init_from_teacher = True
  # The teacher supplies the targets: no retrieval (nor its worker) is needed.
  c.retrieval.mode = 'none'
  c.data.worker_count = 0

  c.sample.method = 'flow_map'
  c.sample.num_steps = 2
  c.sample.cfg_scale = 1.0      # the guidance is in the weights
  return c
