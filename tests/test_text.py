"""The text encoder against transformers' BertModel (tests/fixtures/minilm_reference.npz,
made once by tests/fixtures/minilm_reference.py with torch 2.13 and transformers 5.24 in a
throw-away environment; see tests/fixtures/README.md)."""

import pathlib

import numpy as np
import pytest

from pafm_jax import text

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'minilm_reference.npz'


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(FIXTURE))


def test_tokenizer_matches_transformers(reference):
  ids, mask = text.default_encoder().tokenize(list(reference['sentences']))
  np.testing.assert_array_equal(ids, reference['input_ids'])
  np.testing.assert_array_equal(mask, reference['attention_mask'])


def test_encode_matches_transformers_bert_and_sentence_pooling(reference):
  """Pooled vectors within 1e-4 and token states within 1e-3 (absolute) of the reference,
  at the real tokens (padding positions hold no meaning and are not compared)."""
  tokens, mask, pooled = text.encode(list(reference['sentences']))
  assert tokens.shape == (10, 14, 384) and pooled.shape == (10, 384)
  real = reference['attention_mask'].astype(bool)
  np.testing.assert_allclose(tokens[real], reference['token_states'][real], atol=1e-3)
  np.testing.assert_allclose(pooled, reference['pooled'], atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, rtol=1e-6)
  # A sentence's encoding does not depend on what it is batched with (padding is masked).
  alone, _, pooled_alone = text.encode([str(reference['sentences'][2])])
  np.testing.assert_allclose(pooled_alone[0], pooled[2], atol=1e-5)
  np.testing.assert_allclose(alone[0], tokens[2, :alone.shape[1]], atol=1e-4)


def test_bad_inputs_are_refused_with_what_to_do(tmp_path):
  with pytest.raises(TypeError, match='list of sentences'):
    text.encode('a bag')
  with pytest.raises(FileNotFoundError, match='config.json, model.safetensors'):
    text.load_encoder(tmp_path)
