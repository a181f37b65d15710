"""The fused GPU decode-attention kernel (pallas_kernels/decode_attention_gpu.py) against the oracle.

Tiers: `interpret` (Pallas interpret mode on CPU, float32 dots: agreement to ~1e-6), `lowering`
(Triton lowering for an abstract H100, on CPU), `gpu` (compiled kernel on a real GPU, tf32 dots:
agreement to ~1e-3; skipped without one). Kernel outputs start NaN-filled (aliased buffers), so an
element the kernel forgets to write shows up as NaN in the result.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from pallas_kernels import decode_attention_gpu as K
from kernel_paths import pallas_attention
from pallas_kernels import dispatch
from pallas_kernels.column_order import from_column_major, to_column_major
from test_decode_mgpu import TOL as MOSAIC_TOL
from tqjax import cache as C
from tqjax import ops as tq_ops
from tqjax import partials as tq_partials

pytestmark = pytest.mark.interpret

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "minilm_l6_qkv.npz"
H100 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda"))
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def _cache(rng, d, kb, vb, var, b, kh, s, lengths, nd="float32", center=True, window=0, seed=0):
  cfg = C.CacheConfig(head_dim=d, k_bits=kb, v_bits=vb, k_variant=var, norm_dtype=nd,
                      center_keys=center, window=window, seed=seed)
  k = jnp.asarray(rng.standard_normal((b, kh, s, d)) + 0.4, jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, kh, s, d)), jnp.float32)
  return tq_ops.prefill(C.init_cache(cfg, b, kh, s), k, v, jnp.asarray(lengths, jnp.int32))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _partials(cache, q, soft_cap, sliding_window, **kernel_options):
  """(kernel partials, reference partials) for decode queries q [B, Hq, D] (T = 1)."""
  b, hq, d = q.shape
  kh = cache.num_kv_heads
  qg = q.astype(jnp.float32).reshape(b, kh, hq // kh, 1, d)
  pq = tq_partials.prepare_query(cache, qg, 1.0 / math.sqrt(d))
  lo, hi = tq_partials.query_ranges(cache, 1, sliding_window)
  got = K.decode_partial(cache, pq, lo, hi, soft_cap, poison=True, **kernel_options)
  want = K.decode_partial_reference(cache, pq, lo, hi, soft_cap)
  return got, want


def _check_partials(got, want, tol):
  (acc, m, l), (acc_r, m_r, l_r) = got, want
  for x in (acc[0], m, l):
    assert not np.isnan(np.asarray(x)).any(), "kernel left NaN (unwritten or poisoned) outputs"
  np.testing.assert_array_equal(np.isneginf(np.asarray(m)), np.isneginf(np.asarray(m_r)))
  fin = np.isfinite(np.asarray(m_r))
  # The kernel may pick a different (but equivalent) running max: compare normalized quantities.
  with np.errstate(invalid="ignore"):
    scale = np.where(fin, np.exp(np.where(fin, np.asarray(m) - np.asarray(m_r), 0.0)), 0.0)
  np.testing.assert_allclose(np.asarray(l) * scale, np.asarray(l_r), rtol=tol, atol=tol)
  o = np.asarray(acc[0]) / np.where(np.asarray(l) > 0, np.asarray(l), 1.0)[..., None]
  o_r = np.asarray(acc_r[0]) / np.where(np.asarray(l_r) > 0, np.asarray(l_r), 1.0)[..., None]
  assert _rel(o, o_r) < tol
  np.testing.assert_array_equal(np.asarray(l_r) == 0, np.asarray(l) == 0)
  assert np.all(np.asarray(acc[0])[np.asarray(l_r) == 0] == 0)


# ----------------------------------------------------------------------------- hand-computed


@pytest.mark.math
def test_odd_polynomial_reproduces_codebooks():
  # b = 2, codebook (−a, −c, c, a) at t = (k − 1.5)/2 = ±0.25, ±0.75: c(t) = a0·t + a1·t³ must
  # give exactly the centroids; the same holds for every b ≤ 4 and head dim.
  from tqjax.codebook import lloyd_max

  for d in (32, 64, 128, 256):
    for b in range(1, K.MAX_CODE_BITS + 1):
      cb = lloyd_max(b, d)[0]
      coeffs = K._odd_poly(cb)
      n = 2**b
      t = ((np.arange(n) - (n - 1) / 2) / (n // 2)).astype(np.float32)
      acc = np.full_like(t, coeffs[-1])
      for a in reversed(coeffs[:-1]):
        acc = acc * t * t + np.float32(a)
      np.testing.assert_allclose(acc * t, cb, rtol=2e-6, atol=1e-7)


@pytest.mark.math
@pytest.mark.parametrize("d", [32, 64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_block_dequantization_matches_unpack(d, bits):
  """The kernel's in-register dequantization (plain jnp here) equals centroids[unpack] in kernel order."""
  from tqjax import packing
  from tqjax.codebook import lloyd_max

  rng = np.random.default_rng(bits * 1000 + d)
  w = d // 32
  codes = jnp.asarray(rng.integers(0, 2**bits, (16, d)), jnp.uint8)
  words = packing.pack(codes, bits)
  cb = lloyd_max(bits, d)[0]
  rows = [words[:, r * w:(r + 1) * w] for r in range(bits)]
  got = K._to_kernel_order(K._dequant_leaves(rows, bits, K._odd_poly(cb)), 16, w)
  want = to_column_major(jnp.asarray(cb, jnp.float32)[codes.astype(jnp.int32)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  if bits == 1:  # QJL sign rows: bit 1 → +1, bit 0 → −1
    signs = K._to_kernel_order(K._sign_leaves(words), 16, w)
    np.testing.assert_array_equal(signs, to_column_major(codes.astype(jnp.float32) * 2 - 1))
  # The permutation round-trips.
  x = jnp.arange(2 * d, dtype=jnp.float32).reshape(2, d)
  np.testing.assert_array_equal(from_column_major(to_column_major(x)), x)


# ----------------------------------------------------------------------------- interpret mode


INTERPRET_CASES = [
    # d, k_bits, v_bits, k_variant, G, S, lengths (B=3), extra
    (64, 3, 3, "mse", 4, 70, (70, 33, 1), dict()),
    (64, 4, 2, "mse", 1, 40, (0, 17, 40), dict(nd="bfloat16", cap=15.0)),
    (128, 3, 3, "prod", 4, 53, (53, 1, 20), dict()),
    (32, 2, 4, "mse", 8, 48, (48, 47, 16), dict(nd="float16", center=False)),
    (64, 2, 3, "prod", 16, 37, (37, 5, 0), dict(window_=9, cap=30.0)),
    (256, 4, 3, "mse", 2, 20, (20, 3, 19), dict()),
    (64, 3, 1, "prod", 2, 33, (33, 20, 2), dict(block_k=16)),
    (32, 1, 2, "mse", 2, 10, (10, 1, 0), dict()),  # S < 16: padded inside the kernel entry
    (64, 3, 4, "mse", 4, 100, (100, 65, 64), dict(block_k=32, num_splits=2, sw=30)),
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: f"d{c[0]}k{c[1]}{c[3]}v{c[2]}g{c[4]}s{c[5]}")
def test_interpret_partials_match_reference(case):
  d, kb, vb, var, g, s, lengths, extra = case
  extra = dict(extra)
  rng = np.random.default_rng(hash(case[:6]) % 2**32)
  cache = _cache(rng, d, kb, vb, var, 3, 2, s, lengths, nd=extra.pop("nd", "float32"),
                 center=extra.pop("center", True), seed=s)
  q = jnp.asarray(rng.standard_normal((3, 2 * g, d)) * 1.5, jnp.float32)
  cap, sw = extra.pop("cap", None), extra.pop("sw", None)
  extra.pop("window_", None)
  got, want = _partials(cache, q, cap, sw, interpret=True, **extra)
  _check_partials(got, want, 2e-5)


@pytest.mark.interpret
def test_interpret_bf16_dots():
  """bf16 dot operands (the query split hi + lo, centroids rounded once): ~1e-3 of the f32 oracle."""
  rng = np.random.default_rng(11)
  cache = _cache(rng, 128, 3, 3, "prod", 2, 2, 50, (50, 7))
  q = jnp.asarray(rng.standard_normal((2, 8, 128)) * 1.5, jnp.float32)
  got, want = _partials(cache, q, None, None, interpret=True, dot_dtype="bfloat16")
  _check_partials(got, want, 4e-3)
  with pytest.raises(ValueError, match="dot_dtype='float16'"):
    _partials(cache, q, None, None, interpret=True, dot_dtype="float16")


@pytest.mark.interpret
def test_interpret_attention_through_dispatch_with_window():
  """Full attention via dispatch (full-precision window merged outside the kernel) vs the XLA path."""
  rng = np.random.default_rng(7)
  cache = _cache(rng, 64, 3, 2, "prod", 2, 2, 45, (45, 12), window=8)
  q = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.float32)
  got = pallas_attention(cache, q, soft_cap=20.0, sliding_window=30, interpret=True)
  want = tq_ops.attention(cache, q, soft_cap=20.0, sliding_window=30, implementation="xla")
  assert not np.isnan(np.asarray(got)).any()
  assert _rel(got, want) < 2e-5


@pytest.mark.interpret
def test_interpret_minilm_real_data():
  """Real MiniLM Q/K/V (head_dim 32): one layer, 12 heads as kv heads (MHA, G = 1), 4 queries."""
  if not DATA.is_file():
    pytest.skip(f"shared data {DATA} not present")
  with np.load(DATA) as z:
    keys, values, queries = z["keys"][0, 2], z["values"][0, 2], z["queries"][0, 2]  # [12, 512, 32]
  s = 200
  cfg = C.CacheConfig(head_dim=32, k_bits=3, v_bits=3)
  k = jnp.asarray(keys[None, :, :s], jnp.float32)
  v = jnp.asarray(values[None, :, :s], jnp.float32)
  cache = tq_ops.prefill(C.init_cache(cfg, 1, 12, s), k, v)
  for t in (s - 1, 57):
    q = jnp.asarray(queries[None, :, t], jnp.float32)  # [1, 12, 32]
    c = dataclasses_replace_lengths(cache, t + 1)
    got = pallas_attention(c, q, interpret=True)
    want = tq_ops.attention(c, q, implementation="xla")
    assert not np.isnan(np.asarray(got)).any()
    assert _rel(got, want) < 1e-5


def dataclasses_replace_lengths(cache, n):
  import dataclasses

  return dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, n))


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_defaults_and_errors():
  rng = np.random.default_rng(3)
  cache = _cache(rng, 64, 3, 3, "mse", 1, 1, 8, (8,))
  ok, why = dispatch.supports(cache, "gpu")
  assert ok and why == ""
  assert dispatch.supports(cache, "cpu")[0] is False
  if jax.default_backend() == "cpu":
    assert dispatch.default_implementation(cache) == "xla"
  cfg = C.CacheConfig(head_dim=64, k_bits=3, v_bits=3, outlier_channels=4)
  outl = C.init_cache(cfg, 1, 1, 8)
  ok, why = dispatch.supports(outl, "gpu")
  assert not ok and "outlier" in why
  with pytest.raises(ValueError, match="outlier"):
    pallas_attention(outl, jnp.zeros((1, 1, 64), jnp.float32), interpret=True)
  cfg = C.CacheConfig(head_dim=48, k_bits=3, v_bits=3)
  with pytest.raises(ValueError, match="head_dim=48"):
    pallas_attention(C.init_cache(cfg, 1, 1, 8), jnp.zeros((1, 1, 48), jnp.float32), interpret=True)
  cfg = C.CacheConfig(head_dim=64, k_bits=6, v_bits=3)
  assert "1..4" in dispatch.supports(C.init_cache(cfg, 1, 1, 8), "gpu")[1]


