"""Class-balanced training subsets (the data-limited regime): what they hold, and that every
reader of the training split sees the same subset while the test split stays whole.

Truths: label counts, the whole split read at the chosen positions, and the test split as its
own source gives it.
"""

import numpy as np
import pytest

from configs import fmnist_sit
from pafm_jax.data import pipeline
from pafm_jax.retrieval import dataset_index
from tests.test_train import apply_overrides


def test_positions_are_class_balanced_deterministic_and_nested():
  labels = np.random.default_rng(0).integers(0, 4, size=2_000)
  a = pipeline.subset_positions(labels, 50, seed=3, num_classes=4)
  assert np.all(np.bincount(labels[a], minlength=4) == 50)
  assert np.all(np.diff(a) > 0)                                     # distinct, ascending
  np.testing.assert_array_equal(a, pipeline.subset_positions(labels, 50, 3, 4))
  assert not np.array_equal(a, pipeline.subset_positions(labels, 50, 4, 4))
  larger = pipeline.subset_positions(labels, 200, 3, 4)
  assert np.isin(a, larger).all()                                   # nested in the larger one
  with pytest.raises(ValueError, match='subset_per_class'):
    pipeline.subset_positions(labels, 10_000, 3, 4)


def _config(tfds_dir, **overrides):
  c = fmnist_sit.get_config()
  c.data.tfds_dir = tfds_dir
  c.data.subset_per_class = 30
  c.data.subset_seed = 1
  return apply_overrides(c, overrides)


@pytest.mark.slow
def test_every_reader_of_the_training_split_sees_the_subset(fmnist_tfds_dir, tmp_path):
  config = _config(fmnist_tfds_dir)
  whole = pipeline.load_source(apply_overrides(config.copy_and_resolve_references(),
                                               {'data.subset_per_class': 0}).data)
  subset = pipeline.load_source(config.data)
  assert len(subset) == 300
  labels = pipeline.source_labels(subset)
  assert np.all(np.bincount(labels, minlength=10) == 30)
  # Example i of the subset is example positions[i] of the whole split.
  for i in (0, 17, 299):
    np.testing.assert_array_equal(subset[i]['image'], whole[int(subset.positions[i])]['image'])
  np.testing.assert_array_equal(pipeline.class_sizes(config.data), np.full(10, 30))

  # The train stream covers exactly the subset in an epoch (ids are positions in it).
  it = pipeline.create_train_iterator(config.data, local_batch_size=100, seed=0)
  ids = np.concatenate([next(it)['id'] for _ in range(3)])
  np.testing.assert_array_equal(np.sort(ids), np.arange(300))

  # The retrieval index is built over the subset's 300 items, 30 per class.
  c = apply_overrides(config, {'retrieval.backend': 'exact', 'retrieval.k': 4})
  index = dataset_index.build(c, str(tmp_path))
  assert index.metadata['num_items'] == 300
  assert index.metadata['partition_sizes'] == [30] * 10

  # What belongs to the dataset (domain classifier, reference statistics) reads whole splits.
  assert len(pipeline.load_source(pipeline.whole_split(config.data))) == 60_000
  assert config.data.subset_per_class == 30

  # The test split is whole: the subset is drawn from the training split alone.
  test = pipeline.load_source(config.data, 'test')
  assert len(test) == 10_000 and not isinstance(test, pipeline.ClassBalancedSubset)
  # Disjoint by content too: no subset image is byte-identical to a test image (FD vs test
  # would otherwise reward reproducing the training set).
  test_images = {test[i]['image'].tobytes() for i in range(len(test))}
  assert not any(subset[i]['image'].tobytes() in test_images for i in range(len(subset)))


@pytest.mark.slow
def test_a_subset_larger_than_a_class_is_refused(fmnist_tfds_dir):
  with pytest.raises(ValueError, match='subset_per_class'):
    pipeline.load_source(_config(fmnist_tfds_dir, **{'data.subset_per_class': 7_000}).data)
  with pytest.raises(ValueError, match='subset_per_class'):
    pipeline.validate_data_config(_config(fmnist_tfds_dir,
                                          **{'data.subset_per_class': -1}).data)
