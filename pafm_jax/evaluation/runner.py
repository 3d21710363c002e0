"""The sampling and evaluation workflows behind `--mode=sample`, `--mode=eval`,
`--mode=train_classifier`, and the periodic evaluation of the train loop.

An `Evaluator` holds what every evaluation reuses (feature extractor, reference statistics,
training images for the memorisation check, the compiled sampler); `evaluate(params, rng)`
draws config.eval.num_samples class-balanced samples and returns the metrics:

  fd                 Fréchet distance in the extractor's features (domain classifier or
                     Inception-v3 pool features, i.e. FID) against the reference split
  <metric>_noise_std with config.eval.fd_bootstrap > 0: each metric's spread over resampled
                     sample sets (noise_floors), the floor below which a difference between
                     two evaluations is sampling noise
  fd_train           with a training subset (config.data.subset_per_class): FD against the
                     subset's images, the data-limited regime's sign of reproduction
  accuracy           the domain classifier's accuracy on the samples' own labels
  precision, recall  k-NN manifolds in the same features (Kynkäänniemi et al. 2019)
  memorized_fraction share of samples whose nearest/second-nearest training-image distance
                     ratio is below config.eval.memorization_threshold (1/3)
  nn_ratio_median    median of that ratio
  nfe                velocity evaluations per sample
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pafm_jax import checkpointing, config_checks, evaluation, sampling, train_state
from pafm_jax.data import pipeline
from pafm_jax.evaluation import classifier as classifier_lib
from pafm_jax.evaluation import frechet, manifold, memorization, statistics
from pafm_jax.models import network
from pafm_jax.sampling import decoding
from pafm_jax.sampling import generate as generate_lib
from pafm_jax.sampling import grids

# Precision/recall cost grows with the product of the set sizes: both sets are capped.
PR_MAX_POINTS = 10_000
# Halves of the samples behind recall's noise floor: each costs a recall computation (about a
# second at 5 000 samples), and 20 give its std to about ±16 %.
RECALL_HALVES = 20


# --------------------------------------------------------------------- feature extractors


@dataclasses.dataclass
class FeatureExtractor:
  """images [N, H, W, C] in [−1, 1] → (features [N, D], logits [N, K] or None)."""
  kind: str                       # 'classifier' or 'inception'
  fingerprint: str
  batch_size: int
  apply: Callable[[jax.Array], tuple[jax.Array, jax.Array | None]]
  info: dict[str, Any]

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    feats, logits = [], []
    for i in range(0, len(images), self.batch_size):
      chunk = images[i:i + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:  # one compiled shape for every batch
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:],
                                                chunk.dtype)])
      f, l = self.apply(jnp.asarray(chunk))
      feats.append(np.asarray(f, np.float64)[:n])
      if l is not None:
        logits.append(np.asarray(l)[:n])
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def load_decoder(spec: str) -> Callable[[jax.Array], jax.Array] | None:
  """'package.module:function' → the function (latents → images in [−1, 1]); '' → None."""
  if not spec:
    return None
  module, _, name = spec.partition(':')
  if not name:
    raise ValueError(f"config.eval.decoder must look like 'package.module:function', got "
                     f'{spec!r}.')
  return getattr(importlib.import_module(module), name)


def create_feature_extractor(config: ml_collections.ConfigDict) -> FeatureExtractor:
  evaluation.check_config(config)  # an unknown kind is refused there
  kind = config.eval.features
  if kind == 'classifier':
    clf = classifier_lib.load_for(config)
    info = {'directory': classifier_lib.default_directory(config),
            'test_accuracy': clf.info['test_accuracy']}
    return FeatureExtractor('classifier', clf.fingerprint, 500, clf.apply, info)
  from pafm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  return inception.create_feature_extractor(config, load_decoder(config.eval.decoder),
                                            FeatureExtractor)


# ------------------------------------------------------------------ reference statistics


@dataclasses.dataclass
class Reference:
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray | None     # for precision/recall; None when only statistics exist
  source: str


def reference_statistics(config: ml_collections.ConfigDict,
                         extractor: FeatureExtractor) -> Reference:
  """The real images' statistics in the extractor's features.

  Classifier: computed once on config.eval.reference_split and cached beside the classifier
  as reference_<split>_<fingerprint>.npz. Inception: read from config.eval.reference_stats.
  """
  if extractor.kind == 'inception':
    from pafm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
    mu, sigma, feats, source = inception.load_reference(config.eval.reference_stats, extractor)
    return Reference(mu, sigma, feats, source)
  split = config.eval.reference_split
  directory = extractor.info['directory']
  from etils import epath  # pylint: disable=g-import-not-at-top
  cache = epath.Path(directory) / f'reference_{split}_{extractor.fingerprint}.npz'
  if cache.exists():
    with cache.open('rb') as f:
      data = np.load(f)
      return Reference(data['mu'], data['sigma'], data['features'], str(cache))
  logging.info('computing reference statistics of the %s split (cached at %s)', split, cache)
  # Reference statistics are the dataset's (the cache is shared by every run of it): from the
  # whole split, also for a run that trains on a subset of it.
  images, labels = classifier_lib.load_split(pipeline.whole_split(config.data), split)
  clf_info = classifier_lib.load(directory).info
  recorded = clf_info.get(f'{split}_digest')
  if recorded is not None and recorded != classifier_lib.digest(images, labels):
    raise ValueError(f'the {split} split differs from the one the classifier at {directory} '
                     'was trained and tested on; retrain it with --mode=train_classifier.')
  feats, _ = extractor(images)
  mu, sigma = frechet.gaussian_statistics(feats)
  if jax.process_index() == 0:
    tmp = cache.parent / (cache.name + '.tmp')
    with tmp.open('wb') as f:
      np.savez(f, mu=mu, sigma=sigma, features=feats.astype(np.float32))
    tmp.replace(cache)
  return Reference(mu, sigma, feats, str(cache))


# ------------------------------------------------------------------------ generation


def make_generator(config: ml_collections.ConfigDict, net: network.Network, mesh,
                   options: sampling.SamplerOptions | None = None) -> Callable:
  """(params, rng, num) → (images [num, H, W, C], labels [num], nfe per sample), the labels
  cycling through the classes (class-balanced), drawn through sampling's one generator; a
  text network samples from real captions of those classes (generate.conditions_for_labels).
  With with_condition=True the condition y the samples were drawn for comes fourth."""
  generate = generate_lib.make_generator(config, net.apply, net.null_condition, mesh, options)

  def class_balanced(params, rng, num: int, with_condition: bool = False):
    labels = generate_lib.class_balanced_labels(num, config.data.num_classes)
    y, captions = generate_lib.conditions_for_labels(config, net.family, labels,
                                                     config.eval.reference_split)
    images, nfe = generate(params, rng, y)
    if captions is not None:
      # Scored against the class each caption names (its own truth where the captions are
      # templated, else the example's label).
      labels = caption_classes(config, captions, labels)
    return (images, labels, nfe, y) if with_condition else (images, labels, nfe)

  return class_balanced


def caption_classes(config: ml_collections.ConfigDict, captions, labels: np.ndarray):
  """The class each caption names: read from the caption for Fashion-MNIST's templated
  captions (data/captions.class_of_caption), else the label of the caption's example."""
  # pylint: disable-next=g-import-not-at-top
  from pafm_jax.data import captioned, captions as captions_lib
  if config.data.name != captioned.FASHION_MNIST_CAPTIONS:
    return labels
  named = np.asarray([captions_lib.class_of_caption(c) for c in captions], np.int32)
  return np.where(named >= 0, named, labels)


