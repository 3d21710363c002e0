"""Variance curves: how far each training target lies from the exact marginal velocity u*.

  python -m pafm_jax.tools.variance --workdir=runs/variance [--config=configs/fmnist_sit.py]
  (or --config=configs/fmnist_latent_sit.py: the latents' stored means, scaled)

For a dataset small enough to enumerate (Fashion-MNIST, 60 K), u*(x_t) — the marginal velocity
of the *empirical* class-conditional distribution, the quantity every target estimates — is
computed by brute force: SNIS with every training item of the sample's class as a candidate.
Each estimator is then run through the objective code the train step uses, on the same
batches, times and noise, and E‖target − u*‖² (mean over pixels) is reported per t:

  fm              the conditional velocity of the own endpoint (METHOD.md §2)
  in_batch        PAFM over a random batch of `batch_size` training items
  batch+clean16   in-batch plus the 16 nearest items to the own x0 ("clean" retrieval)
  noisy16         the own endpoint plus the 16 nearest same-class items to x_t/α_t ("noisy")
  stratified64    METHOD.md §3's stratified in-batch + noisy-kNN 64
  stablevm        SNIS over a bank of `bank_capacity` items of the class, for t ≥ 0.5 only

kNN is exact (brute force) with --backend=exact, or ScaNN with --backend=scann: the index the
training pipeline uses (pafm_jax/retrieval), built over the flattened training images into
<workdir>/variance_index, so the table shows what approximate retrieval costs the targets.
Writes `variance.md` (the table), `variance.json` and `variance.png` (log scale) into
--workdir.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from pafm_jax import objectives, paths, posterior
from pafm_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fmnist_sit.py',
                                          'Config whose data and path are used.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/variance', 'Where the table and plot go.')
_TIMES = flags.DEFINE_list('t', ['0.3', '0.4', '0.5', '0.6', '0.7', '0.8', '0.9', '0.95', '0.99'],
                           'Times at which to measure.')
_BATCHES = flags.DEFINE_integer('num_batches', 4, 'Batches per t (each of --batch_size).')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'In-batch candidate set size.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the batches and noise.')
_BACKEND = flags.DEFINE_enum('backend', 'exact', ['exact', 'scann'],
                             'Nearest-neighbour search of the kNN estimators.')

ESTIMATORS = ('fm', 'in_batch', 'batch+clean16', 'noisy16', 'stratified64', 'stablevm')
CLEAN_K, NOISY_K, STRATIFIED_K = 16, 16, 64


@functools.partial(jax.jit, static_argnames=('path', 'k'))
def _class_posterior(x_t, t, class_items, *, path, k):
  """Exact posterior mean over a whole class and the k items of highest likelihood.

  x_t: [R, *S] rows of one class; class_items: [N_c, *S] → (x̄0 [R, *S], top-k indices [R, k]).
  """
  scores = posterior.in_batch_proximity_scores(x_t, t, class_items, path)
  weights = posterior.weights_from_scores(scores, t, jnp.zeros_like(scores), path)
  mean = posterior.in_batch_posterior_mean(weights, class_items)
  return mean, jax.lax.top_k(scores, k)[1]


def exact_posterior(path, x_t, t, labels, images, class_index, k):
  """u*'s posterior mean x̄0 for each row (by brute force over its class) and the ids of the
  k same-class items nearest to x_t/α_t (the exact noisy neighbours)."""
  mean = np.zeros(x_t.shape, np.float32)
  nearest = np.zeros((x_t.shape[0], k), np.int32)
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    m, top = _class_posterior(jnp.asarray(x_t[rows]), jnp.asarray(t[rows]),
                              jnp.asarray(images[class_index[c]]), path=path, k=k)
    mean[rows] = np.asarray(m)
    nearest[rows] = class_index[c][np.asarray(top)]
  return mean, nearest


def clean_neighbours(x0, labels, images, class_index, k):
  """Ids of the k same-class items nearest to each x0 (the sample itself first)."""
  out = np.zeros((x0.shape[0], k), np.int32)
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    _, top = _class_posterior(jnp.asarray(x0[rows]), jnp.zeros(len(rows), jnp.float32),
                              jnp.asarray(images[class_index[c]]), path=paths.LinearPath(),
                              k=k)
    out[rows] = class_index[c][np.asarray(top)]
  return out


def scann_index(images, labels, num_classes: int, directory: str):
  """The ScaNN index of the retrieval pipeline over flattened images, one partition a class."""
  from pafm_jax.retrieval import index as index_lib  # pylint: disable=g-import-not-at-top
  return index_lib.build(directory, images.reshape(len(images), -1), labels, backend='scann',
                         scann_params=index_lib.ScannParams(), clean_k=0,
                         num_partitions=num_classes, metadata={}, overwrite=True)


def measure(config, times, *, num_batches: int, batch_size: int, seed: int,
            bank_capacity: int = 256, scann_dir: str | None = None) -> dict:
  """{'t': [...], estimator: [mean ‖target − u*‖² per t]} on the config's training data.

  With `scann_dir`, a ScaNN index over the flattened images is built there and replaces exact
  kNN.
  """
  images, labels = pipeline.load_arrays(config.data)
  index = None
  if scann_dir is not None:
    index = scann_index(images, labels, config.data.num_classes, scann_dir)
  path = paths.get_path(config.objective.path)
  null = config.data.num_classes
  class_index = {c: np.flatnonzero(labels == c) for c in range(config.data.num_classes)}
  class_sizes = tuple(len(class_index[c]) for c in range(config.data.num_classes))
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  def pafm(sources, stratified=False):
    options = objectives.PAFMOptions(sources, stratified=stratified, class_sizes=class_sizes)
    return jax.jit(functools.partial(objectives.pafm_target, path, options=options,
                                     null_label=null))

  targets = {
      'in_batch': pafm('batch'), 'batch+clean16': pafm('batch+retrieved'),
      'noisy16': pafm('retrieved'), 'stratified64': pafm('batch+retrieved', stratified=True),
      'stablevm': jax.jit(functools.partial(objectives.stablevm_target, path, t_min=0.5)),
  }
  errors = {name: [] for name in ESTIMATORS}
  for t_val in times:
    sums = {name: 0.0 for name in ESTIMATORS}
    for _ in range(num_batches):
      ids = rng.choice(len(images), batch_size, replace=False).astype(np.int32)
      x0, y = images[ids], labels[ids]
      eps = rng.normal(size=x0.shape).astype(np.float32)
      t = np.full(batch_size, t_val, np.float32)
      x_t = np.asarray(paths.interpolate(path, f32(x0), f32(eps), f32(t)))
      x0_star, noisy = exact_posterior(path, x_t, t, y, images, class_index, STRATIFIED_K)
      u_star = np.asarray(posterior.velocity_of_mean(f32(x_t), f32(t), f32(x0_star), path))
      if index is None:
        clean = clean_neighbours(x0, y, images, class_index, CLEAN_K)
      else:  # the query of noisy retrieval is x_t/α_t (pafm_jax/retrieval/stage.py)
        alpha = np.asarray(path.alpha(f32(t)))[:, None]
        flat_x_t = x_t.reshape(batch_size, -1)
        noisy = index.search(flat_x_t / alpha, y, STRATIFIED_K).astype(np.int32)
        clean = index.search(x0.reshape(batch_size, -1), y, CLEAN_K).astype(np.int32)
      # StableVM's bank row: the own endpoint and bank_capacity − 1 other items of its class.
      bank = np.stack([np.concatenate([[i], rng.choice(
          class_index[c][class_index[c] != i], bank_capacity - 1, replace=False)])
          for i, c in zip(ids, y)])

      def fields(nbr):
        return {'label': jnp.asarray(y), 'id': jnp.asarray(ids), 'neighbours': f32(images[nbr]),
                'neighbour_labels': jnp.asarray(labels[nbr]), 'neighbour_ids': jnp.asarray(nbr)}

      args = (f32(x_t), f32(t), f32(x0), f32(eps), jnp.asarray(y))
      out = {
          'fm': paths.conditional_velocity(path, f32(x0), f32(eps), f32(t)),
          'in_batch': targets['in_batch'](*args, {'label': jnp.asarray(y)})[0],
          'batch+clean16': targets['batch+clean16'](*args, fields(clean))[0],
          'noisy16': targets['noisy16'](*args, fields(noisy[:, :NOISY_K]))[0],
          'stratified64': targets['stratified64'](*args, fields(noisy))[0],
          'stablevm': targets['stablevm'](*args, {'bank_candidates': f32(images[bank]),
                                                 'bank_valid': jnp.ones(bank.shape, bool)})[0],
      }
      for name, target in out.items():
        sums[name] += float(np.mean(np.square(np.asarray(target) - u_star)))
    for name in ESTIMATORS:
      errors[name].append(sums[name] / num_batches)
    logging.info('t=%.2f: %s', t_val, '  '.join(f'{n} {errors[n][-1]:.3g}' for n in ESTIMATORS))
  return {'t': list(times), **errors}


def markdown_table(result: dict) -> str:
  head = '| t | ' + ' | '.join(ESTIMATORS) + ' | ' + ' | '.join(
      f'FM/{n}' for n in ESTIMATORS[1:]) + ' |'
  lines = [head, '|' + '---|' * (1 + 2 * len(ESTIMATORS) - 1)]
  for i, t in enumerate(result['t']):
    errs = [result[n][i] for n in ESTIMATORS]
    ratios = [result['fm'][i] / max(result[n][i], 1e-30) for n in ESTIMATORS[1:]]
    lines.append(f'| {t:g} | ' + ' | '.join(f'{e:.3g}' for e in errs) + ' | ' +
                 ' | '.join(f'{r:.3g}×' for r in ratios) + ' |')
  return '\n'.join(lines)


def plot(result: dict, filename: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for name in ESTIMATORS:
    ax.plot(result['t'], result[name], marker='o', label=name)
  ax.set_yscale('log')
  ax.set_xlabel('t (0 = data, 1 = noise)')
  ax.set_ylabel('E‖target − u*‖² (per pixel)')
  ax.set_title('Distance of training targets from the exact marginal velocity')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(filename, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  config = _CONFIG.value
  times = [float(t) for t in _TIMES.value]
  if any(not 0.0 < t < 1.0 for t in times):
    raise app.UsageError(f'--t values must lie in (0, 1), got {times}.')
  # Latents: the empirical distribution of the stored means (scaled), what retrieval indexes.
  if config.data.name not in ('fashion_mnist', 'latents'):
    raise app.UsageError('the variance tool enumerates the whole training set; it is meant '
                         "for Fashion-MNIST (pixels, or latents with data.name='latents'), not "
                         f'{config.data.name!r}.')
  os.makedirs(_WORKDIR.value, exist_ok=True)
  start = time.time()
  scann_dir = None
  if _BACKEND.value == 'scann':
    scann_dir = os.path.join(_WORKDIR.value, 'variance_index')
  result = measure(config, times, num_batches=_BATCHES.value, batch_size=_BATCH.value,
                   seed=_SEED.value, scann_dir=scann_dir)
  result['backend'] = _BACKEND.value
  table = markdown_table(result)
  print(table)
  with open(os.path.join(_WORKDIR.value, 'variance.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(_WORKDIR.value, 'variance.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(_WORKDIR.value, 'variance.png'))
  logging.info('wrote variance.md, variance.json and variance.png to %s in %.0f s',
               _WORKDIR.value, time.time() - start)


if __name__ == '__main__':
  app.run(main)
