"""The Flax layers (tqjax.nn): NNX attention over the compressed / full-precision cache, the
options real decoders need (QK-norm, RoPE bases, sliding windows, scale, soft cap) against a
float64 NumPy forward pass, `implementation` reaching every cache operation, the Linen wrapper,
weight import from nnx.MultiHeadAttention, and the Gemma-style generation loop.

Shapes are tiny (D 32, 4 query heads, 2 kv heads, head_dim 16) and everything that loops runs
under nnx.jit so the file stays short on 2 CPU cores.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")

from pallas_kernels import dispatch  # noqa: E402
from tqjax import cache as tqcache  # noqa: E402
from tqjax import nn as tqnn  # noqa: E402
from tqjax import ops as tq_ops  # noqa: E402
from tqjax import partials  # noqa: E402
from tqjax.cache import CacheConfig  # noqa: E402
from tqjax.dense_cache import DenseCacheConfig, DenseKVCache  # noqa: E402
from tqjax.models.gemma_style import GemmaStyleDecoder  # noqa: E402

pytestmark = pytest.mark.math

pytestmark = pytest.mark.math

D_IN, N, K, H = 32, 4, 2, 16
CFG = CacheConfig(head_dim=H)  # the recommended defaults


def _x(b, t, seed=0, d=D_IN):
  return jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)


def _layer(cache_config=CFG, num_kv_heads=K, **kw):
  kw.setdefault("rope_base", 1e4)
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
  """Same weights (QK-norm scales set): Linen prefill and two decode steps == the NNX layer's."""
  x = _x(B, P + 2, seed=6)
  opts = dict(rope_base=1e4, sliding_window=4)
  mod = tqnn.TurboQuantAttentionLinen(N, K, H, cache_config=CFG, capacity=CAP, qk_norm=True, **opts)
  _, variables = jax.jit(mod.init_with_output)(jax.random.key(0), x[:, :P])
  assert set(variables) == {"params", "cache"}
  assert isinstance(variables["cache"]["kv"], tqcache.KVCache)
  p = {**variables["params"], "q_norm": {"scale": _x(1, 1, 30, H)[0, 0]}, "k_norm": {"scale": _x(1, 1, 31, H)[0, 0]}}
  layer = tqnn.TurboQuantAttention.from_weights(
      p["q_proj"]["kernel"], p["k_proj"]["kernel"], p["v_proj"]["kernel"], p["o_proj"]["kernel"],
      q_norm=p["q_norm"]["scale"], k_norm=p["k_norm"]["scale"], num_heads=N, num_kv_heads=K, cache_config=CFG,
      **opts)
  jax.tree.map(np.testing.assert_array_equal, tqnn.linen_params_from_nnx(layer)["params"], p)
  layer.init_cache(B, CAP)
  ref = _prefill_then_decode(layer, x, P)

  prefill = jax.jit(lambda v, x: mod.apply(v, x, mutable=["cache"]))
  decode = jax.jit(lambda v, x: mod.apply(v, x, mode="decode", mutable=["cache"]))
  y0, upd = prefill({"params": p}, x[:, :P])  # a fresh cache of `capacity` slots
  outs = [y0]
  for i in range(P, P + 2):
    y, upd = decode({"params": p, **upd}, x[:, i:i + 1])
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), ref, atol=1e-6, rtol=1e-6)
  np.testing.assert_array_equal(upd["cache"]["kv"].lengths, [P + 2] * B)
  assert upd["cache"]["kv"].capacity == CAP
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
      num_heads=N, num_kv_heads=K, rope_base=1e4)
  heads = tqnn.TurboQuantAttention.from_weights(
      w["q_proj"].reshape(D_IN, N, H), w["k_proj"].reshape(D_IN, K, H), w["v_proj"].reshape(D_IN, K, H),
      w["o_proj"].reshape(N, H, D_IN), bq=b["q_proj"].reshape(N, H), bk=b["k_proj"], bv=b["v_proj"],
      rope_base=1e4)
  ref = _call(src, x, mode="prefill")
  np.testing.assert_allclose(_call(flat, x, mode="prefill"), ref, atol=1e-6)
  np.testing.assert_allclose(_call(heads, x, mode="prefill"), ref, atol=1e-6)


# ----------------------------------------------------------------------------- decoder options


def _np_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)


def _np_rope(x, base):
  """x [B, T, N, H] float64 at positions 0 .. T − 1: channel i and i + H/2 as one complex number."""
  h = x.shape[-1] // 2
  theta = base ** (-np.arange(h) * 2.0 / x.shape[-1])
  z = (x[..., :h] + 1j * x[..., h:]) * np.exp(1j * np.arange(x.shape[1])[None, :, None, None] * theta)
  return np.concatenate([z.real, z.imag], axis=-1)