# ------------------------------------------------------------------------- evaluation


def compute_metrics(config: ml_collections.ConfigDict, images: np.ndarray, labels: np.ndarray,
                    extractor: FeatureExtractor, reference: Reference,
                    train_images: np.ndarray | None, towers=None,
                    caption_vectors: np.ndarray | None = None,
                    train_reference: Reference | None = None) -> dict[str, float]:
  """The metrics of generated images [N, H, W, C] with their labels [N] (module docstring);
  memorisation only when `train_images` [M, H, W, C] are given; 'fd_train' (FD against the
  training images a data-limited run saw) with `train_reference`; for text samples with LiT
  `towers`, the mean cosine of each sample's image embedding and its caption's vector
  (`caption_vectors` [N, E]) and the same for real test pairs."""
  feats, logits = extractor(images)
  mu, sigma = frechet.gaussian_statistics(feats)
  metrics = {'fd': frechet.frechet_distance(mu, sigma, reference.mu, reference.sigma)}
  if train_reference is not None:
    metrics['fd_train'] = frechet.frechet_distance(mu, sigma, train_reference.mu,
                                                   train_reference.sigma)
  per_sample = {}   # what each metric is computed from, for its noise floor
  if logits is not None:
    per_sample['accuracy'] = np.argmax(logits, -1) == labels
    metrics['accuracy'] = float(np.mean(per_sample['accuracy']))
  if reference.features is not None:
    real, fake = reference.features[:PR_MAX_POINTS], feats[:PR_MAX_POINTS]
    k = config.eval.pr_neighbours
    per_sample['precision'] = manifold.inside(fake, real, k)
    metrics['precision'] = float(np.mean(per_sample['precision']))
    metrics['recall'] = float(np.mean(manifold.inside(real, fake, k)))
  if train_images is not None:
    ratio, _ = memorization.nearest_neighbour_ratios(images, train_images)
    metrics.update(memorization.summarize_ratios(ratio, config.eval.memorization_threshold))
    per_sample['ratio'] = ratio
  if config.eval.fd_bootstrap:
    metrics.update(noise_floors(config, feats, per_sample, reference, train_reference))
  if towers is not None and caption_vectors is not None:
    metrics['alignment'] = float(np.mean(np.sum(
        towers.image(images) * towers.text(caption_vectors), axis=-1)))
    metrics['alignment_real'] = float(towers.info['test_alignment'])
  return metrics


