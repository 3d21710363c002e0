"""An image tower trained contrastively against the frozen text encoder (LiT, Zhai et al. 2022,
with the roles swapped: here the text side is locked and the image side learns).

g maps an image to the text encoder's sentence-vector space (unit norm), so cos(e(y), g(x)) is
a CLIP-style image–text score with a real trained model:

  * the image–text condition term of text PAFM: cos(e(y_i), g(x0_j))/τ
    (config.objective.pafm.text_candidate='image'; candidates' g(x0_j) are computed once per
    dataset example and read by the data pipeline, like the captions' vectors);
  * the alignment of generated samples with their captions in `--mode=eval` (a CLIPScore
    analogue: the mean cosine, beside the same figure for real test images).

  python -m pafm_jax.main --mode=train_lit --config=configs/fmnist_mmdit.py --workdir=runs/lit

trains it on the captioned training split (symmetric InfoNCE with a learned temperature, as
CLIP), reports its zero-shot class accuracy on the test split (class names in a few generic
prompts, encoded by the text encoder), and saves to <workdir>/lit: `params/` (Orbax),
`lit.json` (architecture, accuracy, fingerprint) and `image_embeddings_<split>.npy` for the
train and test splits. A user's CLIP towers plug in through the same interface (`LitTowers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from pafm_jax.data import captioned
from pafm_jax.evaluation import classifier

ARCHITECTURE_VERSION = 'lit-cnn-v1'
INFO_FILE = 'lit.json'
SUBDIR = 'lit'
PROMPTS = ('a photo of a {}', 'a picture of a {}', '{}')


class ImageTower(nnx.Module):
  """conv3×3(32)–ReLU–pool → conv3×3(64)–ReLU–pool → dense(hidden)–ReLU → dense(width), unit
  norm: images [B, H, W, C] in [−1, 1] → [B, width]."""

  def __init__(self, image_size: int, channels: int, width: int, *, hidden: int = 256,
               rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    pooled = image_size // 4
    self.hidden = nnx.Linear(pooled * pooled * 64, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, width, rngs=rngs)
    # CLIP's learned temperature, log(1/0.07) at the start.
    self.log_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.max_pool(jax.nn.relu(self.conv1(jnp.clip(x, -1.0, 1.0))), (2, 2), (2, 2))
    x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
    x = self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {'version': ARCHITECTURE_VERSION, 'image_size': int(config.data.image_size),
          'channels': int(config.data.channels), 'width': int(config.data.text_width),
          'hidden': 256}


def build(arch: dict[str, Any], seed: int = 0) -> ImageTower:
  return ImageTower(arch['image_size'], arch['channels'], arch['width'], hidden=arch['hidden'],
                    rngs=nnx.Rngs(params=seed))


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, log_scale: jax.Array):
  """Symmetric InfoNCE of matching rows: image_emb, text_emb [B, E] unit vectors."""
  logits = jnp.exp(log_scale) * image_emb @ text_emb.T
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() +
                optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


class LitTowers:
  """Trained towers: `image(images) → [B, E]` and `text(pooled) → [B, E]`, both unit norm."""

  def __init__(self, params: Any, info: dict[str, Any], directory: str = ''):
    self.info, self.params, self.directory = info, params, directory
    self.fingerprint = info['fingerprint']
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(info['architecture'])))
    self._image = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

  def image(self, images: np.ndarray, batch_size: int = 2000) -> np.ndarray:
    chunks = [self._image(self.params, jnp.asarray(images[i:i + batch_size]))
              for i in range(0, len(images), batch_size)]
    return np.concatenate([np.asarray(c) for c in chunks])

  @staticmethod
  def text(pooled: np.ndarray) -> np.ndarray:
    pooled = np.asarray(pooled, np.float32)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def _split_arrays(config: ml_collections.ConfigDict, split: str):
  """Images [N, H, W, C] in [−1, 1], labels and pooled caption vectors of a captioned split."""
  from pafm_jax import batch_contract as fields  # pylint: disable=g-import-not-at-top
  from pafm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = pipeline.whole_split(config.data)
  data.lit_dir = ''   # the towers being trained make the embeddings a config may point at
  source = pipeline.load_source(data, split)
  read = pipeline.batch_reader(source, pipeline.sample_shape(config.data),
                               config.data.max_tokens, text_tokens=False)
  chunks = [read(np.arange(i, min(len(source), i + 10_000)))
            for i in range(0, len(source), 10_000)]
  cat = lambda k: np.concatenate([c[k] for c in chunks])
  return cat(fields.IMAGE), cat(fields.LABEL), cat(fields.COND_EMBEDDING), source


def zero_shot_accuracy(towers: LitTowers, images: np.ndarray, labels: np.ndarray,
                       class_names, encoder) -> float:
  """Accuracy of argmax_c cos(g(x), mean of the prompts of class c) (CLIP's zero-shot)."""
  names = [n.lower().replace('/', ' or ') for n in class_names]
  prompts = [p.format(n) for n in names for p in PROMPTS]
  _, _, pooled = encoder.encode(prompts)
  classes = towers.text(towers.text(pooled).reshape(len(names), len(PROMPTS), -1).mean(1))
  predicted = np.argmax(towers.image(images) @ classes.T, axis=1)
  return float(np.mean(predicted == labels))


def train(config: ml_collections.ConfigDict, workdir: str, *, epochs: int | None = None,
          batch_size: int = 256, learning_rate: float = 1e-3,
          steps_per_epoch: int | None = None) -> dict[str, Any]:
  """Trains, evaluates and saves the image tower (module docstring); returns its info.

  `steps_per_epoch` cuts epochs short (tests); default: whole epochs.
  """
  from pafm_jax import text  # pylint: disable=g-import-not-at-top
  epochs = epochs or config.text.lit_epochs
  directory = epath.Path(workdir) / SUBDIR
  t0 = time.time()
  images, labels, pooled, source = _split_arrays(config, 'train')
  test_images, test_labels, test_pooled, _ = _split_arrays(config, 'test')
  arch = architecture(config)
  if pooled.shape[1] != arch['width']:
    raise ValueError(f'the captions are {pooled.shape[1]}-dimensional but '
                     f'config.data.text_width={arch["width"]}.')
  graphdef, params = nnx.split(build(arch, config.seed), nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, o, x, e):
    def loss_fn(p):
      model = nnx.merge(graphdef, p)
      return contrastive_loss(model(x), e, model.log_scale[...])
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  rng = np.random.default_rng(config.seed)
  unit = LitTowers.text(pooled)
  for epoch in range(epochs):
    params, opt_state, loss = classifier.train_epoch(step, params, opt_state, rng, batch_size,
                                                     (images, unit), steps_per_epoch)
    logging.info('LiT epoch %d/%d: contrastive loss %.4f (%.0f s)', epoch + 1, epochs, loss,
                 time.time() - t0)
  info = {'architecture': arch, 'epochs': epochs, 'batch_size': batch_size,
          'learning_rate': learning_rate, 'text_encoder': source.metadata.get('encoder'),
          'data_name': config.data.name}
  info['weights_digest'] = classifier.weights_digest(params)
  info['fingerprint'] = hashlib.sha256(json.dumps(
      [arch, info['weights_digest']], sort_keys=True).encode()).hexdigest()[:16]
  towers = LitTowers(params, info)
  encoder = text.load_encoder(config.text.encoder or None)
  info['zero_shot_accuracy'] = zero_shot_accuracy(
      towers, test_images, test_labels, source.metadata['class_names'] or
      [str(c) for c in range(config.data.num_classes)], encoder)
  info['test_alignment'] = float(np.mean(np.sum(towers.image(test_images) *
                                                LitTowers.text(test_pooled), -1)))
  info['train_seconds'] = round(time.time() - t0, 1)
  save(directory, params, info, {'train': towers.image(images),
                                 'test': towers.image(test_images)})
  logging.info('LiT towers saved to %s: zero-shot test accuracy %.4f, mean image–caption '
               'cosine %.4f on test', directory, info['zero_shot_accuracy'],
               info['test_alignment'])
  return info


def save(directory: epath.Path, params: Any, info: dict[str, Any],
         embeddings: dict[str, np.ndarray]) -> None:
  """Writes params (Orbax), the embeddings, then lit.json last: a directory without lit.json
  is not a finished tower."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / INFO_FILE).unlink(missing_ok=True)
  classifier.save_params(directory, params)
  for split, emb in embeddings.items():
    path = os.fspath(directory / captioned.IMAGE_EMBEDDINGS_FILE.format(split=split))
    with open(path + '.tmp', 'wb') as f:
      np.save(f, emb.astype(np.float32))
    os.replace(path + '.tmp', path)
  classifier.write_info(directory / INFO_FILE, info)


def lit_directory(path: str) -> epath.Path:
  """A LiT workdir or its lit/ subdirectory → the directory holding lit.json."""
  path = epath.Path(os.path.expanduser(path))
  return path if (path / INFO_FILE).exists() else path / SUBDIR


def load(path: str) -> LitTowers:
  directory = lit_directory(path)
  if not (directory / INFO_FILE).exists():
    raise FileNotFoundError(
        f'no LiT towers at {path} ({INFO_FILE} missing). Train them once with\n'
        '  python -m pafm_jax.main --mode=train_lit --config=<config> --workdir=<dir>\n'
        'and set config.data.lit_dir to that workdir.')
  info = json.loads((directory / INFO_FILE).read_text())
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build(info['architecture'])),
                                        nnx.Param))
  params = ocp.StandardCheckpointer().restore(directory / 'params', abstract)
  if classifier.weights_digest(params) != info['weights_digest']:
    raise ValueError(f'the LiT weights under {directory} do not match their recorded digest; '
                     'retrain them with --mode=train_lit.')
  return LitTowers(params, info, str(directory))