def _np_forward(x, w, *, n, kh, rope_base, scale, qk_norm=None, eps=1e-6, soft_cap=None, window=None,
                norm_after_rope=False):
  """float64 causal self-attention: x [B, T, D] → [B, T, out] with weights w (wq [D, N·H], ...)."""
  b, t, _ = x.shape
  h = w["wq"].shape[1] // n
  q = (x @ w["wq"]).reshape(b, t, n, h)
  k = (x @ w["wk"]).reshape(b, t, kh, h)
  v = (x @ w["wv"]).reshape(b, t, kh, h)
  norm = lambda q, k: (q, k) if qk_norm is None else (_np_rms(q, qk_norm[0], eps), _np_rms(k, qk_norm[1], eps))
  rope = lambda q, k: (_np_rope(q, rope_base), _np_rope(k, rope_base))
  q, k = norm(*rope(q, k)) if norm_after_rope else rope(*norm(q, k))
  k, v = np.repeat(k, n // kh, axis=2), np.repeat(v, n // kh, axis=2)
  z = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if soft_cap is not None:
    z = soft_cap * np.tanh(z / soft_cap)
  pos = np.arange(t)
  ok = pos[None, :] <= pos[:, None]
  if window is not None:
    ok &= pos[None, :] > pos[:, None] - window
  z = np.where(ok, z, -np.inf)
  p = np.exp(z - z.max(-1, keepdims=True))
  o = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)
  return o.reshape(b, t, n * h) @ w["wo"]


