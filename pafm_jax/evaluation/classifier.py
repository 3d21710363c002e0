"""The domain classifier: a small CNN trained on the dataset itself, whose penultimate layer
gives the features of the Fréchet distance when no Inception weights can be loaded (TF-GAN's
MNIST Fréchet distance is the precedent), and whose predictions give the conditional accuracy
of class-conditional samples.

Saved under one directory:
  params/           Orbax checkpoint of the parameters (a plain nested dict)
  classifier.json   architecture, data digests, test accuracy, fingerprint

The fingerprint hashes the architecture, the digests of the train and test splits and the
trained weights: two Fréchet distances are comparable only under the same fingerprint, and
cached reference statistics are keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from pafm_jax.data import pipeline

ARCHITECTURE_VERSION = 'domain-cnn-v1'
CLASSIFIER_DIR_ENV = 'PAFM_CLASSIFIER_DIR'
INFO_FILE = 'classifier.json'


class DomainClassifier(nnx.Module):
  """conv3×3(w0)–ReLU–maxpool2 → conv3×3(w1)–ReLU–maxpool2 → dense(feature_dim)–ReLU → dense.

  Inputs are images in [−1, 1]: [B, H, W, C] → logits [B, num_classes]; `features` is the
  ReLU output of the penultimate layer [B, feature_dim].
  """

  def __init__(self, image_size: int, channels: int, num_classes: int, *,
               widths: tuple[int, int] = (32, 64), feature_dim: int = 128, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, widths[0], (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(widths[0], widths[1], (3, 3), rngs=rngs)
    pooled = image_size // 4
    self.hidden = nnx.Linear(pooled * pooled * widths[1], feature_dim, rngs=rngs)
    self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def feature_map(self, x: jax.Array) -> jax.Array:
    """The convolutional features [B, H/4, W/4, widths[1]] (REPA's target on Fashion-MNIST:
    7×7 patches, one per token of a patch-4 SiT)."""
    x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))
    return nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))

  def features(self, x: jax.Array) -> jax.Array:
    x = self.feature_map(x)
    return jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


def architecture(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything that fixes the network's function shape (part of the fingerprint)."""
  return {'version': ARCHITECTURE_VERSION, 'image_size': int(data_config.image_size),
          'channels': int(data_config.channels), 'num_classes': int(data_config.num_classes),
          'widths': [32, 64], 'feature_dim': 128}


def build(arch: dict[str, Any], seed: int = 0) -> DomainClassifier:
  return DomainClassifier(arch['image_size'], arch['channels'], arch['num_classes'],
                          widths=tuple(arch['widths']), feature_dim=arch['feature_dim'],
                          rngs=nnx.Rngs(params=seed))


# ------------------------------------------------------------------------------ data