def noise_floors(config: ml_collections.ConfigDict, feats: np.ndarray,
                 per_sample: dict[str, np.ndarray], reference: Reference,
                 train_reference: Reference | None) -> dict[str, float]:
  """'<metric>_noise_std': how much each metric moves from the choice of the N samples alone,
  the floor below which a difference between two evaluations says nothing.

  Bootstrap over the samples (config.eval.fd_bootstrap resamples) for the metrics that are a
  function of per-sample values (FD of the features; accuracy, precision and memorisation of
  per-sample indicators; the median NN ratio); recall, whose generated manifold is built from
  the samples' own k-NN radii, from halves of the samples instead
  (statistics.half_sample_spread). The samples are class-balanced but resampled freely, which
  overstates the floor slightly (most for accuracy): the cautious side.
  """
  resamples = config.eval.fd_bootstrap
  out = {'fd_noise_std': statistics.fd_noise_floor(
      feats, reference.mu, reference.sigma, num_resamples=resamples)['std']}
  if train_reference is not None:
    out['fd_train_noise_std'] = statistics.fd_noise_floor(
        feats, train_reference.mu, train_reference.sigma, num_resamples=resamples)['std']
  for name in ('accuracy', 'precision'):
    if name in per_sample:
      out[f'{name}_noise_std'] = statistics.bootstrap(
          np.mean, per_sample[name].astype(np.float64), num_resamples=resamples)['std']
  real, k = reference.features, config.eval.pr_neighbours
  if real is not None and len(feats[:PR_MAX_POINTS]) // 2 > k:  # a half's own k-NN manifold
    real = real[:PR_MAX_POINTS]
    out['recall_noise_std'] = statistics.half_sample_spread(
        lambda fake: float(np.mean(manifold.inside(real, fake, k))),
        feats[:PR_MAX_POINTS], num_resamples=RECALL_HALVES)['std']
  if 'ratio' in per_sample:
    threshold = config.eval.memorization_threshold
    for name in ('memorized_fraction', 'nn_ratio_median'):
      out[f'{name}_noise_std'] = statistics.bootstrap(
          lambda r, name=name: memorization.summarize_ratios(r, threshold)[name],
          per_sample['ratio'], num_resamples=resamples)['std']
  return out


