"""FM against PAFM (in-batch and stratified) and StableVM on Fashion-MNIST, at equal budgets.

  python -m experiments.fm_vs_pafm --workdir=runs/fm_vs_pafm          # 2-core CPU: ≈ 7 h
  python -m experiments.fm_vs_pafm --workdir=runs/fm_vs_pafm_full --full   # GPU/TPU budget

Every method trains the same model with the same data pipeline (configs/fmnist_sit.py; any
--config.* override applies to all of them) for the same steps with the same seeds; a seed
fixes the initialisation, the data order and the training noise, so seed s of one method is
paired with seed s of another. Each run is checkpointed at every --eval_every steps and at
its last step, and every checkpoint's EMA weights are scored with the same sampler and the
same sampling noise (a function of the seed only): FD in the domain classifier's features,
conditional accuracy, k-NN precision and recall, and memorisation
(pafm_jax/evaluation/runner.py).

Writes into --workdir:
  results.md        mean ± std over seeds per method at the last checkpoint, each metric's
                    sampling-noise floor, every metric paired with FM's seed by seed (95 %
                    intervals), FD at every checkpoint (also paired), and the steps each
                    method needs to reach the FD FM reaches at each of its checkpoints
  results.json      the settings, every run's raw metrics and timings, and the summary
  fd_vs_steps.png   FD against training steps (mean and a ± std band per method) beside FD − FM
                    paired by seed with its 95 % intervals and FD's sampling-noise band
  retrieval_index/  the ScaNN index of the training set, built once for stratified PAFM
  runs/<method>_seed<s>/   each run's train workdir, plus spec.json (its config),
                    evals.json (metrics per evaluated step, cached as they come) and
                    result.json (written last: a run that has it is skipped on a re-run)

The data-limited regime is the same sweep on class-balanced training subsets, one workdir per
size, then one table over them:

  python -m experiments.fm_vs_pafm --workdir=runs/subset_60 --methods=fm,pafm_stratified \
      --config.data.subset_per_class=60
  python -m experiments.fm_vs_pafm --workdir=runs/data_limited \
      --data_limited=runs/subset_60,runs/subset_600,runs/fm_vs_pafm

A killed sweep continues where it stopped when started again with the same flags: training
resumes from the run's latest checkpoint and evaluated checkpoints are not evaluated again.
Starting it with other settings in the same workdir is refused.

A sweep longer than one machine's lease (a preemptible VM, a time-limited session) keeps its
finished runs in --records, a small directory that can be committed or copied to a bucket:
each finished run's spec.json, evals.json and result.json, plus the tables and the plot. A
run found there is not trained again (its settings are still checked), so the sweep can go on
from any machine with an empty --workdir:

  python -m experiments.fm_vs_pafm --workdir=/tmp/fm_vs_pafm \
      --records=experiments/results/fm_vs_pafm_2000 --seeds=2
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

from absl import app, flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from configs import base as base_config
from pafm_jax import checkpointing, config_checks, logs, train, train_state
from pafm_jax.evaluation import statistics


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each method sets every field that tells the methods apart, so a method's config does not
# depend on which of them the base config happens to be (the default job is stratified PAFM).
_NO_RETRIEVAL = {'objective.pafm.sources': 'batch', 'objective.pafm.stratified': False,
                 'retrieval.mode': 'none'}
METHODS: dict[str, dict[str, Any]] = {
    'fm': {'objective.name': 'fm', **_NO_RETRIEVAL},
    'pafm_batch': {'objective.name': 'pafm', **_NO_RETRIEVAL},
    'pafm_stratified': {'objective.name': 'pafm', 'objective.pafm.sources': 'batch+retrieved',
                        'objective.pafm.stratified': True, 'retrieval.mode': 'noisy',
                        'retrieval.k': 16},
    'stablevm': {'objective.name': 'stablevm', **_NO_RETRIEVAL},
}

# (key in the metrics, column title, format, better) for the tables.
METRICS = (
    ('fd', 'FD ↓', '.2f'),
    ('fd_train', 'FD vs its training subset ↓', '.2f'),
    ('accuracy', 'accuracy ↑', '.3f'),
    ('precision', 'precision ↑', '.3f'),
    ('recall', 'recall ↑', '.3f'),
    ('memorized_fraction', 'memorised ↓', '.4f'),
    ('nn_ratio_median', 'median NN ratio', '.3f'),
)
# Shares of per-sample indicators: their sampling noise has the binomial closed form, used for
# evaluations made before every metric carried a bootstrap floor.
SHARES = ('accuracy', 'precision', 'memorized_fraction')
# Every seed's checkpoints are sampled from this one noise stream, so the FD differences
# between methods and between steps carry less sampling noise than independent draws would.
EVAL_STREAM = 0xE7A1
# Resamples of each evaluation's FD noise floor (pafm_jax/evaluation/statistics.py).
FD_BOOTSTRAP = 100


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every run of the sweep gets; the same for each method."""
  steps: int                  # training steps of every run
  eval_every: int             # checkpoint and evaluate every so many steps (and at the end)
  eval_samples: int           # class-balanced samples per evaluation
  seeds: tuple[int, ...]
  sampler: str                # config.sample.method
  sampler_steps: int          # config.sample.num_steps
  memorization_max_train: int  # training images searched for the nearest ones (0: all)