def load_split(data_config: ml_collections.ConfigDict, split: str,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A split (its first `limit` examples) in memory, in order: images float32
  [N, H, W, C] in [−1, 1], labels int32 [N]."""
  it = pipeline.create_eval_iterator(data_config, local_batch_size=min(5000, limit or 5000),
                                     split=split)
  images, labels, count = [], [], 0
  for batch in it:
    images.append(batch['image'])
    labels.append(batch['label'])
    count += len(batch['label'])
    if limit and count >= limit:
      break
  return (np.concatenate(images)[:limit], np.concatenate(labels)[:limit].astype(np.int32))


def digest(*arrays: np.ndarray) -> str:
  """sha256 of the arrays' shapes, dtypes and bytes."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f'{a.shape}{a.dtype}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def default_directory(config: ml_collections.ConfigDict) -> str:
  """config.eval.classifier_dir, else $PAFM_CLASSIFIER_DIR/<data.name>, else
  ~/.cache/pafm_jax/classifier/<data.name> (the images' dataset: captioned Fashion-MNIST's is
  Fashion-MNIST's)."""
  if config.eval.classifier_dir:
    return config.eval.classifier_dir
  root = os.environ.get(CLASSIFIER_DIR_ENV) or '~/.cache/pafm_jax/classifier'
  # Captioned Fashion-MNIST has Fashion-MNIST's images and labels: the same classifier (and
  # so comparable Fréchet distances) serves both.
  name = {'fashion_mnist_captions': 'fashion_mnist'}.get(config.data.name, config.data.name)
  return os.path.join(os.path.expanduser(root), name)


# -------------------------------------------------------------------------- training


def accuracy(logits_fn: Callable, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> float:
  correct = 0
  for i in range(0, len(images), batch_size):
    logits = logits_fn(jnp.asarray(images[i:i + batch_size]))
    correct += int(np.sum(np.argmax(np.asarray(logits), -1) == labels[i:i + batch_size]))
  return correct / len(images)


def train(config: ml_collections.ConfigDict, directory: str | None = None, *,
          batch_size: int = 128, learning_rate: float = 1e-3,
          steps_per_epoch: int | None = None) -> dict[str, Any]:
  """Trains the classifier on config.data's train split for config.eval.classifier_epochs
  epochs (Adam), measures test accuracy, saves to `directory`; returns the saved info.

  `steps_per_epoch` cuts epochs short (quick smoke runs and tests); default: whole epochs.
  """
  directory = _absolute(directory or default_directory(config))
  arch = architecture(config.data)
  t0 = time.time()
  # The classifier belongs to the dataset: every run, on a training subset or not, is scored
  # in the features of one classifier trained on the whole split.
  data = pipeline.whole_split(config.data)
  train_x, train_y = load_split(data, 'train')
  test_x, test_y = load_split(data, 'test')
  logging.info('classifier data: %d train, %d test images (%.1f s)', len(train_x), len(test_x),
               time.time() - t0)

  graphdef, params = nnx.split(build(arch, config.seed), nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  def logits_fn(p, x):
    return nnx.merge(graphdef, p)(x)

  @jax.jit
  def step(p, o, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  rng = np.random.default_rng(config.seed)
  for epoch in range(config.eval.classifier_epochs):
    params, opt_state, loss = train_epoch(step, params, opt_state, rng, batch_size,
                                          (train_x, train_y), steps_per_epoch)
    eval_fn = jax.jit(lambda x: logits_fn(params, x))
    acc = accuracy(eval_fn, test_x, test_y)
    logging.info('classifier epoch %d: train loss %.4f, test accuracy %.4f (%.0f s)', epoch + 1,
                 loss, acc, time.time() - t0)

  info = {
      'architecture': arch,
      'train_digest': digest(train_x, train_y),
      'test_digest': digest(test_x, test_y),
      'weights_digest': weights_digest(params),
      'test_accuracy': acc,
      'epochs': int(config.eval.classifier_epochs),
      'batch_size': batch_size,
      'learning_rate': learning_rate,
      'train_seconds': round(time.time() - t0, 1),
  }
  info['fingerprint'] = _fingerprint(info)
  save(directory, params, info)
  logging.info('classifier saved to %s (fingerprint %s, test accuracy %.4f)', directory,
               info['fingerprint'], acc)
  return info


def train_epoch(step: Callable, params, opt_state, rng: np.random.Generator, batch_size: int,
                arrays: tuple[np.ndarray, ...], steps: int | None = None):
  """One shuffled pass of `step(params, opt_state, *batch) → (params, opt_state, loss)` over
  the rows of `arrays` (or its first `steps` batches); returns the mean loss third."""
  order = rng.permutation(len(arrays[0]))
  losses = []
  for i in range(steps or len(order) // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    params, opt_state, loss = step(params, opt_state, *(a[idx] for a in arrays))
    losses.append(loss)
  return params, opt_state, float(np.mean(jax.device_get(losses)))


def weights_digest(params: Any) -> str:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  h = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(leaf, np.float32).tobytes())
  return h.hexdigest()


def _fingerprint(info: dict[str, Any]) -> str:
  key = json.dumps([info['architecture'], info['train_digest'], info['test_digest'],
                    info['weights_digest']], sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- save / load


def save_params(directory: epath.Path, params: Any) -> None:
  """directory/params: a plain parameter tree as an Orbax checkpoint (replacing one there)."""
  directory.mkdir(parents=True, exist_ok=True)
  target = directory / 'params'
  if target.exists():
    target.rmtree()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(target, jax.device_get(params))
  ckptr.wait_until_finished()


def write_info(path: epath.Path, info: dict[str, Any]) -> None:
  """The JSON record that marks a saved model as complete, written atomically (and last)."""
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(json.dumps(info, indent=2))
  tmp.replace(path)


def save(directory: epath.Path, params: Any, info: dict[str, Any]) -> None:
  save_params(directory, params)
  write_info(directory / INFO_FILE, info)


class Classifier:
  """A trained classifier: `apply(images) → (features [B, D], logits [B, C])`, jitted."""

  def __init__(self, params: Any, info: dict[str, Any]):
    self.info = info
    self.fingerprint = info['fingerprint']
    self.params = params
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(info['architecture'])), nnx.Param)

    def apply(p, images):
      model = nnx.merge(graphdef, p)
      # Samples may overshoot the data range; the classifier only ever saw [−1, 1].
      feats = model.features(jnp.clip(images, -1.0, 1.0))
      return feats, model.head(feats)

    self._apply = jax.jit(apply)

  def apply(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self._apply(self.params, images)


def load_for(config: ml_collections.ConfigDict) -> Classifier:
  """The classifier of config's data (default_directory), checked to be built for it."""
  directory = default_directory(config)
  clf = load(directory)
  if clf.info['architecture'] != architecture(config.data):
    raise ValueError(f'the classifier at {directory} was built for other data '
                     f'({clf.info["architecture"]}); retrain it with --mode=train_classifier.')
  return clf


def _absolute(directory: str) -> epath.Path:
  """Orbax wants absolute paths; a relative local one (e.g. a classifier kept in a sweep's
  records) is taken from the working directory. Bucket URLs pass unchanged."""
  return epath.Path(directory if '://' in str(directory) else os.path.abspath(directory))


def load(directory: str) -> Classifier:
  """Loads a classifier saved by `train`; checks its weights against the recorded digest."""
  directory = _absolute(directory)
  info_path = directory / INFO_FILE
  if not info_path.exists():
    raise FileNotFoundError(
        f'no domain classifier at {directory} ({INFO_FILE} missing). Train it once with\n'
        f'  python -m pafm_jax.main --mode=train_classifier --config=<config> --workdir=<dir>\n'
        'or point config.eval.classifier_dir (or $PAFM_CLASSIFIER_DIR) at an existing one.')
  info = json.loads(info_path.read_text())
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(info['architecture'])),
                                        nnx.Param))
  params = ocp.StandardCheckpointer().restore(directory / 'params', abstract)
  if weights_digest(params) != info['weights_digest']:
    raise ValueError(f'the classifier weights under {directory} do not match the digest in '
                     f'{INFO_FILE}; retrain with --mode=train_classifier.')
  return Classifier(params, info)