# ----------------------------------------------------------------------------- lowering


LOWERING_CASES = [
    (128, 3, 3, "mse", 4, dict(), "float32"),
    (128, 3, 3, "prod", 4, dict(dot_dtype="bfloat16"), "float32"),
    (64, 4, 2, "mse", 16, dict(num_stages=4), "bfloat16"),
    (256, 2, 4, "mse", 2, dict(dot_dtype="bfloat16"), "float16"),
    (32, 2, 3, "prod", 1, dict(block_k=16), "float32"),
]


@pytest.mark.lowering
@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: f"d{c[0]}k{c[1]}{c[3]}v{c[2]}g{c[4]}-{'-'.join(map(str, c[5].values()))}")
def test_lowers_for_h100(case):
  d, kb, vb, var, g, options, nd = case
  cfg = C.CacheConfig(head_dim=d, k_bits=kb, v_bits=vb, k_variant=var, norm_dtype=nd)
  cache = jax.eval_shape(lambda: C.init_cache(cfg, 2, 2, 1000))
  q = jax.ShapeDtypeStruct((2, 2 * g, d), jnp.float32)
  # dispatch.attention asks the (CPU) backend; lower the kernel path directly for the abstract GPU.
  f = lambda c, q: tq_ops.chunked_attention(
      c, q[:, :, None], soft_cap=30.0,
      partial_fn=lambda *a: K.decode_partial(*a, **options))[:, :, 0]
  with use_abstract_mesh(H100):
    jax.jit(f).trace(cache, q).lower(lowering_platforms=("cuda",))


