"""The TPU decode kernel (`pallas_kernels.decode_attention_tpu`) against the tqjax oracle.

interpret: TPU interpret mode on CPU, through `chunked_attention(..., partial_fn=...)` and
directly against `compressed_partial_reference`, on fresh random caches (random code words are
valid codes at every bit width, so most caches are filled with random words instead of paying
for an encode compile; one case goes through `prefill`). Each case costs one ~2-4 s compile,
so the features are spread over the cases rather than crossed.
lowering: `lowering_platforms=("tpu",)` of the jitted kernel (catches Pallas→Mosaic errors,
not those of libtpu's Mosaic compiler).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_attention_tpu import decode_partial_reference, decode_partial_tpu
from tqjax import cache as C
from tqjax import ops as tq_ops
from tqjax import partials as tq_partials

pytestmark = pytest.mark.interpret

RTOL = 1e-5  # measured ≤ 1e-6 (float32 everywhere; the oracle uses HIGHEST-precision einsums)


# ----------------------------------------------------------------------------- helpers


def _random_code(code, rng, shape_lead):
  """Random words / scales for a cache `Code` [B, K, S, ...]: every bit pattern is a valid code."""
  words = lambda a: jnp.asarray(rng.integers(0, 2**32, a.shape, dtype=np.uint32))
  scale = lambda a: jnp.asarray(rng.uniform(0.5, 2.0, shape_lead).astype(np.float32)).astype(a.dtype)
  return dataclasses.replace(
      code,
      codes=words(code.codes),
      norms=scale(code.norms),
      qjl_signs=None if code.qjl_signs is None else words(code.qjl_signs),
      residual_norms=None if code.residual_norms is None else scale(code.residual_norms) * 0.3,
  )


def _random_cache(cfg: C.CacheConfig, b: int, kh: int, s: int, lengths, seed: int) -> C.KVCache:
  rng = np.random.default_rng(seed)
  cache = C.init_cache(cfg, b, kh, s)
  new = dataclasses.replace(
      cache,
      k=dataclasses.replace(cache.k, main=_random_code(cache.k.main, rng, (b, kh, s))),
      v=dataclasses.replace(cache.v, main=_random_code(cache.v.main, rng, (b, kh, s))),
      lengths=jnp.asarray(lengths, jnp.int32),
  )
  if cache.key_mean is not None:
    new = dataclasses.replace(new, key_mean=jnp.asarray(rng.standard_normal(cache.key_mean.shape).astype(np.float32)))
  if cache.window_k is not None:
    ring = lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)).astype(a.dtype)
    new = dataclasses.replace(new, window_k=ring(cache.window_k), window_v=ring(cache.window_v))
  return new


def _assert_close(got, want, what: str, rtol: float = RTOL) -> float:
  """Relative max error (over the whole array) ≤ rtol; NaN anywhere fails, ±inf must match exactly."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  assert not np.any(np.isnan(got)), f"{what}: NaN in kernel output"
  assert not np.any(np.isnan(want)), f"{what}: NaN in reference"
  inf = np.isinf(want)
  assert np.array_equal(np.isinf(got), inf) and np.array_equal(got[inf], want[inf]), f"{what}: infinities differ"
  fin = ~inf
  if not fin.any():
    return 0.0
  err = float(np.max(np.abs(got[fin] - want[fin])) / max(np.max(np.abs(want[fin])), 1e-30))
  assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"
  return err


@functools.partial(jax.jit, static_argnames=("soft_cap", "sliding_window", "block_s", "interpret"))
def _kernel_and_oracle(cache, q, *, soft_cap, sliding_window, block_s, interpret):
  """(out, m, l) of chunked_attention with the kernel and with the oracle: one compile per case."""
  pf = functools.partial(decode_partial_tpu, block_s=block_s, interpret=interpret)
  kw = dict(soft_cap=soft_cap, sliding_window=sliding_window, return_residuals=True)
  return tq_ops.chunked_attention(cache, q, partial_fn=pf, **kw), tq_ops.chunked_attention(cache, q, **kw)


def _check_attention(cache, q, *, soft_cap=None, sliding_window=None, block_s=128, interpret=True):
  (o, m, l), (o_r, m_r, l_r) = _kernel_and_oracle(
      cache, q[:, :, None, :], soft_cap=soft_cap, sliding_window=sliding_window, block_s=block_s, interpret=interpret
  )
  errs = [_assert_close(o, o_r, "out"), _assert_close(m, m_r, "m"), _assert_close(l, l_r, "l")]
  # Empty sequences: m = −inf, l = 0, out = 0 exactly (checked against the oracle above too).
  empty = np.asarray(cache.lengths) == 0
  if empty.any() and not cache.config.window:
    assert np.all(np.asarray(m)[empty] == -np.inf) and np.all(np.asarray(l)[empty] == 0)
    assert np.all(np.asarray(o)[empty] == 0)
  return max(errs)