# The budget that can decide, sized on this project's 2-core CPU: 33–37 min a run alone (about
# 15 min of training, four evaluations of 4–5 min), 12 runs ≈ 7 h. 400 steps and 1 000
# samples could not tell the objectives apart: the models were far from the regime where the
# target's variance limits them, and FD's sampling noise was the size of the effect. At the
# default job's earlier 2 000 steps (batch 128) with 5 000 samples, FD's noise floor is ≈ 0.5.
# Euler 32 came within 1.6 FD of SiT's dopri5 (64 NFE) on the default model at half its NFE
# (docs/evaluation.md "FD against NFE").
REDUCED = Budget(steps=2_000, eval_every=500, eval_samples=5_000, seeds=(0, 1, 2),
                 sampler='euler', sampler_steps=32, memorization_max_train=0)
# An accelerator's budget: 10× the default job's steps, 10 K samples per evaluation (the
# --mode=eval default) with its Heun 32 sampler (64 NFE), 5 seeds.
FULL = Budget(steps=20_000, eval_every=2_000, eval_samples=10_000, seeds=(0, 1, 2, 3, 4),
              sampler='heun', sampler_steps=32, memorization_max_train=0)

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags, defined only when this file runs as a program: the tests
  import it next to other modules that define --config and --workdir."""
  config_flags.DEFINE_config_file(
      'config', os.path.join(_REPO, 'configs', 'fmnist_sit.py'),
      'The base config every method starts from (its --config.* overrides apply to all).')
  flags.DEFINE_string('workdir', None, 'Where the runs, tables and plot go.')
  flags.DEFINE_list('methods', list(METHODS), f'Methods to compare, of {list(METHODS)}.')
  flags.DEFINE_bool('full', False, 'The accelerator budget (FULL) instead of the reduced CPU one '
                    '(REDUCED); the flags below override either.')
  flags.DEFINE_integer('steps', None, 'Training steps per run.')
  flags.DEFINE_integer('eval_every', None, 'Evaluate every so many steps (and at the last).')
  flags.DEFINE_integer('eval_samples', None, 'Samples per evaluation.')
  flags.DEFINE_list('seeds', None, 'Seeds (config.seed), e.g. 0,1,2.')
  flags.DEFINE_string('sampler', None, 'config.sample.method of every evaluation.')
  flags.DEFINE_integer('sampler_steps', None, 'config.sample.num_steps of every evaluation.')
  flags.DEFINE_list('data_limited', None,
                    'Instead of training: workdirs of finished sweeps that differ in their '
                    'training subset (--config.data.subset_per_class); writes their joint '
                    'table to --workdir/data_limited.md.')
  flags.DEFINE_string('records', None,
                      'A directory that keeps every finished run\'s record (spec, metrics) and '
                      'the tables, and whose runs are not trained again; small enough to commit.')
  flags.DEFINE_integer('memorization_max_train', None,
                       'Training images searched by the memorisation metric (0: all).')
  flags.mark_flags_as_required(['workdir'])


# ----------------------------------------------------------------------------- configs


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def method_config(base: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """A copy of `base` with the method's overrides (METHODS)."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; choose from {list(METHODS)}.')
  config = base.copy_and_resolve_references()
  for dotted, value in METHODS[method].items():
    _set(config, dotted, value)
  return config


def eval_steps(budget: Budget) -> list[int]:
  """The evaluated (and kept) checkpoints: every eval_every steps, and the last step."""
  steps = list(range(budget.eval_every, budget.steps + 1, budget.eval_every))
  if not steps or steps[-1] != budget.steps:
    steps.append(budget.steps)
  return steps


def run_config(base: ml_collections.ConfigDict, method: str, seed: int,
               budget: Budget) -> ml_collections.ConfigDict:
  """The config of one run: the method's config with the sweep's budget and the seed."""
  config = method_config(base, method)
  config.seed = seed
  config.total_steps = budget.steps
  # The loop saves at multiples of the interval and at its last step: exactly eval_steps.
  config.checkpoint_every_steps = budget.eval_every
  config.keep_checkpoints = len(eval_steps(budget))
  config.sample_every_steps = budget.steps   # one sample grid, at the end
  config.eval.every_steps = 0                # evaluated here, after training
  config.eval.num_samples = budget.eval_samples
  config.eval.memorization_max_train = budget.memorization_max_train
  config.eval.fd_bootstrap = FD_BOOTSTRAP
  config.sample.method = budget.sampler
  config.sample.num_steps = budget.sampler_steps
  return config


def resolve_budget(full: bool, **overrides: Any) -> Budget:
  """REDUCED or FULL with the given fields replaced (None: keep the preset's)."""
  budget = FULL if full else REDUCED
  budget = dataclasses.replace(budget, **{k: v for k, v in overrides.items() if v is not None})
  if budget.steps < 1 or budget.eval_every < 1 or budget.eval_samples < 2:
    raise ValueError(f'--steps and --eval_every must be ≥ 1 and --eval_samples ≥ 2: {budget}')
  if not budget.seeds or len(set(budget.seeds)) != len(budget.seeds):
    raise ValueError(f'--seeds must be distinct and non-empty, got {budget.seeds}.')
  return budget


