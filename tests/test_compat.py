"""Seed-style TurboQuant wrapper: bits convention, equality with the functional core, byte
accounting, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from tqjax.compat import TurboQuant, TurboQuantConfig, TurboQuantKVCache

pytestmark = pytest.mark.math


def test_bits_are_total_bits():
  # The seed's "3-bit codebook + QJL" (4 bits per coordinate) is bits=4 with QJL here.
  cfg = TurboQuantConfig(dimension=64, bits=4, qjl_enabled=True).quantizer_config()
  assert (cfg.variant, cfg.bits, cfg.mse_bits, cfg.sketch_dim) == ("prod", 4, 3, 64)
  cfg = TurboQuantConfig(dimension=64, bits=3, qjl_enabled=False).quantizer_config()
  assert (cfg.variant, cfg.bits, cfg.mse_bits, cfg.sketch_dim) == ("mse", 3, 3, 0)
  cfg = TurboQuantConfig(dimension=64, bits=2, qjl_enabled=True, qjl_dim=96, seed=5).quantizer_config()
  assert (cfg.sketch_dim, cfg.seed) == (96, 5)


def test_seed_defaults():
  # The seed's dataclass: bits=4, qjl_enabled=True, qjl_dim=0 (= dimension), seed=42.
  cfg = TurboQuantConfig(dimension=128)
  assert (cfg.bits, cfg.qjl_enabled, cfg.qjl_dim, cfg.seed) == (4, True, 0, 42)
  core = cfg.quantizer_config()
  assert (core.dim, core.bits, core.variant, core.sketch_dim, core.seed) == (128, 4, "prod", 128, 42)
  # qjl_dim=0 is "= dimension": the same quantizer as qjl_dim=dimension.
  zero = TurboQuant(TurboQuantConfig(dimension=32, qjl_dim=0)).quantizer
  full = TurboQuant(TurboQuantConfig(dimension=32, qjl_dim=32)).quantizer
  assert zero.qjl.sketch_dim == full.qjl.sketch_dim == 32
  np.testing.assert_array_equal(zero.qjl.matrix, full.qjl.matrix)


def test_seed_script_usage_runs_as_written():
  """The seed's own KV-cache demo, line for line (smaller): one head, one token per append,
  attention_scores(query [d]) → [n] that np.corrcoef takes, compressed_size_bytes() per vector."""
  d_kv, seq_len = 64, 16
  keys = np.asarray(jax.random.normal(jax.random.key(0), (seq_len, d_kv)), np.float64)
  keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
  values = np.asarray(jax.random.normal(jax.random.key(1), (seq_len, d_kv)), np.float64)
  cache = TurboQuantKVCache(TurboQuantConfig(dimension=d_kv, bits=3, qjl_enabled=True), capacity=32)
  for t in range(seq_len):
    cache.append(keys[t], values[t])
  assert len(cache) == seq_len
  query = np.asarray(jax.random.normal(jax.random.key(2), (d_kv,)))
  scores = cache.attention_scores(query)
  assert scores.shape == (seq_len,)
  assert np.all(np.isfinite(np.asarray(scores)))
  # Unit keys, q ~ N(0, I): true scores have sd ≈ 1. At 3 total bits (2-bit codebook + QJL) the
  # estimate's error sd is ≈ 0.35 (prod distortion ≈ 0.12·‖q‖²/d), so ρ ≈ 0.94; with 16 tokens
  # ρ's SE ≈ (1 − ρ²)/√16 ≈ 0.03, and 0.8 is more than 4 SE below.
  assert np.corrcoef(scores, keys @ query)[0, 1] > 0.8
  assert cache.attention(query).shape == (d_kv,)
  tq = TurboQuant(TurboQuantConfig(dimension=d_kv))
  # 4 bits prod at d = 64: 3·64/8 = 24 code bytes + 64/8 = 8 sign bytes + 4 + 4 norm bytes = 40.
  assert tq.compressed_size_bytes() == 40 == tq.compressed_size_bytes(1)
  assert seq_len * tq.compressed_size_bytes() == tq.compress(keys.astype(np.float32)).nbytes


@pytest.mark.parametrize("qjl", [False, True])
def test_wraps_the_functional_core(qjl):
  tq = TurboQuant(TurboQuantConfig(dimension=64, bits=3, qjl_enabled=qjl, seed=2))
  core = tqjax.make_quantizer(64, 3, "prod" if qjl else "mse", seed=2)
  x = jax.random.normal(jax.random.key(0), (2, 5, 64))
  code = tq.compress(x)
  want = tqjax.encode(core, x)
  for a, b in zip(jax.tree.leaves(code), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(code.norms))
  out = tq.decompress(code)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out, tqjax.decode(core, want))
  assert tq.decompress(code, jnp.bfloat16).dtype == jnp.bfloat16
  q = jax.random.normal(jax.random.key(1), (64,))
  ip = tq.inner_product(q, code)
  assert ip.shape == (2, 5) and np.all(np.isfinite(ip))
  np.testing.assert_array_equal(ip, tqjax.estimate_ip(core, q, want))


def test_numpy_inputs():
  tq = TurboQuant(TurboQuantConfig(dimension=32, bits=4, qjl_enabled=False))
  # (Not np.random.default_rng(0): that is the seed-0 rotation's own stream, see test_quantizer.)
  x = np.asarray(jax.random.normal(jax.random.key(0), (64, 32)), np.float16)
  out = np.asarray(tq.decompress(tq.compress(x)))
  rel = np.sum((out - x.astype(np.float32)) ** 2) / np.sum(x.astype(np.float32) ** 2)
  # 64 vectors, per-vector relative error sd ≈ 0.45·D at d = 32 → SE ≈ 0.06·D; ±25% is 4 SE.
  assert abs(rel / tqjax.distortion(4, 32) - 1) < 0.25, rel
  assert tq.inner_product(x[0].astype(np.float32), tq.compress(x)).shape == (64,)


def test_compression_ratio_hand_cases():
  # mse, d = 128, 4 bits: 4·128 code bits + 32-bit norm = 544 bits = 4.25 bits per coordinate.
  mse = TurboQuant(TurboQuantConfig(dimension=128, bits=4, qjl_enabled=False))
  assert mse.compression_ratio() == 16 / 4.25
  assert mse.compression_ratio(baseline_bits=32) == 32 / 4.25
  # prod, d = 128, 4 bits: 3·128 code bits + 128 sign bits + two 32-bit norms = 576 bits = 4.5.
  prod = TurboQuant(TurboQuantConfig(dimension=128, bits=4, qjl_enabled=True))
  assert prod.compression_ratio() == 16 / 4.5


@pytest.mark.parametrize("dim,bits,qjl,per_vector", [(128, 4, False, 68), (128, 4, True, 72), (100, 3, False, 52)])
def test_compressed_size_bytes(dim, bits, qjl, per_vector):
  # 128, 4, mse: 4·128/8 = 64 code bytes + 4 norm bytes = 68.
  # 128, 4, prod: 3·128/8 = 48 + 128/8 = 16 sign bytes + 4 + 4 = 72.
  # 100, 3, mse: ceil(100/32) = 4 words per bit plane → 3·4·4 = 48 bytes + 4 = 52.
  tq = TurboQuant(TurboQuantConfig(dimension=dim, bits=bits, qjl_enabled=qjl))
  assert tq.compressed_size_bytes(1) == per_vector
  assert tq.compressed_size_bytes(0) == 0
  assert tq.compressed_size_bytes(13) == 13 * per_vector == tq.compress(jnp.ones((13, dim))).nbytes


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(dimension=1, bits=2), ValueError, "dimension=1"),
        (dict(dimension=64.0, bits=2), ValueError, "dimension=64.0"),
        (dict(dimension=64, bits=0), ValueError, "bits=0"),
        (dict(dimension=64, bits=9, qjl_enabled=True), ValueError, "bits=9"),
        (dict(dimension=64, bits=3, qjl_enabled=False, qjl_dim=32), ValueError, "qjl_dim=32"),
        (dict(dimension=64, bits=3, qjl_dim=-1), ValueError, "qjl_dim=-1"),
        (dict(dimension=64, bits=3, qjl_dim=32.0), ValueError, "qjl_dim=32.0"),
        (dict(dimension=64, seed=2.5), ValueError, "seed=2.5"),
        (dict(dimension=64, seed="7"), ValueError, "seed='7'"),
        (dict(dimension=64, seed=-1), ValueError, "seed=-1"),
        (dict(dimension=64, seed=True), ValueError, "seed=True"),
        (dict(dimension=64, bits=3, qjl_enabled=1), ValueError, "qjl_enabled=1"),
    ],
)
def test_config_errors(kwargs, exc, pattern):
  with pytest.raises(exc, match=pattern):
    TurboQuantConfig(**kwargs)


def test_usage_errors():
  with pytest.raises(TypeError, match="TurboQuantConfig"):
    TurboQuant(tqjax.QuantizerConfig(dim=64, bits=2))
  tq = TurboQuant(TurboQuantConfig(dimension=32, bits=2))
  with pytest.raises(ValueError, match="n_vectors=-1"):
    tq.compressed_size_bytes(-1)
  with pytest.raises(ValueError, match=r"\(3, 16\)"):
    tq.compress(jnp.zeros((3, 16)))
  # Codes of another config raise, even where the arrays alike: seed 43 vs the default 42.
  for other in (TurboQuantConfig(dimension=32, bits=3), TurboQuantConfig(dimension=32, bits=2, seed=43)):
    code = TurboQuant(other).compress(jnp.ones((2, 32)))
    with pytest.raises(ValueError, match="another quantizer"):
      tq.decompress(code)
    with pytest.raises(ValueError, match="another quantizer"):
      tq.inner_product(jnp.ones(32), code)
  with pytest.raises(ValueError, match="qjl_dim=16"):
    TurboQuantKVCache(TurboQuantConfig(dimension=32, qjl_dim=16))
  with pytest.raises(ValueError, match="num_heads=0"):
    TurboQuantKVCache(TurboQuantConfig(dimension=32), num_heads=0)
  with pytest.raises(ValueError, match="value_bits=9"):
    TurboQuantKVCache(TurboQuantConfig(dimension=32), value_bits=9)


@pytest.mark.parametrize("qjl", [False, True])
def test_kv_cache_wrapper_matches_functional_cache(qjl):
  from tqjax import cache as C
  from tqjax import ops as tq_ops

  d, h = 32, 2
  kv = TurboQuantKVCache(TurboQuantConfig(dimension=d, bits=3, qjl_enabled=qjl, seed=1), num_heads=h, capacity=12)
  k = jax.random.normal(jax.random.key(1), (6, h, d))
  v = jax.random.normal(jax.random.key(2), (6, h, d))
  kv.append(k[:5], v[:5])
  kv.append(k[5], v[5])  # one token as [H, D]
  assert len(kv) == 6
  ref = tq_ops.prefill(C.init_cache(kv.cache_config, 1, h, 12), jnp.swapaxes(k, 0, 1)[None], jnp.swapaxes(v, 0, 1)[None])
  q = jax.random.normal(jax.random.key(3), (h, d))
  np.testing.assert_allclose(kv.attention(q), tq_ops.attention(ref, q[None], implementation="xla")[0], rtol=1e-5, atol=1e-6)
  scores = kv.attention_scores(q)
  assert scores.shape == (h, 6) and np.all(np.isfinite(np.asarray(scores)))
  np.testing.assert_allclose(scores, tq_ops.scores(ref, q[None], scale=1.0)[0, :, :6], rtol=1e-5, atol=1e-5)
  # The scores estimate the true inner products (3-bit: correlation well above 0.9).
  assert np.corrcoef(np.asarray(scores).ravel(), np.einsum("hd,thd->ht", q, k).ravel())[0, 1] > 0.9
  assert kv.memory_bytes() == C.expected_nbytes(kv.cache_config, 1, h, 12)
  with pytest.raises(ValueError, match="capacity=12"):
    kv.append(jnp.zeros((7, h, d)), jnp.zeros((7, h, d)))
  with pytest.raises(ValueError, match="num_heads=2"):
    kv.append(jnp.zeros((1, 3, d)), jnp.zeros((1, 3, d)))
  with pytest.raises(ValueError, match="query"):
    kv.attention(jnp.zeros((3, d)))


def test_numpy_integer_config_values_and_list_inputs():
  cfg = TurboQuantConfig(dimension=np.int64(32), bits=np.int32(3), seed=np.uint8(7), qjl_enabled=False)
  tq = TurboQuant(cfg)
  assert tq.quantizer.config.seed == 7
  x = [[float(i % 5) - 2.0 for i in range(32)]]  # a plain list of one vector
  np.testing.assert_array_equal(tq.decompress(tq.compress(x)), tq.decompress(tq.compress(jnp.asarray(x))))
  assert tq.inner_product(x[0], tq.compress(x)).shape == (1,)
  kv = TurboQuantKVCache(cfg, capacity=4)
  kv.append(x[0], x[0])
  assert kv.attention_scores(x[0]).shape == (1,)


def test_kv_cache_output_follows_the_query_shape():
  d = 32
  kv = TurboQuantKVCache(TurboQuantConfig(dimension=d, bits=2, seed=3), capacity=8)
  k = jax.random.normal(jax.random.key(4), (5, d))
  kv.append(k, k)  # [T, d] for a single-head cache
  q = jax.random.normal(jax.random.key(5), (d,))
  flat, headed = kv.attention_scores(q), kv.attention_scores(q[None])
  assert flat.shape == (5,) and headed.shape == (1, 5)
  np.testing.assert_array_equal(flat, headed[0])
  assert kv.attention(q).shape == (d,) and kv.attention(q[None]).shape == (1, d)
  two = TurboQuantKVCache(TurboQuantConfig(dimension=d, bits=2), num_heads=2, capacity=8)
  with pytest.raises(ValueError, match=r"num_heads=2.*query.shape=\(32,\)"):
    two.attention_scores(q)
  with pytest.raises(ValueError, match="3 keys and 2 values"):
    kv.append(k[:3], k[:2])
