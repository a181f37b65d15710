"""Seed-style TurboQuant wrapper: bits convention, equality with the functional core, byte
accounting, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from tqjax.compat import TurboQuant, TurboQuantConfig

pytestmark = pytest.mark.math


def test_bits_are_total_bits():
  # The seed's "3-bit codebook + QJL" (4 bits per coordinate) is bits=4 with QJL here.
  cfg = TurboQuantConfig(dimension=64, bits=4, qjl_enabled=True).quantizer_config()
  assert (cfg.variant, cfg.bits, cfg.mse_bits, cfg.sketch_dim) == ("prod", 4, 3, 64)
  cfg = TurboQuantConfig(dimension=64, bits=3).quantizer_config()
  assert (cfg.variant, cfg.bits, cfg.mse_bits, cfg.sketch_dim) == ("mse", 3, 3, 0)
  cfg = TurboQuantConfig(dimension=64, bits=2, qjl_enabled=True, qjl_dim=96, seed=5).quantizer_config()
  assert (cfg.sketch_dim, cfg.seed) == (96, 5)


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
  tq = TurboQuant(TurboQuantConfig(dimension=32, bits=4))
  # (Not np.random.default_rng(0): that is the seed-0 rotation's own stream, see test_quantizer.)
  x = np.asarray(jax.random.normal(jax.random.key(0), (64, 32)), np.float16)
  out = np.asarray(tq.decompress(tq.compress(x)))
  rel = np.sum((out - x.astype(np.float32)) ** 2) / np.sum(x.astype(np.float32) ** 2)
  # 64 vectors, per-vector relative error sd ≈ 0.45·D at d = 32 → SE ≈ 0.06·D; ±25% is 4 SE.
  assert abs(rel / tqjax.distortion(4, 32) - 1) < 0.25, rel
  assert tq.inner_product(x[0].astype(np.float32), tq.compress(x)).shape == (64,)


def test_compression_ratio_hand_cases():
  # mse, d = 128, 4 bits: 4·128 code bits + 32-bit norm = 544 bits = 4.25 bits per coordinate.
  mse = TurboQuant(TurboQuantConfig(dimension=128, bits=4))
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
        (dict(dimension=64, bits=3, qjl_dim=32), ValueError, "qjl_dim=32"),
        (dict(dimension=64, bits=3, qjl_enabled=True, qjl_dim=0), ValueError, "qjl_dim=0"),
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
  other = TurboQuant(TurboQuantConfig(dimension=32, bits=3, qjl_enabled=True))
  with pytest.raises(ValueError, match="QJL"):
    tq.decompress(other.compress(jnp.ones((2, 32))))


@pytest.mark.parametrize("qjl", [False, True])
def test_kv_cache_wrapper_matches_functional_cache(qjl):
  from tqjax import cache as C
  from tqjax import ops as tq_ops
  from tqjax.compat import TurboQuantKVCache

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