# ------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> dict[str, Any]:
  """Mean and sample standard deviation (ddof = 1; None for a single value) of per-seed
  numbers."""
  x = np.asarray(values, np.float64)
  return {'mean': float(np.mean(x)), 'std': float(np.std(x, ddof=1)) if len(x) > 1 else None,
          'n': len(x)}


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, dict]]]:
  """{method: {step: {metric: mean_std over the seeds}}} of the runs' metrics."""
  out: dict[str, dict] = {}
  for method in dict.fromkeys(r['method'] for r in runs):
    mine = [r for r in runs if r['method'] == method]
    out[method] = {}
    for step in mine[0]['metrics']:
      # Only what every run reports: runs evaluated by an older version may lack a metric.
      names = [k for k in mine[0]['metrics'][step]
               if all(k in r['metrics'][step] for r in mine)]
      out[method][step] = {k: mean_std([r['metrics'][step][k] for r in mine]) for k in names}
  return out


def paired_differences(runs: list[dict], metric: str, baseline: str,
                       step: str) -> dict[str, dict]:
  """{method: statistics.paired_difference of metric(method, seed) − metric(baseline, seed)}
  over shared seeds: mean, std (ddof = 1) and the 95 % Student-t interval of the mean."""
  base = {r['seed']: r['metrics'][step][metric] for r in runs if r['method'] == baseline}
  out = {}
  for method in dict.fromkeys(r['method'] for r in runs):
    if method == baseline:
      continue
    pairs = [(r['metrics'][step][metric], base[r['seed']])
             for r in runs if r['method'] == method and r['seed'] in base]
    if pairs:
      out[method] = statistics.paired_difference(*zip(*pairs))
  return out


def all_paired_differences(runs: list[dict], baseline: str = 'fm') -> dict[str, dict]:
  """{step: {metric: {method: paired difference to the baseline}}} for every checkpoint and
  every metric of METRICS the runs report there."""
  out: dict[str, dict] = {}
  for step in runs[0]['metrics']:
    out[step] = {}
    for metric, _, _ in METRICS:
      if all(metric in r['metrics'].get(step, {}) for r in runs):
        out[step][metric] = paired_differences(runs, metric, baseline, step)
  return out


def noise_floor(runs: list[dict], metric: str, step: str,
                num_samples: int) -> tuple[float, str] | None:
  """(sampling-noise sd of one evaluation of `metric`, how it was obtained): the mean of the
  runs' bootstrap floors (runs evaluated by an older version have none); without any, a
  share's binomial √(p(1 − p)/N); None when neither is known."""
  key = f'{metric}_noise_std'
  scored = [r['metrics'][step] for r in runs if metric in r['metrics'].get(step, {})]
  if not scored:
    return None
  measured = [m[key] for m in scored if key in m]
  if measured:
    how = 'halves of the samples' if metric == 'recall' else 'bootstrap over the samples'
    if len(measured) < len(scored):
      how += f' ({len(measured)} of the {len(scored)} runs)'
    return float(np.mean(measured)), how
  if metric in SHARES:
    return (float(np.mean([np.sqrt(m[metric] * (1 - m[metric]) / num_samples)
                           for m in scored])), 'binomial √(p(1 − p)/N)')
  return None


def steps_to_fd(steps: list[int], fds: list[float], target: float) -> float | None:
  """The first training step at which a run's FD curve reaches `target`, linearly interpolated
  between its checkpoints (the first checkpoint's step if it starts below); None if never."""
  for i, (step, fd) in enumerate(zip(steps, fds)):
    if fd <= target:
      if i == 0:
        return float(step)
      s0, f0 = steps[i - 1], fds[i - 1]
      return float(s0 + (f0 - target) / (f0 - fd) * (step - s0))
  return None


def convergence(runs: list[dict], target: float) -> dict[str, dict]:
  """{method: steps to reach FD `target` (mean ± std over the seeds that reach it), and how
  many of its seeds do}: the 'trains faster' claim, read off the same FD curves."""
  out = {}
  for method in dict.fromkeys(r['method'] for r in runs):
    reached = []
    mine = [r for r in runs if r['method'] == method]
    for r in mine:
      steps = sorted(int(k) for k in r['metrics'])
      hit = steps_to_fd(steps, [r['metrics'][str(k)]['fd'] for k in steps], target)
      if hit is not None:
        reached.append(hit)
    out[method] = {**(mean_std(reached) if reached else {'mean': None, 'std': None}),
                   'reached': len(reached), 'seeds': len(mine)}
  return out


