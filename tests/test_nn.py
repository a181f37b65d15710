"""The Flax layers (tqjax.nn): NNX attention over the compressed / full-precision cache, the
Linen wrapper, weight import from nnx.MultiHeadAttention, and the Gemma-style generation loop.

Shapes are tiny (in 32, 4 query heads, 2 kv heads, head_dim 16) and everything that loops runs
under nnx.jit so the file stays well under a minute on 2 CPU cores.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")

from tqjax import cache as tqcache  # noqa: E402
from tqjax import ops as tq_ops  # noqa: E402
from tqjax import nn as tqnn  # noqa: E402
from tqjax.cache import CacheConfig  # noqa: E402

D_IN, N, K, H = 32, 4, 2, 16
CFG = CacheConfig(head_dim=H)  # the recommended defaults


def _x(b, t, seed=0, d=D_IN):
  return jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)


def _layer(cache_config=CFG, num_kv_heads=K, **kw):
  kw.setdefault("use_rope", True)
  return tqnn.TurboQuantAttention(D_IN, N, num_kv_heads, H, cache_config=cache_config, rngs=nnx.Rngs(0), **kw)


@nnx.jit(static_argnames=("mode",))
def _call(layer, x, lengths=None, *, mode):
  return layer(x, mode=mode, lengths=lengths)


def _prefill_then_decode(layer, x, t0, chunk=1, lengths=None):
  """Prefill x[:, :t0], then decode the rest `chunk` tokens at a time → [B, T, out]."""
  outs = [_call(layer, x[:, :t0], lengths, mode="prefill")]
  for i in range(t0, x.shape[1], chunk):
    outs.append(_call(layer, x[:, i:i + chunk], mode="decode"))
  return jnp.concatenate(outs, axis=1)


# Shapes shared across tests so nnx.jit reuses compilations (its cache keys on the graphdef,
# which includes the cache config): B = 2, cache of CAP slots, prompts of P tokens.
B, CAP, P = 2, 16, 6

# ----------------------------------------------------------------------------- equivalences


def test_layer_equals_functional_cache_attention():
  """Decode through the layer == projections + RoPE + tqjax.cache prefill/append/attention by hand."""
  layer = _layer()
  x = _x(B, P + 3)
  layer.init_cache(B, CAP)
  _call(layer, x[:, :P], mode="prefill")
  y1 = _call(layer, x[:, P:P + 1], mode="decode")
  y2 = _call(layer, x[:, P + 1:P + 3], mode="decode")  # T = 2: chunked_attention

  def rope_qkv(xs, pos):
    q, k, v = layer.project(xs)
    q, k = tqnn.apply_rope(q, pos), tqnn.apply_rope(k, pos)
    return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  @jax.jit
  def reference(x):
    pos = lambda a, b: jnp.broadcast_to(jnp.arange(a, b, dtype=jnp.int32), (B, b - a))
    o = lambda a: layer.o_proj(a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], N * H))
    c = tqcache.init_cache(CFG, B, K, CAP)
    _, k, v = rope_qkv(x[:, :P], pos(0, P))
    c = tq_ops.prefill(c, k, v)
    q, k, v = rope_qkv(x[:, P:P + 1], pos(P, P + 1))
    c = tqcache.append(c, k, v)
    ref1 = o(tq_ops.attention(c, q[:, :, 0], implementation="xla")[:, :, None])
    q, k, v = rope_qkv(x[:, P + 1:P + 3], pos(P + 1, P + 3))
    c = tqcache.append(c, k, v)
    return ref1, o(tq_ops.chunked_attention(c, q))

  ref1, ref2 = reference(x)
  np.testing.assert_allclose(y1, ref1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y2, ref2, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(layer.lengths, [P + 3] * B)
  assert layer.nbytes() == tqcache.expected_nbytes(CFG, B, K, CAP)


@pytest.mark.parametrize("num_kv_heads", [K, 1], ids=["gqa", "mqa"])
def test_prefill_decode_equals_full_forward_uncompressed(num_kv_heads):
  """Compression off: prefill + one-token and two-token decode steps reproduce one forward pass."""
  layer = _layer(None, num_kv_heads)
  x = _x(B, P + 4, seed=1)
  full = _call(layer, x, mode="prefill")  # no cache yet: plain causal attention
  layer.init_cache(B, CAP)
  np.testing.assert_allclose(_prefill_then_decode(layer, x, P, chunk=1), full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(_prefill_then_decode(layer, x, P, chunk=2), full, atol=1e-5, rtol=1e-5)


def test_decode_in_fori_loop_via_split_merge():
  """The cache state carried through lax.fori_loop (nnx.split/merge) == stepping under nnx.jit."""
  layer = _layer(None)
  x = _x(B, P + 4, seed=2)
  layer.init_cache(B, CAP)
  ref = _prefill_then_decode(layer, x, P)

  layer.init_cache(B, CAP)
  _call(layer, x[:, :P], mode="prefill")
  graphdef, cache_state, rest = nnx.split(layer, nnx.Cache, ...)

  @jax.jit
  def loop(cache_state, rest, xs):
    def body(i, carry):
      cache_state, out = carry
      m = nnx.merge(graphdef, cache_state, rest)
      y = m(jax.lax.dynamic_slice_in_dim(xs, i, 1, axis=1), mode="decode")
      return nnx.state(m, nnx.Cache), jax.lax.dynamic_update_slice_in_dim(out, y, i, axis=1)

    return jax.lax.fori_loop(0, xs.shape[1], body, (cache_state, jnp.zeros_like(xs)))

  cache_state, out = loop(cache_state, rest, x[:, P:])
  nnx.update(layer, cache_state)
  np.testing.assert_allclose(out, ref[:, P:], atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(layer.lengths, [P + 4] * B)


def test_prefill_decode_compressed_within_quantization_tolerance():
  """Compressed decode ≈ the full forward pass; more bits → closer. Prefill itself is exact."""
  x = _x(B, P + 4, seed=3)
  errs = {}
  for name, cfg in (("k2v2", CacheConfig(head_dim=H, k_bits=2, v_bits=2)), ("default", CFG)):
    layer = _layer(cfg)
    full = _call(layer, x, mode="prefill")
    layer.init_cache(B, CAP)
    got = _prefill_then_decode(layer, x, P, chunk=4)
    np.testing.assert_allclose(got[:, :P], full[:, :P], atol=1e-5, rtol=1e-5)
    errs[name] = float(jnp.linalg.norm(got[:, P:] - full[:, P:]) / jnp.linalg.norm(full[:, P:]))
  # Measured: k2v2 ≈ 0.40, defaults (4 bits) ≈ 0.15 (head_dim 16 is a hard case: error grows as d shrinks).
  assert errs["default"] < 0.25, errs
  assert errs["default"] < errs["k2v2"] / 2, errs


@pytest.mark.parametrize("cache_config", [None, CFG], ids=["dense", "compressed"])
def test_ragged_prefill_matches_unpadded_sequence(cache_config):
  """A right-padded batch with lengths [3, 6]: sequence 0 equals itself run alone, unpadded."""
  layer = _layer(cache_config)
  x = _x(B, P, seed=4)
  new = _x(B, 2, seed=5)
  layer.init_cache(B, CAP)
  p = _call(layer, x, jnp.array([3, P], jnp.int32), mode="prefill")
  d = [_call(layer, new[:, i:i + 1], mode="decode") for i in range(2)]
  np.testing.assert_array_equal(layer.lengths, [5, P + 2])
  solo = _layer(cache_config)
  solo.init_cache(1, CAP)
  ps = _call(solo, x[:1, :3], mode="prefill")
  ds = [_call(solo, new[:1, i:i + 1], mode="decode") for i in range(2)]
  np.testing.assert_allclose(p[0, :3], ps[0], atol=1e-5, rtol=1e-5)
  for i in range(2):
    np.testing.assert_allclose(d[i][0], ds[i][0], atol=1e-5, rtol=1e-5)


def test_linen_wrapper_equals_nnx_layer():
  """Same weights: Linen init (= prefill) and two decode steps == the NNX layer's."""
  x = _x(B, P + 2, seed=6)
  mod = tqnn.TurboQuantAttentionLinen(N, K, H, cache_config=CFG, max_length=CAP, use_rope=True)
  y0, variables = jax.jit(mod.init_with_output)(jax.random.key(0), x[:, :P])
  assert set(variables) == {"params", "cache"}
  assert isinstance(variables["cache"]["kv"], tqcache.KVCache)
  p = variables["params"]
  layer = tqnn.TurboQuantAttention.from_weights(
      p["q_proj"]["kernel"], p["k_proj"]["kernel"], p["v_proj"]["kernel"], p["o_proj"]["kernel"],
      num_heads=N, num_kv_heads=K, cache_config=CFG, use_rope=True)
  assert jax.tree.structure(tqnn.linen_params_from_nnx(layer)["params"]) == jax.tree.structure(p)
  layer.init_cache(B, CAP)
  ref = _prefill_then_decode(layer, x, P)

  decode = jax.jit(lambda v, x: mod.apply(v, x, mode="decode", mutable=["cache"]))
  outs, upd = [y0], {"cache": variables["cache"]}
  for i in range(P, P + 2):
    y, upd = decode({"params": p, **upd}, x[:, i:i + 1])
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(upd["cache"]["kv"].lengths, [P + 2] * B)
  with pytest.raises(ValueError, match="mutable"):
    mod.apply({"params": p, **upd}, x[:, :1], mode="decode")