# SmolLM2 (Llama): GQA 3:1, RoPE θ = 1e5. Gemma 3: MQA, QK-norm, query_pre_attn_scalar ≠ H, width ≠ N·H,
# local layers RoPE 1e4 with a sliding window, global layers RoPE 1e6 (soft cap here for coverage).
# compressed: also run through a K8/V8 cache (one configuration covers that path).
DECODERS = {
    "smollm2": dict(d=32, n=6, kh=2, rope_base=1e5),
    "gemma3_local": dict(d=24, n=4, kh=1, rope_base=1e4, qk_norm=True, window=3, scale=0.2, compressed=True),
    "gemma3_global": dict(d=24, n=4, kh=1, rope_base=1e6, qk_norm=True, scale=0.2, soft_cap=5.0),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_options_match_float64_forward(name):
  """Prefill alone, and prefill + decode steps of 1 and 2 tokens through a dense float32 cache,
  reproduce the NumPy forward pass; through a K8/V8 cache (one configuration), within quantization error."""
  c = DECODERS[name]
  r = np.random.default_rng(40)
  n, kh, d, t = c["n"], c["kh"], c["d"], 9
  w = {"wq": r.standard_normal((d, n * H)) / np.sqrt(d), "wk": r.standard_normal((d, kh * H)) / np.sqrt(d),
       "wv": r.standard_normal((d, kh * H)) / np.sqrt(d), "wo": r.standard_normal((n * H, d)) / np.sqrt(n * H)}
  norms = (0.5 * r.standard_normal(H), 0.5 * r.standard_normal(H)) if c.get("qk_norm") else None
  scale = c.get("scale", H**-0.5)
  x = r.standard_normal((B, t, d))
  want = _np_forward(x, w, n=n, kh=kh, rope_base=c["rope_base"], scale=scale, qk_norm=norms,
                     soft_cap=c.get("soft_cap"), window=c.get("window"))
  xj = jnp.asarray(x, jnp.float32)

  def build(cache_config):
    return tqnn.TurboQuantAttention.from_weights(
        *(jnp.asarray(w[k], jnp.float32) for k in ("wq", "wk", "wv", "wo")), num_heads=n, num_kv_heads=kh,
        q_norm=None if norms is None else jnp.asarray(norms[0], jnp.float32),
        k_norm=None if norms is None else jnp.asarray(norms[1], jnp.float32), cache_config=cache_config,
        rope_base=c["rope_base"], scale=c.get("scale"), soft_cap=c.get("soft_cap"), sliding_window=c.get("window"))

  layer = build(None)
  assert (layer.q_norm is not None) == bool(norms)
  np.testing.assert_allclose(_call(layer, xj, mode="prefill"), want, atol=2e-5, rtol=2e-5)
  layer.init_cache(B, CAP)
  assert isinstance(layer.cache, DenseKVCache) and layer.cache.k.dtype == jnp.float32
  for chunk in (1, 2):
    np.testing.assert_allclose(_prefill_then_decode(layer, xj, 4, chunk=chunk), want, atol=2e-5, rtol=2e-5)
  if not c.get("compressed"):
    return
  comp = build(CacheConfig(head_dim=H, k_bits=8, v_bits=8))
  comp.init_cache(B, CAP)
  got = np.asarray(_prefill_then_decode(comp, xj, 4, chunk=2))
  np.testing.assert_allclose(got[:, :4], want[:, :4], atol=2e-5, rtol=2e-5)  # prefill attends in full precision
  # 8-bit codes reconstruct k and v to ~0.7 % (√ of the mse distortion 2.7·4⁻⁸); 5 % leaves room for
  # its passage through softmax and the output projection, and fails for a misplaced token.
  rel = np.linalg.norm(got[:, 4:] - want[:, 4:]) / np.linalg.norm(want[:, 4:])
  assert rel < 0.05, rel


def test_qk_norm_comes_before_rope():
  """With per-channel norm scales, norm-then-RoPE and RoPE-then-norm differ; the layer is the first."""
  c = DECODERS["gemma3_global"]
  r = np.random.default_rng(41)
  d, n, kh = c["d"], c["n"], c["kh"]
  w = {k: r.standard_normal(s) / np.sqrt(s[0]) for k, s in
       (("wq", (d, n * H)), ("wk", (d, kh * H)), ("wv", (d, kh * H)), ("wo", (n * H, d)))}
  norms = (r.standard_normal(H), r.standard_normal(H))
  x = r.standard_normal((1, 6, d))
  layer = tqnn.TurboQuantAttention.from_weights(
      *(jnp.asarray(w[k], jnp.float32) for k in ("wq", "wk", "wv", "wo")), num_heads=n, num_kv_heads=kh,
      q_norm=jnp.asarray(norms[0], jnp.float32), k_norm=jnp.asarray(norms[1], jnp.float32), rope_base=1e2)
  got = np.asarray(_call(layer, jnp.asarray(x, jnp.float32), mode="prefill"))
  opts = dict(n=n, kh=kh, rope_base=1e2, scale=H**-0.5, qk_norm=norms)
  np.testing.assert_allclose(got, _np_forward(x, w, **opts), atol=2e-5, rtol=2e-5)
  wrong = _np_forward(x, w, norm_after_rope=True, **opts)
  assert np.abs(got - wrong).max() > 100 * 2e-5, np.abs(got - wrong).max()


@pytest.mark.parametrize("cache_config", [None, CFG], ids=["dense", "compressed"])
def test_bfloat16_layer_within_rounding_of_float32(cache_config):
  """dtype=bfloat16 (weights float32, activations and a dense cache in bfloat16) under strict dtype
  promotion: prefill and decode stay within a few bfloat16 roundings (u = 2⁻⁹) of float32."""
  x = _x(B, P + 2, seed=12)
  outs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    layer = _layer(cache_config, 1, qk_norm=True, sliding_window=3, dtype=dtype)
    layer.init_cache(B, CAP)
    outs[dtype] = np.asarray(_prefill_then_decode(layer, x.astype(dtype), P).astype(jnp.float32))
    if cache_config is None:
      assert layer.cache.k.dtype == dtype
  # Measured 0.0047 (dense), 0.0042 (compressed): roundings of x, q, k, v, the cache and the output.
  rel = np.linalg.norm(outs[jnp.bfloat16] - outs[jnp.float32]) / np.linalg.norm(outs[jnp.float32])
  assert rel < 8 * 2.0**-9, rel


# ----------------------------------------------------------------------------- implementation


def _spy_kernels(monkeypatch, calls):
  """Replaces the kernel table's callables with the XLA reference, recording each request."""
  def prefill_encoder(cache, dtypes, *, xla_fallback=False, interpret=False, **options):
    calls.append(("encode", xla_fallback))
    return tqcache.encode_tokens

  def decode_partial_fn(cache, rows, **options):
    calls.append(("decode", rows))
    return partials.compressed_partial_reference

  monkeypatch.setattr(dispatch, "prefill_encoder", prefill_encoder)
  monkeypatch.setattr(dispatch, "decode_partial_fn", decode_partial_fn)


def test_implementation_reaches_prefill_and_every_decode(monkeypatch):
  """implementation="pallas" asks the kernel table for the prefill's encoder and for the partial of
  one-token and of two-token decode (G·T rows); the results equal implementation="xla"'s."""
  calls = []
  _spy_kernels(monkeypatch, calls)
  x = _x(B, P + 3, seed=9)
  out = {}
  for impl in ("xla", "pallas"):
    layer = _layer(implementation=impl)
    layer.init_cache(B, CAP)
    out[impl] = _prefill_then_decode(layer, x[:, :P + 1], P, chunk=1)
    out[impl] = jnp.concatenate([out[impl], _call(layer, x[:, P + 1:], mode="decode")], axis=1)
  assert calls == [("encode", False), ("decode", N // K), ("decode", 2 * N // K)], calls
  np.testing.assert_allclose(out["pallas"], out["xla"], atol=1e-6, rtol=1e-6)


def test_pallas_on_cpu_names_why(monkeypatch):
  """Without a kernel for the backend, implementation="pallas" raises at the prefill and at decode."""
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU backend has no fused kernel; others may")
  x = _x(1, P + 2, seed=10)  # batch 1: shapes no other test compiled (nnx.jit would reuse a trace)
  layer = _layer(implementation="pallas")
  layer.init_cache(1, CAP)
  with pytest.raises(ValueError, match='"pallas" is not available for this prefill: no fused encode kernel'):
    _call(layer, x[:, :P], mode="prefill")
  monkeypatch.setattr(dispatch, "prefill_encoder", lambda *a, **k: tqcache.encode_tokens)
  _call(layer, x[:, :P], mode="prefill")
  for t in (1, 2):
    with pytest.raises(ValueError, match='"pallas" is not available for this cache: no fused kernel for backend'):
      _call(layer, x[:, P:P + t], mode="decode")
  dense = _layer(None, implementation="pallas")
  dense.init_cache(1, CAP)
  with pytest.raises(ValueError, match='"pallas" is not available for a dense cache'):
    _call(dense, x[:, :P], mode="prefill")


# ----------------------------------------------------------------------------- generation loop


def test_generation_loop_compiles_once(monkeypatch):
  """20 greedy steps under one scan: prefill and the step body are traced once, and a second
  prompt of the same shape reuses the compilation; the loop equals stepping prefill/decode_step by hand."""
  traces = {"prefill": 0, "decode_step": 0}
  for name in traces:
    method = getattr(GemmaStyleDecoder, name)

    def counted(self, *args, _method=method, _name=name):
      traces[_name] += 1  # runs while tracing, not while executing
      return _method(self, *args)

    monkeypatch.setattr(GemmaStyleDecoder, name, counted)
  model = GemmaStyleDecoder(64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                            cache_config=CacheConfig(head_dim=8), rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, 64)
  toks, logits = model.generate(prompt, 20)
  toks2, _ = model.generate(jnp.flip(prompt, axis=1), 20)
  assert toks.shape == toks2.shape == (2, 20) and logits.shape == (2, 20, 64)
  assert traces == {"prefill": 1, "decode_step": 1}, traces
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


def test_dense_cache_config_sets_the_cache_dtype():
  model = GemmaStyleDecoder(64, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                            cache_config=DenseCacheConfig(head_dim=8, dtype="bfloat16"), rngs=nnx.Rngs(0))
  model.init_cache(2, 12)
  cache = model.layers[0].attn.cache
  assert cache.k.dtype == jnp.bfloat16 and model.nbytes() == 2 * 2 * 2 * 12 * 8 * 2 + 4 * 2

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
  with pytest.raises(ValueError, match="rope_base must be a finite number > 1 or None"):
    tqnn.TurboQuantAttention(D_IN, N, K, H, rope_base=0.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="soft_cap must be a positive finite number"):
    tqnn.TurboQuantAttention(D_IN, N, K, H, soft_cap=-1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="give both q_norm and k_norm or neither"):
    tqnn.TurboQuantAttention.from_weights(*(jnp.zeros((D_IN, N * H)),) * 3, jnp.zeros((N * H, D_IN)),
                                          num_heads=N, q_norm=jnp.zeros(H))
  layer.init_cache(1, 4)
  with pytest.raises(ValueError, match=r"prefill: 6 tokens exceed the cache capacity=4"):
    layer(x, mode="prefill")
  with pytest.raises(ValueError, match=r"prefill: lengths must lie in \[0, T=2\]"):
    layer(x[:, :2], mode="prefill", lengths=jnp.array([3], jnp.int32))
  with pytest.raises(ValueError, match=r"prefill: k must be \[batch=1,"):
    layer(_x(2, 2), mode="prefill")
  dense = _layer(None)
  dense.init_cache(1, 4)
  _call(dense, x[:, :3], mode="prefill")
  _call(dense, x[:, :1], mode="decode")
  with pytest.raises(ValueError, match=r"append past capacity=4"):  # eager: lengths are concrete
    dense(x[:, 4:5], mode="decode")
  with pytest.raises(ValueError, match="decode before init_cache"):
    tqnn.TurboQuantAttentionLinen(N, K, H).apply({"params": {}}, x[:, :1], mode="decode")