# ----------------------------------------------------------------------------- interpret mode

# (variant, k_bits, v_bits, head_dim, G, capacity, lengths, block_s, soft_cap, sliding_window,
#  center_keys, window, norm_dtype): every k/v bit width 2..4 for mse and prod keys (prod k2 =
# 1-bit codebook), head dims 32/64/128, G 1 and 4, ragged lengths with 0, 1 and non-multiples of
# the block, a partial last block (capacity 300 = 2·128 + 44), soft caps, sliding windows, key
# centring on and off, the full-precision ring window (compressed range ends before the ring),
# and 16-bit stored scales.
CASES = {
    "mse_k3v3_d128_g4": ("mse", 3, 3, 128, 4, 300, (0, 1, 257), 128, None, None, True, 0, "float32"),
    "prod_k3v3_d128_g4_cap": ("prod", 3, 3, 128, 4, 300, (300, 0, 129), 128, 30.0, None, True, 0, "float32"),
    "mse_k2v4_d64_g1_cap_nocenter": ("mse", 2, 4, 64, 1, 300, (1, 200, 300), 128, 5.0, None, False, 0, "bfloat16"),
    "prod_k2v2_d64_g4_slide": ("prod", 2, 2, 64, 4, 300, (0, 299, 130), 128, None, 100, True, 0, "float16"),
    "mse_k4v2_d128_g1_slide_b256": ("mse", 4, 2, 128, 1, 600, (600, 1, 385), 256, None, 200, True, 0, "float32"),
    "prod_k4v4_d32_g1_cap_nocenter": ("prod", 4, 4, 32, 1, 300, (0, 1, 255), 128, 10.0, None, False, 0, "bfloat16"),
    "mse_k3v4_d32_g4_ring_slide": ("mse", 3, 4, 32, 4, 300, (300, 20, 140), 128, None, 100, True, 16, "float32"),
}


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(CASES))
def test_random_cache_matches_oracle(name):
  variant, kb, vb, d, g, cap, lengths, block_s, soft_cap, slide, center, window, norm_dtype = CASES[name]
  cfg = C.CacheConfig(
      head_dim=d, k_bits=kb, v_bits=vb, k_variant=variant, center_keys=center, window=window, norm_dtype=norm_dtype
  )
  b, kh = len(lengths), 2
  cache = _random_cache(cfg, b, kh, cap, lengths, seed=zlib.crc32(name.encode()))
  q = 3.0 * jax.random.normal(jax.random.key(len(name)), (b, kh * g, d), jnp.float32)
  _check_attention(cache, q, soft_cap=soft_cap, sliding_window=slide, block_s=block_s)


@pytest.mark.interpret
def test_prefilled_cache_matches_oracle_poisoned_buffers():
  """Real encode path, and `pltpu.InterpretParams()`: uninitialized buffers read as NaN, OOB reads raise."""
  b, kh, g, d, cap = 3, 2, 4, 64, 256  # capacity a multiple of the block
  cfg = C.CacheConfig(head_dim=d, k_bits=3, v_bits=2, k_variant="prod")
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  k = jax.random.normal(k1, (b, kh, cap, d), jnp.float32) + 0.5  # a mean for key centring to remove
  v = jax.random.normal(k2, (b, kh, cap, d), jnp.float32)
  cache = jax.jit(tq_ops.prefill)(C.init_cache(cfg, b, kh, cap), k, v, jnp.asarray([0, 1, 200], jnp.int32))
  q = jax.random.normal(k3, (b, kh * g, d), jnp.float32)
  _check_attention(cache, q, soft_cap=20.0, block_s=128, interpret=pltpu.InterpretParams())


@pytest.mark.interpret
def test_partial_contract_direct():
  """The raw (acc, m, l) for arbitrary [lo, hi): interior ranges, lo == hi, lo > hi, whole cache."""
  b, kh, g, d, cap = 5, 1, 4, 64, 300
  cfg = C.CacheConfig(head_dim=d, k_bits=4, v_bits=3, k_variant="prod")
  cache = _random_cache(cfg, b, kh, cap, [cap] * b, seed=3)
  rng = np.random.default_rng(4)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
  pq = tq_partials.PreparedQuery((normal(b, kh, g, 1, d),), (normal(b, kh, g, 1, d),), normal(b, kh, g, 1))
  lo = jnp.asarray([[0], [130], [77], [200], [0]], jnp.int32)
  hi = jnp.asarray([[300], [131], [77], [10], [129]], jnp.int32)
  (acc,), m, l = decode_partial_tpu(cache, pq, lo, hi, 7.0, block_s=128, interpret=True)
  (acc_r,), m_r, l_r = decode_partial_reference(cache, pq, lo, hi, 7.0, block_s=128)
  _assert_close(acc, acc_r, "acc")
  _assert_close(m, m_r, "m")
  _assert_close(l, l_r, "l")
  for i in (2, 3):  # empty ranges
    assert np.all(np.asarray(m)[i] == -np.inf) and np.all(np.asarray(l)[i] == 0) and np.all(np.asarray(acc)[i] == 0)