@pytest.mark.parametrize("causal", [False, True])
def test_from_multihead_attention_reproduces_mha(causal):
  mha = nnx.MultiHeadAttention(N, D_IN, num_kv_heads=K, decode=False, rngs=nnx.Rngs(1))
  x = _x(2, 7, seed=7)
  mask = nnx.make_causal_mask(jnp.ones((2, 7))) if causal else None
  ref = nnx.jit(lambda m, x: m(x, mask=mask))(mha, x)
  layer = tqnn.TurboQuantAttention.from_multihead_attention(mha, None, causal=causal)
  assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (N, K, D_IN // N)
  np.testing.assert_allclose(_call(layer, x, mode="prefill"), ref, atol=1e-5, rtol=1e-5)
  if causal:  # and through the cache
    layer.init_cache(2, 8)
    np.testing.assert_allclose(_prefill_then_decode(layer, x, 3), ref, atol=1e-5, rtol=1e-5)


def test_from_weights_two_and_three_dim():
  src = _layer(None, qkv_bias=True)
  w = {n: getattr(src, n).kernel.get_value() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  b = {n: getattr(src, n).bias.get_value() for n in ("q_proj", "k_proj", "v_proj")}
  x = _x(1, 5, seed=8)
  flat = tqnn.TurboQuantAttention.from_weights(
      w["q_proj"], w["k_proj"], w["v_proj"], w["o_proj"], bq=b["q_proj"], bk=b["k_proj"], bv=b["v_proj"],
      num_heads=N, num_kv_heads=K, use_rope=True)
  heads = tqnn.TurboQuantAttention.from_weights(
      w["q_proj"].reshape(D_IN, N, H), w["k_proj"].reshape(D_IN, K, H), w["v_proj"].reshape(D_IN, K, H),
      w["o_proj"].reshape(N, H, D_IN), bq=b["q_proj"].reshape(N, H), bk=b["k_proj"], bv=b["v_proj"],
      use_rope=True)
  ref = _call(src, x, mode="prefill")
  np.testing.assert_allclose(_call(flat, x, mode="prefill"), ref, atol=1e-6)
  np.testing.assert_allclose(_call(heads, x, mode="prefill"), ref, atol=1e-6)


# ----------------------------------------------------------------------------- generation loop


def test_generation_loop_compiles_once():
  """20 greedy steps under one scan: the step body is traced once, and a second prompt of the
  same shape reuses the compilation; the loop equals stepping prefill/decode_step by hand."""
  model = tqnn.GemmaStyleDecoder(64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                 cache_config=CacheConfig(head_dim=8), rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, 64)
  before = dict(tqnn.TRACE_COUNTS)
  toks, logits = model.generate(prompt, 20)
  toks2, _ = model.generate(jnp.flip(prompt, axis=1), 20)
  assert toks.shape == toks2.shape == (2, 20) and logits.shape == (2, 20, 64)
  for key in ("generate", "generate_step"):
    assert tqnn.TRACE_COUNTS[key] - before.get(key, 0) == 1, key
  np.testing.assert_array_equal(model.layers[0].attn.lengths, [24, 24])

  # The scan loop == prefill + decode_step called one at a time (fed the loop's own tokens).
  model.init_cache(2, 24)
  step = nnx.jit(lambda m, t: m.decode_step(t))
  lg = [nnx.jit(lambda m, p: m.prefill(p))(model, prompt)]
  for i in range(7):
    lg.append(step(model, toks[:, i]))
  lg = jnp.stack(lg, axis=1)
  np.testing.assert_allclose(logits[:, :8], lg, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(toks[:, :8], jnp.argmax(lg, axis=-1))

# ----------------------------------------------------------------------------- errors


def test_heads_not_divisible():
  with pytest.raises(ValueError, match=r"num_heads=6 must be divisible by num_kv_heads=4"):
    tqnn.TurboQuantAttention(D_IN, 6, 4, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"num_heads=6 must be divisible by num_kv_heads=4"):
    tqnn.TurboQuantAttentionLinen(6, 4, 8).init(jax.random.key(0), _x(1, 2))


def test_clear_errors():
  layer = _layer()
  x = _x(1, 6)
  with pytest.raises(ValueError, match="decode before init_cache"):
    layer(x[:, :1], mode="decode")
  with pytest.raises(ValueError, match="mode must be one of"):
    layer(x, mode="train")
  with pytest.raises(ValueError, match="cache_config.head_dim=8 must equal"):
    tqnn.TurboQuantAttention(D_IN, N, K, H, cache_config=CacheConfig(head_dim=8), rngs=nnx.Rngs(0))
  layer.init_cache(1, 4)
  with pytest.raises(ValueError, match=r"prompt has 6 tokens, longer than the cache \(max_length=4\)"):
    layer(x, mode="prefill")
  with pytest.raises(ValueError, match="batch size 2 differs"):
    layer(_x(2, 2), mode="prefill")
  dense = _layer(None)
  dense.init_cache(1, 4)
  _call(dense, x[:, :3], mode="prefill")
  _call(dense, x[:, :1], mode="decode")
  with pytest.raises(ValueError, match="would exceed the cache"):  # eager: lengths are concrete
    dense(x[:, 4:5], mode="decode")
  with pytest.raises(ValueError, match="decode before init_cache"):
    tqnn.TurboQuantAttentionLinen(N, K, H).apply({"params": {}}, x[:, :1], mode="decode")