def _pm(stat: dict | None, fmt: str) -> str:
  if stat is None:
    return '—'
  if stat['std'] is None:
    return f'{stat["mean"]:{fmt}}'
  text = f'{stat["mean"]:{fmt}} ± {stat["std"]:{fmt.lstrip("+")}}'
  if stat.get('low') is not None:  # a paired difference: its 95 % interval
    text += f' [{stat["low"]:{fmt}}, {stat["high"]:{fmt}}]'
  return text


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
  return (['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
          + ['| ' + ' | '.join(r) + ' |' for r in rows])


def markdown(results: dict) -> str:
  """results.md: the last checkpoint's metrics, each metric's sampling-noise floor, the paired
  differences to FM (every metric at the last checkpoint, FD at every checkpoint), FD at every
  checkpoint and the steps to reach the FD FM reaches at each of its checkpoints."""
  s, summary, runs = results['settings'], results['summary'], results['runs']
  last = str(s['steps'])
  seeds = ', '.join(str(x) for x in s['seeds'])
  subset = s.get('subset_per_class', 0)
  data = (f'a class-balanced subset of {subset} training images per class' if subset
          else 'the whole training split')
  lines = [
      f'# FM vs PAFM on Fashion-MNIST ({s["model"]}, batch {s["batch_size"]})', '',
      f'{s["steps"]} training steps per run on {data}, seeds {seeds}; each checkpoint scored '
      f'on {s["eval_samples"]} class-balanced samples of its EMA weights, {s["sampler"]} '
      f'{s["sampler_steps"]} steps ({s["nfe"]} NFE), CFG {s["cfg_scale"]} on t ∈ '
      f'{tuple(s["guidance_interval"])}; features {", ".join(s["fingerprints"])}. '
      'Mean ± sample std (ddof = 1) over seeds.', '']
  if len(s['fingerprints']) > 1:
    lines += ['**Warning: these runs were scored with different classifiers, so their FDs are '
              'in different feature spaces and do not compare.**', '']
  lines += [f'## At the last checkpoint (step {last})', '']
  metrics = [m for m in METRICS if m[0] in next(iter(summary.values()))[last]]
  rows = []
  for method, by_step in summary.items():
    mine = [r for r in runs if r['method'] == method]
    rows.append([method] + [_pm(by_step[last].get(k), fmt) for k, _, fmt in metrics]
                + [str(len(mine)), f'{np.mean([r["seconds"]["train"] for r in mine]):.0f}'])
  lines += _table(['method'] + [m[1] for m in metrics] + ['seeds', 'train s/run'], rows)

  lines += ['', '## Sampling-noise floor of one evaluation', '',
            f'How much a metric moves when only the {s["eval_samples"]} samples change (mean over '
            f'the runs at step {last}). Two independent evaluations differ by more than '
            '1.96·√2 floors 5 % of the time from the samples alone, a mean over n seed pairs by '
            'more than 1.96·√(2/n) floors; the shared sampling noise of the sweep makes the '
            'real floor of a paired difference lower still. A share seen 0 times in N samples '
            'has a zero floor but a 95 % upper bound of 3/N.', '']
  rows = []
  for key, title, fmt in metrics:
    floor = noise_floor(runs, key, last, s['eval_samples'])
    finer = f'.{int(fmt[1:-1]) + 1}f'   # one digit more than the metric's own
    rows.append([title.rstrip(' ↑↓')] + ([f'{floor[0]:{finer}}', floor[1]] if floor
                                          else ['—', 'not measured']))
  lines += _table(['metric', 'noise sd', 'from'], rows)

  paired = results.get('paired_to_fm')
  if paired and paired.get(last):
    lines += ['', f'## Paired by seed: method − FM at step {last}', '',
              'Mean ± std of the per-seed differences [95 % Student-t interval over seeds]. '
              'An interval that excludes 0 is a difference the seeds agree on; of the many '
              'intervals below about 1 in 20 excludes 0 by chance alone, so FD at the last '
              'checkpoint is the comparison that decides, the others describe it.', '']
    cols = [m for m in metrics if m[0] in paired[last]]
    rows = [[method] + [_pm(paired[last][k].get(method), '+' + fmt) for k, _, fmt in cols]
            for method in summary if method != 'fm']
    lines += _table(['method'] + [m[1] for m in cols], rows)
    steps = [k for k in paired if 'fd' in paired[k]]
    lines += ['', '## FD − FM, paired by seed, at every checkpoint', '']
    rows = [[method] + [_pm(paired[k]['fd'].get(method), '+.2f') for k in steps]
            for method in summary if method != 'fm']
    lines += _table(['method'] + [f'step {k}' for k in steps], rows)

  steps = list(next(iter(summary.values())))
  lines += ['', '## FD at every checkpoint', '']
  lines += _table(['method'] + [f'step {k}' for k in steps],
                  [[method] + [_pm(by_step[k]['fd'], '.2f') for k in steps]
                   for method, by_step in summary.items()])
  if results.get('convergence'):
    lines += ['', "## Steps to reach the FD FM reaches at each checkpoint", '',
              'Read off the FD curves, linearly interpolated between checkpoints; mean ± std '
              'over the seeds that reach it (how many, in brackets). A method below FM\'s own '
              'step trains faster to that quality.', '']
    targets = results['convergence']
    rows = []
    for method in summary:
      cells = [method]
      for c in targets:
        stat = c['steps'][method]
        cells.append((_pm(stat, '.0f') if stat['mean'] is not None else 'not reached')
                     + f' ({stat["reached"]}/{stat["seeds"]})')
      rows.append(cells)
    lines += _table(['method'] + [f'FD {c["target"]:.2f} (FM at step {c["fm_step"]})'
                                  for c in targets], rows)
  return '\n'.join(lines) + '\n'


# The data-limited table's columns: (metric, title, format).
DATA_LIMITED = (('fd', 'FD vs test ↓', '.2f'), ('fd_train', 'FD vs its training images', '.2f'),
                ('memorized_fraction', 'memorised', '.4f'),
                ('nn_ratio_median', 'median NN ratio', '.3f'), ('accuracy', 'accuracy ↑', '.3f'))


def data_limited_markdown(sweeps: list[dict]) -> str:
  """One table over sweeps that differ in their training set (config.data.subset_per_class),
  smallest first: each method's metrics at its last checkpoint, and each method's paired
  difference to FM (by seed) of the same metrics."""
  def size(results):
    s = results['settings']
    per_class = s.get('subset_per_class', 0)
    return per_class * s.get('num_classes', 10) if per_class else float('inf')

  for results in sweeps:
    if 'subset_per_class' not in results['settings']:
      raise ValueError('a results.json without settings.subset_per_class was written by an older '
                       'version: run that sweep\'s command again (it only re-aggregates).')
  features = sorted({f for results in sweeps for f in results['settings']['fingerprints']})
  if len(features) > 1:
    raise ValueError(f'these sweeps were scored with different classifiers ({features}), so '
                     'their FDs do not compare: score them with one (for example, pass the '
                     'first sweep\'s <records>/classifier as --config.eval.classifier_dir).')
  lines = ['# The data-limited regime: FM and PAFM on class-balanced training subsets', '',
           'Each row: mean ± std over seeds at the last checkpoint (a single seed shows its '
           'value); FD vs test is against the test split, FD vs its training images against '
           'the subset the run trained on, memorisation against that subset too. The '
           'difference rows are method − FM paired by seed [95 % interval with ≥ 2 seeds].', '']
  head = ['training images', 'method', 'steps', 'seeds'] + [t for _, t, _ in DATA_LIMITED]
  # The methods every sweep ran (the whole-split sweep may hold more).
  shared = [m for m in sweeps[0]['summary'] if all(m in r['summary'] for r in sweeps)]
  rows = []
  for results in sorted(sweeps, key=size):
    s, summary = results['settings'], results['summary']
    last = str(s['steps'])
    images = f'{size(results):,}' if size(results) != float('inf') else 'whole split'
    paired = (all_paired_differences([r for r in results['runs'] if r['method'] in shared])[last]
              if 'fm' in shared and len(shared) > 1 else {})
    for method in shared:
      by_step = summary[method]
      n = sum(1 for r in results['runs'] if r['method'] == method)
      rows.append([images, method, last, str(n)]
                  + [_pm(by_step[last].get(k), fmt) for k, _, fmt in DATA_LIMITED])
      if method != 'fm' and paired:
        rows.append([images, f'{method} − fm', last, str(n)]
                    + [_pm(paired[k].get(method), '+' + fmt) if k in paired else '—'
                       for k, _, fmt in DATA_LIMITED])
  return '\n'.join(lines + _table(head, rows)) + '\n'


def plot(results: dict, filename: str) -> None:
  """FD against steps (the mean over seeds per method with a ± std band) and, with FM in the
  sweep, each method's FD − FM paired by seed with its 95 % interval."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paired = results.get('paired_to_fm')
  fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(12.0 if paired else 6.4, 4.2),
                           squeeze=False)
  ax = axes[0, 0]
  colors = {}
  for method, by_step in results['summary'].items():
    steps = np.array([int(k) for k in by_step])
    mean = np.array([by_step[k]['fd']['mean'] for k in by_step])
    std = np.array([by_step[k]['fd']['std'] or 0.0 for k in by_step])
    line, = ax.plot(steps, mean, marker='o', label=method)
    colors[method] = line.get_color()
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  s = results['settings']
  ax.set_yscale('log')
  # Plain numbers on the log axis: the FDs of a short run span less than a decade.
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel('training step')
  ax.set_ylabel('FD (domain-classifier features)')
  ax.set_title(f'Fashion-MNIST, {s["model"]}: mean ± std over {len(s["seeds"])} seeds')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  if paired:
    ax = axes[0, 1]
    methods = [m for m in results['summary'] if m != 'fm']
    width = 0.6 * s['eval_every'] / max(len(methods), 1)
    for i, method in enumerate(methods):
      steps, mean, low, high = [], [], [], []
      for step, by_metric in paired.items():
        d = by_metric.get('fd', {}).get(method)
        if d is None:
          continue
        steps.append(int(step) + (i - (len(methods) - 1) / 2) * width)
        mean.append(d['mean'])
        low.append(d['mean'] - (d['low'] if d['low'] is not None else d['mean']))
        high.append((d['high'] if d['high'] is not None else d['mean']) - d['mean'])
      ax.errorbar(steps, mean, yerr=[low, high], fmt='o', capsize=3, color=colors[method],
                  label=method)
    ax.axhline(0.0, color='black', linewidth=0.8)
    # FD's sampling noise for a mean over n seed pairs of independent evaluations, from each
    # checkpoint's own floor (it grows with FD); the sweep's shared sampling noise makes the
    # real floor lower still.
    pairs = sum(1 for r in results['runs'] if r['method'] == 'fm')
    steps, bands = [], []
    for step in paired:
      floor = noise_floor(results['runs'], 'fd', step, s.get('eval_samples', 0))
      if floor:
        steps.append(int(step))
        bands.append(1.96 * np.sqrt(2 / max(pairs, 1)) * floor[0])
    if steps:
      bands = np.array(bands)
      ax.fill_between(steps, -bands, bands, color='gray', alpha=0.15,
                      label=f'FD sampling noise of a mean over {pairs} seed pair(s) (95 %)')
    ax.set_xlabel('training step')
    ax.set_ylabel('FD − FM (same seed)')
    ax.set_title('paired by seed: mean and 95 % t interval')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(filename, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------- runs


def _json_normal(config: ml_collections.ConfigDict) -> dict:
  """The config as JSON would give it back (tuples become lists), for comparisons."""
  return json.loads(config.to_json_best_effort())


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)   # a kill never leaves a half-written file behind


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def with_new_defaults(saved: Any, current: Any, defaults: Any) -> Any:
  """`saved` with the fields it lacks taken from `current` where `current` holds the base
  config's default: a field added to the framework after a run started (with its default,
  so without changing what the run computes) must not make the run unresumable."""
  if not (isinstance(saved, dict) and isinstance(current, dict)):
    return saved
  defaults = defaults if isinstance(defaults, dict) else {}
  filled = {}
  for key, value in saved.items():
    filled[key] = with_new_defaults(value, current.get(key), defaults.get(key))
  for key, value in current.items():
    if key not in saved and key in defaults and defaults[key] == value:
      filled[key] = value
  return filled


def _without_local_paths(spec: dict) -> dict:
  """The spec without where this machine keeps the sweep's retrieval index and classifier: the
  index is a function of the training data (its key and ScaNN settings are compared), so a
  run recorded on one machine stays valid for a sweep continued on another."""
  spec = json.loads(json.dumps(spec))
  spec.get('config', {}).get('retrieval', {}).pop('index_dir', None)
  # Which classifier scored a run is recorded as its features' fingerprint, and the sweep
  # refuses to mix fingerprints: where the classifier is stored does not matter.
  spec.get('config', {}).get('eval', {}).pop('classifier_dir', None)
  return spec


RECORD_FILES = ('spec.json', 'evals.json', 'result.json')
SWEEP_FILES = ('results.json', 'results.md', 'fd_vs_steps.png')


def _copy_files(source: str, target: str, names: tuple[str, ...]) -> None:
  """Copies those of `names` that exist; each lands under a temporary name first, so a
  failure never leaves a truncated record that a later sweep would take as finished."""
  os.makedirs(target, exist_ok=True)
  for name in names:
    if os.path.exists(os.path.join(source, name)):
      partial = os.path.join(target, f'.{name}.partial')
      shutil.copyfile(os.path.join(source, name), partial)
      os.replace(partial, os.path.join(target, name))


def _first_difference(a: Any, b: Any, prefix: str = '') -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if a.get(k) != b.get(k):
        return _first_difference(a.get(k), b.get(k), f'{prefix}{k}.')
  return f'{prefix[:-1]}: saved {a!r}, now {b!r}'


class Scorer:
  """The evaluation shared by every run (one model, one sampler), built on first use so a
  sweep whose runs are all finished needs neither the classifier nor a compiled sampler."""

  def __init__(self, config: ml_collections.ConfigDict, log: Callable[[str], None],
               features: set[str] | frozenset[str] = frozenset()):
    self.config = config
    self.log = log
    self.features = set(features)   # the fingerprints the finished runs were scored with
    self._built = None

  def check_features(self) -> None:
    """Builds the evaluation and refuses a classifier other than the finished runs' one:
    FDs in different feature spaces cannot be compared, and retraining the classifier on
    another machine need not reproduce its weights."""
    if self._built is None:
      self._build()
    fingerprint = self._built[0].extractor.fingerprint
    if self.features and fingerprint not in self.features:
      raise ValueError(
          f'the finished runs were scored with features {sorted(self.features)}, but the '
          f'classifier at hand has {fingerprint}. Give the sweep the classifier they used '
          '(--config.eval.classifier_dir; --records keeps it in <records>/classifier), or '
          'start a new sweep.')

  def _build(self):
    from pafm_jax.evaluation import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
    from pafm_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
    config = self.config
    directory = classifier_lib.default_directory(config)
    if config.eval.features == 'classifier' and not os.path.exists(
        os.path.join(directory, classifier_lib.INFO_FILE)):
      self.log(f'no domain classifier at {directory}: training it first '
               f'({config.eval.classifier_epochs} epochs)')
      info = classifier_lib.train(config)
      self.log(f'domain classifier: test accuracy {info["test_accuracy"]:.4f}, fingerprint '
               f'{info["fingerprint"]}')
    mesh = config_checks.validated_mesh(config)
    setup = train_state.TrainSetup.create(config, mesh)
    evaluator = runner.Evaluator(config, setup.net, mesh)
    self._built = (evaluator, setup.sharded_abstract_state()['ema_params'])

  def __call__(self, workdir: str, step: int, seed: int) -> tuple[dict, dict, str]:
    """(metrics, seconds, feature fingerprint) of checkpoint `step` of the run in workdir."""
    if self._built is None:
      self.check_features()
    evaluator, abstract = self._built
    params, _ = checkpointing.restore_params(workdir, abstract,
                                             use_ema=self.config.sample.use_ema, step=step)
    rng = jax.random.fold_in(jax.random.key(seed), EVAL_STREAM)
    out = evaluator.evaluate(params, rng)
    return out['metrics'], out['seconds'], evaluator.extractor.fingerprint


def run_one(config: ml_collections.ConfigDict, method: str, budget: Budget, workdir: str,
            score: Callable, log: Callable[[str], None]) -> dict:
  """Trains (or resumes) one run and scores its checkpoints; returns its result record."""
  os.makedirs(workdir, exist_ok=True)
  spec_path = os.path.join(workdir, 'spec.json')
  spec = {'method': method, 'seed': int(config.seed), 'eval_steps': eval_steps(budget),
          'config': _json_normal(config)}
  if os.path.exists(spec_path):
    defaults = {'config': _json_normal(base_config.get_config())}
    portable = _without_local_paths(spec)
    saved = with_new_defaults(_without_local_paths(_read_json(spec_path)), portable, defaults)
    if saved != portable:
      raise ValueError(f'{workdir} holds a run with other settings '
                       f'({_first_difference(saved, portable)}); use a new --workdir.')
  else:
    _write_json(spec_path, spec)
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path):
    return _read_json(result_path)

  t0 = time.time()
  train.train_and_evaluate(config, workdir)
  train_seconds = time.time() - t0
  log(f'  trained {budget.steps} steps in {train_seconds:.0f} s')

  evals_path = os.path.join(workdir, 'evals.json')
  evals = _read_json(evals_path) if os.path.exists(evals_path) else {}
  evals.setdefault('train_seconds', 0.0)
  evals['train_seconds'] += train_seconds   # summed over resumptions
  evals.setdefault('steps', {})
  for step in eval_steps(budget):
    if str(step) in evals['steps']:
      continue
    t1 = time.time()
    metrics, seconds, fingerprint = score(workdir, step, int(config.seed))
    evals['steps'][str(step)] = {'metrics': metrics, 'seconds': seconds,
                                 'fingerprint': fingerprint}
    _write_json(evals_path, evals)
    log(f'  step {step}: FD {metrics["fd"]:.2f}, accuracy {metrics.get("accuracy", np.nan):.3f}, '
        f'precision {metrics.get("precision", np.nan):.3f}, '
        f'recall {metrics.get("recall", np.nan):.3f}, '
        f'memorised {metrics.get("memorized_fraction", np.nan):.4f} ({time.time() - t1:.0f} s)')

  done = evals['steps']
  result = {
      'method': method, 'seed': int(config.seed),
      'metrics': {k: v['metrics'] for k, v in done.items()},
      'seconds': {'train': round(evals['train_seconds'], 1),
                  'eval': {k: v['seconds'] for k, v in done.items()}},
      'fingerprint': sorted({v['fingerprint'] for v in done.values()}),
  }
  _write_json(result_path, result)
  # Only the evaluated numbers matter now; the last checkpoint is kept for sampling.
  ckpt_root = os.path.join(workdir, 'checkpoints')
  for name in os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []:
    if name.isdigit() and int(name) != budget.steps:
      shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
  return result


def _restore_records(run_dirs: dict, record_dirs: dict) -> set[str]:
  """Copies the runs finished in their record directories into their run directories (where
  not finished there already); returns the feature fingerprints the finished runs were
  scored with."""
  features = set()
  for key, run_dir in run_dirs.items():
    record_dir = record_dirs.get(key)
    if (record_dir and os.path.exists(os.path.join(record_dir, 'result.json'))
        and not os.path.exists(os.path.join(run_dir, 'result.json'))):
      _copy_files(record_dir, run_dir, RECORD_FILES)
    if os.path.exists(os.path.join(run_dir, 'result.json')):
      features.update(_read_json(os.path.join(run_dir, 'result.json')).get('fingerprint', []))
  return features


def sweep(base: ml_collections.ConfigDict, budget: Budget, methods: list[str], workdir: str, *,
          log: Callable[[str], None] = print, score: Callable | None = None,
          records: str | None = None) -> dict:
  """Runs (or skips, when finished) every method × seed, then writes the tables and plot.

  Seed-major order: a sweep stopped early still compares every method on its first seeds.
  `records`: a directory mirroring each finished run's record (RECORD_FILES) and the sweep's
  tables (SWEEP_FILES); a run recorded there is taken as finished.
  """
  for m in methods:
    method_config(base, m)   # an unknown method fails before any training
  os.makedirs(workdir, exist_ok=True)
  if not base.retrieval.index_dir:
    # One retrieval index for the whole sweep: it depends on the data, not on the run.
    base = base.copy_and_resolve_references()
    base.retrieval.index_dir = os.path.join(os.path.abspath(workdir), 'retrieval_index')
  if records and base.eval.features == 'classifier' and not base.eval.classifier_dir:
    # The domain classifier defines FD's feature space, so it is kept with the records: a
    # sweep continued on another machine scores in the same space.
    base = base.copy_and_resolve_references()
    base.eval.classifier_dir = os.path.join(os.path.abspath(records), 'classifier')
  plan = [(seed, m) for seed in budget.seeds for m in methods]
  configs = {(seed, m): run_config(base, m, seed, budget) for seed, m in plan}
  run_dirs = {(seed, m): os.path.join(workdir, 'runs', f'{m}_seed{seed}') for seed, m in plan}
  record_dirs = {(seed, m): os.path.join(records, 'runs', f'{m}_seed{seed}')
                 for seed, m in plan} if records else {}
  features = _restore_records(run_dirs, record_dirs)
  score = score or Scorer(configs[plan[0]], log, features)
  if isinstance(score, Scorer) and features and any(
      not os.path.exists(os.path.join(d, 'result.json')) for d in run_dirs.values()):
    score.check_features()   # before any training, not after the first run
  runs, spent = [], []
  for i, (seed, method) in enumerate(plan):
    run_dir, record_dir = run_dirs[(seed, method)], record_dirs.get((seed, method))
    finished = os.path.exists(os.path.join(run_dir, 'result.json'))
    log(f'[{i + 1}/{len(plan)}] {method}, seed {seed}: '
        f'{"finished earlier, skipped" if finished else "training"}')
    t0 = time.time()
    runs.append(run_one(configs[(seed, method)], method, budget, run_dir, score, log))
    if record_dir:
      _copy_files(run_dir, record_dir, RECORD_FILES)
    if not finished:
      spent.append(time.time() - t0)
      left = sum(1 for s, m in plan[i + 1:]
                 if not os.path.exists(os.path.join(workdir, 'runs', f'{m}_seed{s}',
                                                    'result.json')))
      log(f'  run took {spent[-1]:.0f} s; sweep ETA {left * np.mean(spent) / 60:.1f} min '
          f'({left} runs left)')

  first = configs[plan[0]]
  nfe = next(iter(runs[0]['metrics'].values())).get('nfe')
  results = {
      'settings': {**dataclasses.asdict(budget), 'methods': list(methods),
                   'eval_steps': eval_steps(budget), 'model': first.model.name,
                   'batch_size': int(first.global_batch_size),
                   'learning_rate': float(first.optimizer.learning_rate),
                   'cfg_scale': float(first.sample.cfg_scale),
                   'guidance_interval': list(first.sample.guidance_interval),
                   'nfe': nfe,
                   'subset_per_class': int(first.data.subset_per_class),
                   'num_classes': int(first.data.num_classes),
                   'fingerprints': sorted({f for r in runs for f in r['fingerprint']})},
      'runs': runs,
      'summary': summarize(runs),
  }
  if 'fm' in methods:
    results['paired_to_fm'] = all_paired_differences(runs, 'fm')
    results['fd_minus_fm'] = results['paired_to_fm'][str(budget.steps)]['fd']
    # The FDs FM reaches at its checkpoints after the first, as targets: how many steps each
    # method needs to get as far as FM did in 1×, 2×, … eval_every steps.
    fm_curve = results['summary']['fm']
    results['convergence'] = [
        {'fm_step': int(step), 'target': fm_curve[step]['fd']['mean'],
         'steps': convergence(runs, fm_curve[step]['fd']['mean'])}
        for step in list(fm_curve)[1:] or list(fm_curve)]
  _write_json(os.path.join(workdir, 'results.json'), results)
  table = markdown(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table)
  plot(results, os.path.join(workdir, 'fd_vs_steps.png'))
  log(table)
  log(f'wrote results.md, results.json and fd_vs_steps.png to {workdir}')
  if records:
    _copy_files(workdir, records, SWEEP_FILES)
    log(f'and the runs\' records with them to {records}')
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_info()
  seeds = tuple(int(s) for s in FLAGS.seeds) if FLAGS.seeds is not None else None
  budget = resolve_budget(FLAGS.full, steps=FLAGS.steps, eval_every=FLAGS.eval_every,
                          eval_samples=FLAGS.eval_samples, seeds=seeds, sampler=FLAGS.sampler,
                          sampler_steps=FLAGS.sampler_steps,
                          memorization_max_train=FLAGS.memorization_max_train)
  start = time.time()

  def log(line: str) -> None:
    print(f'[{(time.time() - start) / 60:5.1f} min] {line}', flush=True)

  if FLAGS.data_limited:
    sweeps = []
    for directory in FLAGS.data_limited:
      path = os.path.join(directory, 'results.json')
      if not os.path.exists(path):
        raise app.UsageError(f'--data_limited: {path} does not exist; finish that sweep first '
                             '(run it again with its own flags).')
      sweeps.append(_read_json(path))
    table = data_limited_markdown(sweeps)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, 'data_limited.md'), 'w') as f:
      f.write(table)
    log(table)
    log(f'wrote {os.path.join(FLAGS.workdir, "data_limited.md")}')
    return
  log(f'budget {budget}, methods {FLAGS.methods}')
  sweep(FLAGS.config, budget, FLAGS.methods, FLAGS.workdir, log=log, records=FLAGS.records)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
