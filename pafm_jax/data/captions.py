"""Templated captions for class-labelled images: a text-conditional Fashion-MNIST.

Every caption names its class with one of several synonyms, inside one of several templates,
with optional attributes ("a photo of", "a close-up of", a tone, a view), so a text model sees
varied phrasings of each class and the caption alone determines the class. A caption is a
pure function of (seed, example id, label): the same dataset build gives the same captions,
on any machine.

    caption_for(label=7, example_id=12, seed=0)   # e.g. 'a grayscale close-up of a sneaker'
"""

from __future__ import annotations

import numpy as np

# Fashion-MNIST's classes, each by several names a caption may use (the first is the label's
# name in the dataset).
FASHION_MNIST_SYNONYMS = (
    ('t-shirt', 'tee', 'top', 't-shirt top'),
    ('trouser', 'pair of trousers', 'pair of pants', 'pair of slacks'),
    ('pullover', 'sweater', 'jumper', 'knit pullover'),
    ('dress', 'frock', 'gown', 'summer dress'),
    ('coat', 'jacket', 'overcoat', 'winter coat'),
    ('sandal', 'pair of sandals', 'open sandal', 'strappy sandal'),
    ('shirt', 'button-up shirt', 'blouse', 'collared shirt'),
    ('sneaker', 'trainer', 'running shoe', 'pair of sneakers'),
    ('bag', 'handbag', 'purse', 'tote bag'),
    ('ankle boot', 'boot', 'short boot', 'pair of ankle boots'),
)

TEMPLATES = (
    '{article} {item}',
    'a photo of {article} {item}',
    'a {tone} photo of {article} {item}',
    'a picture of {article} {item}, {view}',
    '{article} {item} on a plain background',
    'a {tone} close-up of {article} {item}',
    'a product shot of {article} {item}, {view}',
    'an image showing {article} {item}',
)
TONES = ('grayscale', 'black and white', 'dark', 'bright', 'low-resolution', 'small')
VIEWS = ('seen from the front', 'seen from the side', 'centred', 'viewed from above',
         'photographed flat')


def _article(item: str) -> str:
  return 'an' if item[0] in 'aeiou' else 'a'


def caption_for(label: int, example_id: int, seed: int = 0,
                synonyms: tuple[tuple[str, ...], ...] = FASHION_MNIST_SYNONYMS) -> str:
  """The caption of example `example_id` of class `label` (deterministic in all three)."""
  if not 0 <= label < len(synonyms):
    raise ValueError(f'label {label} is not one of the {len(synonyms)} classes of the synonyms.')
  rng = np.random.default_rng([seed, example_id, label])
  item = synonyms[label][rng.integers(len(synonyms[label]))]
  template = TEMPLATES[rng.integers(len(TEMPLATES))]
  article = _article(item) if not item.startswith('pair of') else 'a'
  return template.format(article=article, item=item, tone=TONES[rng.integers(len(TONES))],
                         view=VIEWS[rng.integers(len(VIEWS))])


def class_of_caption(caption: str,
                     synonyms: tuple[tuple[str, ...], ...] = FASHION_MNIST_SYNONYMS) -> int:
  """The class a caption names: the class of its longest matching synonym, -1 if none.

  The truth for a caption's class in evaluation ('the accuracy of the class named by each
  caption'), independent of how captions are made."""
  best, best_len = -1, 0
  words = f' {caption.lower()} '
  for label, names in enumerate(synonyms):
    for name in names:
      if f' {name} ' in words.replace(',', ' ') and len(name) > best_len:
        best, best_len = label, len(name)
  return best