def test_nan_poisoned_output_never_passes():
  want = np.ones((2, 3), np.float32)
  poisoned = want.copy()
  poisoned[1, 2] = np.nan
  with pytest.raises(AssertionError, match="NaN"):
    _assert_close(poisoned, want, "poisoned")
  with pytest.raises(AssertionError, match="infinities"):
    _assert_close(np.where(want > 0, -np.inf, 0), want, "inf")
  assert _assert_close(want, want, "same") == 0.0


@pytest.mark.interpret
@pytest.mark.parametrize(
    "cfg_kw, t, block_s, match",
    [
        (dict(outlier_channels=8), 1, 128, "outlier_channels"),
        (dict(), 1, 100, "block_s"),
        (dict(), 2, 128, "one query token"),
    ],
)
def test_unsupported_configs_raise(cfg_kw, t, block_s, match):
  b, kh, g, d, cap = 2, 1, 1, 64, 256
  cache = C.init_cache(C.CacheConfig(head_dim=d, **cfg_kw), b, kh, cap)
  n = d - cache.config.outlier_channels
  pq = tq_partials.PreparedQuery((jnp.zeros((b, kh, g, t, n), jnp.float32),), (None,), jnp.zeros((b, kh, g, t), jnp.float32))
  lo = hi = jnp.zeros((b, t), jnp.int32)
  with pytest.raises(ValueError, match=match):
    decode_partial_tpu(cache, pq, lo, hi, None, block_s=block_s, interpret=True)


# ----------------------------------------------------------------------------- TPU lowering


@pytest.mark.lowering
@pytest.mark.parametrize("variant", ["mse", "prod"])
@pytest.mark.parametrize("g, soft_cap", [(1, None), (8, 30.0)])
def test_lowers_for_tpu(variant, g, soft_cap):
  """D = 128, K3/V3, a 32k-slot cache in 512-slot blocks: the Pallas → Mosaic lowering succeeds."""
  _check_lowering(C.CacheConfig(head_dim=128, k_bits=3, v_bits=3, k_variant=variant), g, soft_cap)


@pytest.mark.lowering
@pytest.mark.parametrize(
    "cfg_kw",
    [
        dict(head_dim=64, k_bits=2, v_bits=4, k_variant="prod", norm_dtype="bfloat16"),  # 1-bit key codebook
        dict(head_dim=32, k_bits=4, v_bits=2, norm_dtype="float16", center_keys=False),
    ],
)
def test_lowers_for_tpu_other_configs(cfg_kw):
  _check_lowering(C.CacheConfig(**cfg_kw), 4, None)


def _check_lowering(cfg, g, soft_cap):
  b, kh, d, cap = 2, 2, cfg.head_dim, 32768
  cache = C.init_cache(cfg, b, kh, cap)
  variant = cfg.k_variant
  q = jnp.zeros((b, kh, g, 1, d), jnp.float32)
  pq = tq_partials.PreparedQuery((q,), (q,) if variant == "prod" else (None,), jnp.zeros((b, kh, g, 1), jnp.float32))
  lo, hi = jnp.zeros((b, 1), jnp.int32), jnp.full((b, 1), cap, jnp.int32)
  f = functools.partial(decode_partial_tpu, soft_cap=soft_cap, block_s=512)
  lowered = jax.jit(f).trace(cache, pq, lo, hi).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.interpret
def test_dispatch_routes_tpu_to_this_kernel():
  """On a TPU backend, dispatch picks this kernel for supported configs and says why not otherwise;
  its partial_fn (run here in interpret mode) gives the oracle's attention."""
  from pallas_kernels import dispatch

  b, kh, g, d = 2, 2, 2, 64
  cache = C.init_cache(C.CacheConfig(head_dim=d, k_bits=3, v_bits=3), b, kh, 256)
  assert dispatch.supports(cache, "tpu") == (True, "")
  ok, why = dispatch.supports(C.init_cache(C.CacheConfig(head_dim=d, outlier_channels=8), b, kh, 256), "tpu")
  assert not ok and "outlier_channels" in why
  fn = dispatch.decode_partial_fn(cache, g, backend="tpu", block_s=128)
  assert fn.func is decode_partial_tpu
  k, v = (jax.random.normal(jax.random.key(i), (b, kh, 200, d)) for i in (1, 2))
  cache = tq_ops.prefill(cache, k, v, lengths=jnp.array([200, 57]))
  q = jax.random.normal(jax.random.key(3), (b, kh * g, 1, d))
  got = tq_ops.chunked_attention(cache, q, partial_fn=functools.partial(fn, interpret=True))
  want = tq_ops.chunked_attention(cache, q)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