class Evaluator:
  """Everything one evaluation needs, built once; `evaluate` may run many times."""

  def __init__(self, config: ml_collections.ConfigDict, net: network.Network, mesh):
    self.config = config
    # A latent model is scored in pixel space: its samples are decoded, and the classifier,
    # reference statistics and training images are those of the images behind the latents.
    self.decode = decoding.latent_decoder(config, required=True)
    scored = pipeline.pixel_space_config(config)
    self.extractor = create_feature_extractor(scored)
    self.reference = reference_statistics(scored, self.extractor)
    self.train_images = self.train_reference = seen = None
    limit = config.eval.memorization_max_train or None
    if scored.data.subset_per_class:
      # The data-limited regime: also the distance to the very images the model saw, which a
      # model that reproduces them brings below the distance to the test split.
      seen, _ = classifier_lib.load_split(scored.data, scored.data.split)
      feats, _ = self.extractor(seen)
      self.train_reference = Reference(*frechet.gaussian_statistics(feats), None,
                                       f'training subset ({len(seen)} images)')
    if config.eval.memorization:
      self.train_images = (seen[:limit] if seen is not None else classifier_lib.load_split(
          scored.data, scored.data.split, limit)[0])
    self.options = sampling.SamplerOptions.from_config(config.sample)
    self.generate = make_generator(config, net, mesh, self.options)
    self.towers = None
    if net.family == 'text' and config.data.lit_dir:
      from pafm_jax.text import lit  # pylint: disable=g-import-not-at-top
      self.towers = lit.load(config.data.lit_dir)

  def evaluate(self, params: Any, rng: jax.Array,
               num_samples: int | None = None) -> dict[str, Any]:
    """Samples and scores them: {'metrics', 'images', 'labels', 'seconds'}."""
    num = num_samples or self.config.eval.num_samples
    t0 = time.time()
    images, labels, nfe, y = self.generate(params, rng, num, with_condition=True)
    if self.decode is not None:
      images = self.decode(images)
    t1 = time.time()
    metrics = compute_metrics(self.config, images, labels, self.extractor, self.reference,
                              self.train_images, self.towers,
                              y['pooled'] if isinstance(y, dict) else None,
                              self.train_reference)
    metrics['nfe'] = nfe
    seconds = {'sampling': round(t1 - t0, 1), 'metrics': round(time.time() - t1, 1)}
    logging.info('evaluation of %d samples: %s (%s)', num, metrics, seconds)
    return {'metrics': metrics, 'images': images, 'labels': labels, 'seconds': seconds}


# ------------------------------------------------------------------------------ modes


def restore_sampling_params(config: ml_collections.ConfigDict, workdir: str):
  """(mesh, network, params, step): the latest checkpoint's EMA (or raw, per
  config.sample.use_ema) parameters on their train shardings, nothing else."""
  mesh = config_checks.validated_mesh(config)
  setup = train_state.TrainSetup.create(config, mesh)
  abstract = setup.sharded_abstract_state()['ema_params']
  params, step = checkpointing.restore_params(workdir, abstract, use_ema=config.sample.use_ema)
  logging.info('restored the %s parameters of step %d from %s',
               'EMA' if config.sample.use_ema else 'raw', step, workdir)
  return mesh, setup.net, params, step


def _sampler_tag(options: sampling.SamplerOptions) -> str:
  steps = 'adaptive' if options.method == 'dopri5' else f'{options.num_steps}'
  return f'{options.method}{steps}_cfg{options.cfg_scale:g}'


