"""Templated captions (data/captions.py): deterministic, varied, and naming their class."""

import collections

import pytest

from pafm_jax.data import captions


def test_every_caption_names_its_class_and_only_it():
  for label in range(10):
    for example_id in range(300):
      text = captions.caption_for(label, example_id, seed=0)
      assert captions.class_of_caption(text) == label, text


def test_captions_are_deterministic_and_varied():
  first = [captions.caption_for(i % 10, i, seed=3) for i in range(2000)]
  assert first == [captions.caption_for(i % 10, i, seed=3) for i in range(2000)]
  assert first != [captions.caption_for(i % 10, i, seed=4) for i in range(2000)]
  per_class = collections.defaultdict(set)
  for i, text in enumerate(first):
    per_class[i % 10].add(text)
  # 4 names × 8 templates × attributes: well over 50 distinct captions of each class.
  assert min(len(v) for v in per_class.values()) > 50
  # Every synonym and every template is used.
  used = ' | '.join(first)
  for names in captions.FASHION_MNIST_SYNONYMS:
    for name in names:
      assert name in used, name


def test_bad_label_is_refused():
  with pytest.raises(ValueError, match='not one of the 10 classes'):
    captions.caption_for(10, 0)
