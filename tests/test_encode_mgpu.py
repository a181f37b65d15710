"""The Mosaic GPU encode kernel (pallas_kernels/encode_mgpu.py) against the XLA encode.

Tiers: `math` (its quantizer, packing matrices and row scales, and a plain jnp/NumPy model of the
kernel's arithmetic against the XLA encode, on CPU), `lowering` (Mosaic GPU lowering for an
abstract H100, on CPU), `gpu` (compiled kernel, skipped without a GPU).
Mosaic GPU has no interpret mode for multi-warpgroup kernels, so the kernel body itself runs only
in the `gpu` tier; what "the same code" means is `test_encode_kernel._check`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import use_abstract_mesh

from pallas_kernels import dispatch, encode_gpu
from kernel_paths import pallas_prefill
from pallas_kernels import encode_mgpu as M
from pallas_kernels import numerics
from test_encode_kernel import (H100, _centred, _check, _inputs, _tols, default_prefill_matches_xla,
                                gpu_encode_matches_xla, prefill_inputs)
from tqjax import cache as C
from tqjax import packing
from tqjax import quantizer as Q
from tqjax.codebook import make_codebook, quantize
from tqjax.rotation import dense_matrix

pytestmark = pytest.mark.math

IS_HOPPER = dispatch._is_hopper()


def _pack_on_matrices(fields, bits, d):
  """The kernel's packing in float64: fields [parts] of [N, d] → (the low and high 16-bit halves
  [N, n_out] as floats, the words [N, n_out] uint64)."""
  mats = M.pack_matrices(bits, d)
  halves = [sum(np.asarray(f, np.float64) @ mats[k, h] for k, f in enumerate(fields)) for h in (0, 1)]
  return halves, halves[0].astype(np.uint64) | (halves[1].astype(np.uint64) << 16)


@pytest.mark.math
@pytest.mark.parametrize("d", M.DIMS)
@pytest.mark.parametrize("bits", range(1, M.MAX_BITS + 1))
def test_quantize_fields_and_pack_matrices_exact(d, bits):
  """Fields · packing matrices (float64 here; exact in bf16 × bf16 → float32 too: integers below
  2^16) give `packing.pack` of `codebook.quantize`, on every boundary ±1 float, ±0, denormals,
  NaN (quantized like 0); Σ(ĉ² − c_h²) matches the centroids."""
  cb = make_codebook(bits, d)
  b = np.asarray(cb.boundaries, np.float32)
  vals = np.concatenate([b, np.nextafter(b, np.float32(1)), np.nextafter(b, np.float32(-1)),
                         np.float32([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0])])
  vals = np.concatenate([vals, -vals])
  rng = np.random.default_rng(bits + d)
  y = rng.permutation(np.resize(vals, 8 * d)).reshape(8, d).astype(np.float32)
  y[3, 7] = np.nan
  bounds, _, squares = encode_gpu.codebook_tables(bits, d)
  fields, sq = M.quantize_fields(jnp.asarray(y), bits, bounds, squares, jnp.zeros(y.shape, jnp.float32))
  assert M.quantize_fields(jnp.asarray(y), bits, bounds, squares, None)[1] is None
  want = np.asarray(quantize(cb, jnp.asarray(np.nan_to_num(y, nan=0.0)))).astype(np.int64)
  parts = packing.parts(bits)
  code = sum(np.asarray(f, np.int64) << offset for f, (_, offset, _) in zip(fields, parts))
  np.testing.assert_array_equal(code, want)
  for f, (p, _, _) in zip(fields, parts):  # fields are integers below 2^p: exact in bfloat16
    assert np.all((np.asarray(f) >= 0) & (np.asarray(f) < 2**p))
    np.testing.assert_array_equal(np.asarray(jnp.asarray(f).astype(jnp.bfloat16), np.float32), np.asarray(f))
  c = np.asarray(cb.centroids, np.float64)
  np.testing.assert_allclose(np.asarray(sq, np.float64).sum(1), (c[want] ** 2 - squares[0]).sum(1), rtol=1e-6, atol=1e-6)
  mats = M.pack_matrices(bits, d)
  assert np.array_equal(np.asarray(jnp.asarray(mats, jnp.bfloat16), np.float32), mats)  # powers of two
  halves, words = _pack_on_matrices(fields, bits, d)
  assert all(np.all(hv < 2**16) for hv in halves)
  nw = packing.packed_words(d, bits)
  np.testing.assert_array_equal(words[:, :nw].astype(np.uint32), np.asarray(packing.pack(jnp.asarray(want), bits)))
  assert not words[:, nw:].any()


@pytest.mark.math
@pytest.mark.parametrize("smallest", [2.0**-100, 2.0**-118], ids=["encode", "decode-query"])
def test_float16_row_scales(smallest):
  """`numerics.float16_row_scales` (the encode kernel's; the decode query's reference uses 2^-118):
  powers of two with up·down = 1 putting max |x·up| in [256, 512) for every row max from `smallest`
  up (below: as `smallest`; 0 included), so bfloat16 rows are exact in float16 down to 2^-14."""
  amax = np.concatenate([[0.0, 1e-45, 2.0**-126, 2.0**-100 / 3, 2.0**-118 * 1.01],
                         np.ldexp(np.linspace(1, 1.999, 7)[:, None], np.arange(-100, 128, 9)[None]).ravel(),
                         [np.float32(3.3e38)]]).astype(np.float32)
  up, down = map(np.asarray, jax.jit(lambda a: numerics.float16_row_scales(a, smallest))(jnp.asarray(amax)))
  mant, _ = np.frexp(np.concatenate([up, down]))
  assert np.all(mant == 0.5), "not powers of two"
  np.testing.assert_array_equal(up.astype(np.float64) * down, 1.0)
  top = np.maximum(amax, np.float32(smallest)).astype(np.float64) * up
  assert np.all((top >= 256) & (top < 512)), top
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((amax.size, 64)) * amax[:, None] / 4).astype(ml_dtypes.bfloat16).astype(np.float32)
  xs = x.astype(np.float64) * up[:, None]
  normal = np.abs(xs) >= 2.0**-14
  np.testing.assert_array_equal(xs.astype(np.float16)[normal], xs[normal])


def _kernel_model(tq, x, mean):
  """The kernel's arithmetic in plain jnp/NumPy for x [N, d] bf16 (− mean [N, d] or None): rows × 2^k
  into float16, Π in float16 with float32 sums, `quantize_fields`, `pack_matrices` → Code."""
  cfg = tq.config
  bits, d = cfg.bits, cfg.dim
  xc = x.astype(jnp.float32) - (0.0 if mean is None else mean)
  amax = jnp.max(jnp.abs(xc), axis=1)
  norm2 = jnp.sum(xc * xc, axis=1)
  finite = (amax < jnp.inf) & (norm2 == norm2)
  norm = jnp.sqrt(norm2)
  keep = finite & (norm > 0) if mean is not None else finite
  up, down = numerics.float16_row_scales(amax)
  acc = jnp.dot((xc * up[:, None]).astype(jnp.float16), dense_matrix(tq.rotation).T.astype(jnp.float16),
                preferred_element_type=jnp.float32)
  y = acc * jnp.where(keep, down / jnp.where(norm > 0, norm, 1.0), jnp.nan)[:, None]
  bounds, _, squares = encode_gpu.codebook_tables(bits, d)
  fields, sq = M.quantize_fields(y, bits, bounds, squares, jnp.full_like(y, squares[0]))
  words = _pack_on_matrices(fields, bits, d)[1].astype(np.uint32)
  scale = jnp.where(finite, norm, jnp.nan) / jnp.sqrt(jnp.sum(sq, axis=1))
  return Q.Code(jnp.asarray(words[:, :packing.packed_words(d, bits)]), scale.astype(cfg.norm_dtype), config=cfg)


@pytest.mark.math
@pytest.mark.parametrize("d,bits,with_mean", [(128, 3, True), (128, 4, False), (64, 2, True)])
def test_kernel_model_matches_xla_encode(d, bits, with_mean):
  """The float16 rotation's precision argument (module docstring), on CPU: a plain model of the
  kernel's arithmetic passes the GPU tests' check (`PRECISION`) against the XLA encode, special
  rows (NaN, ±Inf, zero, ‖x‖² under/overflowing) bit-exact."""
  rng = np.random.default_rng(d + bits)
  tq = Q.make_quantizer(d, bits, norm_correction=True, norm_dtype="float16")
  x, mean = _inputs(rng, (4, 512), d, jnp.bfloat16, with_mean)
  xc = _centred(x, mean)
  rows = lambda a: None if a is None else jnp.repeat(a, 512, axis=0)
  got = _kernel_model(tq, x.reshape(-1, d), rows(mean))
  want = Q.encode(tq, xc.reshape(-1, d))
  _check(tq, xc, got, want, **_tols(PRECISION, d, gpu=True), max_frac=1e-2, x=None if mean is None else x)


@pytest.mark.math
def test_supported_and_errors():
  assert M.supported(Q.make_quantizer(128, 3), jnp.bfloat16, 4096) == (True, "")
  for tq, dtype, tokens, why in (
      (Q.make_quantizer(128, 3, "prod"), None, None, "variant='prod'"),
      (Q.make_quantizer(256, 3), None, None, "dim=256"),
      (Q.make_quantizer(128, 5), None, None, "bits=5"),
      (Q.make_quantizer(128, 3), jnp.float32, None, "float32"),
      (Q.make_quantizer(128, 3), jnp.bfloat16, 100, "100 tokens"),
  ):
    ok, reason = M.supported(tq, dtype, tokens)
    assert not ok and why in reason, reason
  with pytest.raises(ValueError, match="100 tokens"):
    M.encode(Q.make_quantizer(128, 3), jnp.zeros((2, 100, 128), jnp.bfloat16), jnp.zeros((2, 128)))
  with pytest.raises(ValueError, match="mean must be"):
    M.encode(Q.make_quantizer(128, 3), jnp.zeros((2, 64, 128), jnp.bfloat16), jnp.zeros((64, 128)))


LOWERING_CASES = [(d, bits, mean, wgs) for d in M.DIMS for bits in range(1, M.MAX_BITS + 1)
                  for mean, wgs in ((False, 2), (True, 3 if bits == 4 else 2))]


@pytest.mark.lowering
@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: f"d{c[0]}b{c[1]}{'-mean' if c[2] else ''}-wg{c[3]}")
def test_lowers_for_h100(case):
  d, bits, with_mean, wgs = case
  tq = Q.make_quantizer(d, bits, norm_correction=bits % 2 == 0, norm_dtype="float16")
  x = jax.ShapeDtypeStruct((2, 3, 640, d), jnp.bfloat16)
  mean = jax.ShapeDtypeStruct((2, 3, d), jnp.float32) if with_mean else None
  with use_abstract_mesh(H100):
    jax.jit(functools.partial(M.encode, ctas=132, wgs=wgs)).trace(tq, x, mean).lower(lowering_platforms=("cuda",))


@pytest.mark.lowering
def test_default_prefill_on_hopper_lowers_for_h100(monkeypatch):
  """The default prefill as a Hopper GPU runs it (the key mean, the Mosaic encode of keys and values
  with the default warpgroups and CTAs), traced and lowered for an abstract H100."""
  monkeypatch.setattr(dispatch, "_is_hopper", lambda: True)
  monkeypatch.setattr(dispatch, "_backend", lambda: "gpu")
  empty = C.init_cache(C.CacheConfig(head_dim=128, k_bits=4, v_bits=3), 2, 4, 1024)
  k = jax.ShapeDtypeStruct((2, 4, 640, 128), jnp.bfloat16)
  assert dispatch._mosaic_encode(empty.k.quantizer, k, empty.key_mean)
  lengths = jnp.asarray([640, 100], jnp.int32)
  with use_abstract_mesh(H100):
    jax.jit(lambda c, k, v, n: pallas_prefill(c, k, v, n)).trace(empty, k, k, lengths).lower(
        lowering_platforms=("cuda",))


# The kernel rotates in float16 (Π rounded to 2^-11 relative, x·2^k, centred x too), a tf32-class
# dot: `_tols("tf32", gpu=True)` lets a code flip within 5e-3/√d of a boundary, ~25x the y rms error.
PRECISION = "tf32"

GPU_CASES = [  # d, bits, norm correction, norm dtype, lead dims, mean, ctas
    (128, 3, True, "float16", (4, 8, 1024), True, None),
    (128, 4, True, "float16", (4, 8, 1024), False, None),
    (128, 2, False, "float32", (3, 640), True, 7),  # fewer blocks per CTA than stages for some
    (64, 1, True, "bfloat16", (2, 2, 192), True, 5),
    (64, 4, False, "float32", (5, 64), False, 300),  # more warpgroups than blocks
]


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"d{c[0]}b{c[1]}-{c[3]}{'-mean' if c[5] else ''}")
def test_gpu_compiled_matches_xla_encode(case):
  d, bits, nc, nd, lead, with_mean, ctas = case
  gpu_encode_matches_xla(functools.partial(M.encode, ctas=ctas), d, bits, nc, nd, jnp.bfloat16, lead, with_mean,
                         PRECISION)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
def test_gpu_prefill_default_is_the_mosaic_kernel():
  k, v = prefill_inputs(9, 2, 4, 1024)
  k = k.at[1, :, 900].set(jnp.nan)  # past sequence 1's length: never in its mean or its cache
  lengths = jnp.asarray([1024, 777], jnp.int32)
  empty = C.init_cache(C.CacheConfig(head_dim=128, k_bits=4, v_bits=3), 2, 4, 1024 + 64)
  mean = jnp.zeros((2, 4, 128), jnp.float32)
  assert dispatch._mosaic_encode(empty.k.quantizer, k, mean) and dispatch._mosaic_encode(empty.v.quantizer, v, None)
  default_prefill_matches_xla(empty, k, v, lengths, PRECISION)
