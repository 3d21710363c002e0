"""Sample quality metrics: Fréchet distances (domain classifier or Inception-v3 features),
conditional accuracy, precision/recall, memorisation; and the --mode=eval workflow."""

from pafm_jax.evaluation.frechet import frechet_distance, gaussian_statistics
from pafm_jax.evaluation.manifold import precision_recall
from pafm_jax.evaluation.memorization import memorization_metrics, nearest_neighbour_ratios

FEATURES = ('classifier', 'inception')


def check_config(config) -> None:
  """config.eval on its own, before any sampling: features, sample counts, resamples."""
  e = config.eval
  if e.features not in FEATURES:
    raise ValueError(f'unknown features {e.features!r}; config.eval.features must be one of '
                     f'{FEATURES}.')
  if e.num_samples < 2 or e.pr_neighbours < 1:
    raise ValueError('config.eval.num_samples must be ≥ 2 and config.eval.pr_neighbours ≥ 1, '
                     f'got {e.num_samples} and {e.pr_neighbours}.')
  if e.classifier_epochs < 1:
    raise ValueError(f'config.eval.classifier_epochs must be ≥ 1, got {e.classifier_epochs}: '
                     'the domain classifier is trained for whole epochs.')
  if e.fd_bootstrap and e.fd_bootstrap < 2:
    raise ValueError(f'config.eval.fd_bootstrap must be 0 (off) or ≥ 2 resamples, got '
                     f'{e.fd_bootstrap}.')


__all__ = ['check_config', 'frechet_distance', 'gaussian_statistics', 'memorization_metrics',
           'nearest_neighbour_ratios', 'precision_recall']