def run_sample(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """--mode=sample: a grid PNG (a row per class) and an .npz of samples and labels; for a
  text network a row per caption (config.sample.captions, typed, or test captions), the
  captions in a .txt beside it."""
  checkpointing.check_config(config, workdir)   # config.json stays the training run's
  mesh, net, params, step = restore_sampling_params(config, workdir)
  options = sampling.SamplerOptions.from_config(config.sample)
  if net.family == 'text':
    return _run_text_sample(config, workdir, mesh, net, params, step, options)
  rows = min(config.data.num_classes, 10)
  num = max(config.sample.num_samples, rows * config.sample.per_class)
  images, labels, nfe = make_generator(config, net, mesh, options)(
      params, jax.random.fold_in(jax.random.key(config.seed), 0x5A3E), num)
  latents = None
  decode = decoding.latent_decoder(config)
  if decode is not None:   # samples as pixels; the latents kept beside them
    latents, images = images, decode(images)
  # The grid takes the first `per_class` samples of each of the first `rows` classes.
  grid_idx = np.concatenate([np.flatnonzero(labels == c)[:config.sample.per_class]
                             for c in range(rows)])
  tag = f'sample_{step:08d}_{_sampler_tag(options)}'
  out = checkpointing.workdir_path(workdir) / 'samples'
  png, npz = out / f'{tag}.png', out / f'{tag}.npz'
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    grids.save_grid_png(grids.image_grid(images[grid_idx], config.sample.per_class), png)
    with npz.open('wb') as f:
      np.savez(f, samples=images, labels=labels,
               **({'latents': latents} if latents is not None else {}))
  logging.info('wrote %s and %s (%d samples, %.1f NFE each)', png, npz, num, nfe)
  return {'grid': str(png), 'npz': str(npz)}


def _run_text_sample(config, workdir, mesh, net, params, step, options) -> dict[str, str]:
  y, captions = generate_lib.grid_conditions(config, 'text', tuple(config.sample.captions))
  generate = generate_lib.make_generator(config, net.apply, net.null_condition, mesh, options)
  images, nfe = generate(params, jax.random.fold_in(jax.random.key(config.seed), 0x5A3E), y)
  tag = f'sample_{step:08d}_{_sampler_tag(options)}'
  out = checkpointing.workdir_path(workdir) / 'samples'
  png, txt = out / f'{tag}.png', out / f'{tag}_captions.txt'
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    grids.save_grid_png(grids.image_grid(images, config.sample.per_class), png)
    txt.write_text(''.join(f'row {i + 1}: {c}\n' for i, c in enumerate(captions)))
    with (out / f'{tag}.npz').open('wb') as f:
      np.savez(f, samples=images, captions=np.asarray(captions))
  logging.info('wrote %s (a row per caption, listed in %s; %.1f NFE each)', png, txt, nfe)
  return {'grid': str(png), 'captions': str(txt), 'npz': str(out / f'{tag}.npz')}


def format_table(result: dict[str, Any]) -> str:
  """The eval.json summary as an aligned two-column text table."""
  rows = [('checkpoint step', str(result['step'])),
          ('samples', str(result['num_samples'])),
          ('sampler', result['sampler_tag']),
          ('features', f'{result["features"]["kind"]} ({result["features"]["fingerprint"]})')]
  names = {'fd': 'Fréchet distance',
           'fd_train': 'Fréchet distance to the training subset',
           'accuracy': 'conditional accuracy',
           'precision': 'precision (k-NN)', 'recall': 'recall (k-NN)',
           'memorized_fraction': 'memorised (NN ratio < 1/3)',
           'nn_ratio_median': 'median NN ratio', 'nfe': 'NFE per sample',
           'alignment': 'image–caption cosine (LiT)',
           'alignment_real': 'image–caption cosine of real test pairs'}
  metrics = result['metrics']
  for key, name in names.items():
    if key in metrics:
      noise = metrics.get(f'{key}_noise_std')
      rows.append((name, f'{metrics[key]:.4f}' + (
          f' ± {noise:.4f} (sampling noise sd)' if noise is not None else '')))
  width = max(len(r[0]) for r in rows)
  return '\n'.join(f'{a:<{width}}  {b}' for a, b in rows)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=eval: restores the latest checkpoint, scores N samples, writes eval.json."""
  checkpointing.check_config(config, workdir)   # config.json stays the training run's
  mesh, net, params, step = restore_sampling_params(config, workdir)
  evaluator = Evaluator(config, net, mesh)
  out = evaluator.evaluate(params, jax.random.fold_in(jax.random.key(config.seed), 0xE7A1))
  result = {
      'step': step,
      'num_samples': int(config.eval.num_samples),
      'sampler': dataclasses.asdict(evaluator.options),
      'sampler_tag': _sampler_tag(evaluator.options),
      'features': {'kind': evaluator.extractor.kind,
                   'fingerprint': evaluator.extractor.fingerprint,
                   **evaluator.extractor.info},
      'reference': evaluator.reference.source,
      'metrics': out['metrics'],
      'seconds': out['seconds'],
  }
  path = checkpointing.workdir_path(workdir) / 'eval.json'
  if jax.process_index() == 0:
    tmp = path.parent / 'eval.json.tmp'
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
  print(format_table(result), flush=True)
  logging.info('wrote %s', path)
  return result


def run_train_classifier(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=train_classifier: trains the domain classifier into config.eval.classifier_dir
  (default: the shared cache, so every run of the dataset uses the same one)."""
  del workdir  # the classifier belongs to the dataset, not to a run
  evaluation.check_config(config)
  config = pipeline.pixel_space_config(config)   # a latent model's classifier sees the pixels
  info = classifier_lib.train(config)
  print(f'domain classifier: test accuracy {info["test_accuracy"]:.4f}, fingerprint '
        f'{info["fingerprint"]}, saved to {classifier_lib.default_directory(config)}',
        flush=True)
  return info
