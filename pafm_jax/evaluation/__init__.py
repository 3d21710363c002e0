"""Sample quality metrics: Fréchet distances (domain classifier or Inception-v3 features),
conditional accuracy, precision/recall, memorisation; and the --mode=eval workflow."""

from pafm_jax.evaluation.frechet import frechet_distance, gaussian_statistics
from pafm_jax.evaluation.manifold import precision_recall
from pafm_jax.evaluation.memorization import memorization_metrics, nearest_neighbour_ratios

__all__ = ['frechet_distance', 'gaussian_statistics', 'memorization_metrics',
           'nearest_neighbour_ratios', 'precision_recall']