# ----------------------------------------------------------------------------- real GPU


GPU_CASES = [
    (128, 3, 3, "mse", 4, 4133, dict()),
    (128, 4, 4, "mse", 4, 4096, dict(dot_dtype="bfloat16", tol=5e-3)),
    (128, 3, 3, "prod", 8, 3001, dict(cap=30.0)),
    (64, 4, 2, "mse", 16, 777, dict(nd="bfloat16")),
    (256, 3, 4, "mse", 2, 2049, dict(nd="float16", sw=300)),
    (32, 2, 3, "mse", 1, 513, dict()),
    (128, 2, 2, "prod", 16, 12, dict()),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"d{c[0]}k{c[1]}{c[3]}v{c[2]}g{c[4]}s{c[5]}")
def test_gpu_compiled_matches_reference(case):
  d, kb, vb, var, g, s, extra = case
  extra = dict(extra)
  rng = np.random.default_rng(s)
  cache = _cache(rng, d, kb, vb, var, 3, 2, s, (s, s // 3 + 1, 1), nd=extra.pop("nd", "float32"))
  q = jnp.asarray(rng.standard_normal((3, 2 * g, d)) * 1.5, jnp.float32)
  cap, sw, tol = extra.pop("cap", None), extra.pop("sw", None), extra.pop("tol", 2e-3)
  got, want = jax.jit(lambda c, q: _partials(c, q, cap, sw, **extra))(cache, q)
  _check_partials(got, want, tol)  # tf32 dots: 2e-3; bf16 operands: 5e-3
  assert dispatch.default_implementation(cache) == "pallas"
  out = jax.jit(lambda c, q: tq_ops.attention(c, q, soft_cap=cap, sliding_window=sw))(cache, q)
  ref = jax.jit(lambda c, q: tq_ops.attention(c, q, soft_cap=cap, sliding_window=sw, implementation="xla"))(cache, q)
  # The default is the Mosaic GPU kernel where it applies (bf16 value dot: its own bound, derived
  # in test_decode_mgpu), else this Triton kernel with tf32 dots.
  bound = MOSAIC_TOL if dispatch._mosaic_decode(cache, g) else 2e-3
  assert _rel(out, ref) < bound, (_rel(out, ref), bound)
