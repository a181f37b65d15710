"""The fused encode kernel (pallas_kernels/encode_gpu.py) against the XLA encode.

Tiers: `math` (static tables, kernel order, quantize/pack steps on crafted values), `interpret`
(Pallas interpret mode on CPU), `lowering` (Triton lowering for an abstract H100, on CPU), `gpu`
(compiled kernel, skipped without a GPU).

What "the same code" means: the kernel's dots round differently from the XLA path's, so a
coordinate whose rotated value y lies within that rounding of a codebook boundary may get the
neighbouring level. `_check` recomputes y in float64 and accepts a code mismatch only if it is
rare, between adjacent levels, and y is within `y_atol` of the boundary between them (scaled by
‖x‖/‖x − mean‖ for centred inputs: the kernel subtracts the mean after its dots); scales must
match ‖x‖ (/‖ŷ‖ of the kernel's own codes) in float64 to the norm dtype's rounding; QJL signs
(prod) may flip only where S·r is within rounding of 0, residual norms match ‖r‖ of the kernel's
own codes; rows that are non-finite, zero, or overflow must match the XLA path exactly. Kernel
outputs start poisoned (codes 0xFFFFFFFF, scales NaN), so anything left unwritten fails these
checks. (Interpret mode cannot catch a store past the end of an array, which it drops: the GPU
tests do.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from pallas_kernels import dispatch
from kernel_paths import pallas_prefill
from pallas_kernels import encode_gpu as E
from pallas_kernels.column_order import to_column_major
from tqjax import cache as C
from tqjax import ops as tq_ops
from tqjax import packing
from tqjax import quantizer as Q
from tqjax.codebook import lloyd_max
from tqjax.rotation import dense_matrix

pytestmark = pytest.mark.interpret

H100 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda"))
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
NORM_RTOL = {"float32": 2e-6, "float16": 2.0**-11 + 2e-6, "bfloat16": 2.0**-8 + 2e-6}


def _unpack(tq, codes):
  bits = tq.config.mse_bits
  if not bits:
    return np.zeros((int(np.prod(codes.shape[:-1])), tq.dim), np.int64)
  return np.asarray(packing.unpack(codes, bits, tq.dim)).astype(np.int64).reshape(-1, tq.dim)


def _assert_near_boundary(a, b, y, bounds, atol, what):
  """Codes a, b [n, d] may differ only by one level, with y within atol [n] of the boundary between them."""
  mism = a != b
  assert np.all(np.abs(a[mism] - b[mism]) == 1), f"{what}: a mismatch skips a level"
  dist = np.abs(y[mism] - bounds[np.minimum(a[mism], b[mism])])
  tol = np.broadcast_to(atol[:, None], a.shape)[mism]
  assert np.all(dist <= tol), f"{what}: mismatch at |y − boundary| / atol = {np.max(dist / tol):.2f} > 1"
  return mism.mean()


def _check(tq, xc, got: Q.Code, want: Q.Code, *, y_atol: float, truth_atol: float, max_frac: float, x=None):
  """Kernel code `got` vs XLA code `want` of the same (centred) vectors xc [..., d] (float32 values),
  and the kernel's codes vs float64 truth (searchsorted of the float64 rotation); for prod also
  the QJL signs and residual norms against float64 recomputations from the kernel's own codes.

  x: the uncentred vectors when xc = x − mean: the kernel subtracts the mean after its dots, so
  its rounding scales with ‖x‖, and the tolerances with ‖x‖ / ‖x − mean‖ (at least 1).
  """
  cfg = tq.config
  bits = cfg.mse_bits
  xc = np.asarray(xc, np.float64).reshape(-1, tq.dim)
  gn = np.asarray(got.norms.astype(jnp.float32), np.float64).reshape(-1)
  wn = np.asarray(want.norms.astype(jnp.float32), np.float64).reshape(-1)
  gi, wi = _unpack(tq, got.codes), _unpack(tq, want.codes)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
  if bits:  # only real fields: stray bits (e.g. poison left in a word) would not survive a repack
    np.testing.assert_array_equal(np.asarray(packing.pack(jnp.asarray(gi, jnp.uint8), bits)),
                                  np.asarray(got.codes).reshape(gi.shape[0], -1))

  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    norm64 = np.linalg.norm(xc, axis=1)
    amp = np.ones_like(norm64)
    if x is not None:
      amp = np.maximum(np.nan_to_num(np.linalg.norm(np.asarray(x, np.float64).reshape(xc.shape), axis=1) / norm64), 1)
  # NaN/Inf rows, ‖x‖² overflowing float32, all-zero rows: bit-exact, like the XLA path.
  exact = ~np.isfinite(wn) | (norm64 == 0)
  np.testing.assert_array_equal(gi[exact], wi[exact])
  np.testing.assert_array_equal(gn[exact], wn[exact])
  reg = ~exact
  assert np.isfinite(gn[reg]).all(), "kernel left NaN (unwritten or poisoned) scales"
  y = np.zeros_like(xc)
  y[reg] = (xc[reg] / norm64[reg, None]) @ np.asarray(dense_matrix(tq.rotation), np.float64).T
  # ‖x‖² underflowing float32 (scale 0): both paths quantize x / 1, i.e. tiny y: sign codes only.
  underflow = reg & (wn == 0)
  if bits:
    bounds = lloyd_max(bits, cfg.dim)[1].astype(np.float32).astype(np.float64)
    frac = _assert_near_boundary(gi[reg], wi[reg], y[reg], bounds, y_atol * amp[reg], "kernel vs XLA")
    assert frac <= max_frac, f"kernel vs XLA: mismatch fraction {frac:.2e} > {max_frac=:.2e}"
    truth = np.searchsorted(bounds, np.where(underflow[:, None], y * 1e-30, y)[reg], side="left")
    frac = _assert_near_boundary(gi[reg], truth, y[reg], bounds, truth_atol * amp[reg], "kernel vs float64")
    assert frac <= max_frac, f"kernel vs float64: mismatch fraction {frac:.2e} > {max_frac=:.2e}"

  c = lloyd_max(bits, cfg.dim)[0].astype(np.float32).astype(np.float64) if bits else np.zeros(1)
  expect = norm64
  if cfg.norm_correction:
    expect = norm64 / np.linalg.norm(c[gi], axis=1)
  np.testing.assert_array_equal(gn[underflow], 0)  # decodes to zeros
  ok = reg & ~underflow
  np.testing.assert_allclose(gn[ok], expect[ok], rtol=NORM_RTOL[cfg.norm_dtype])

  if cfg.variant == "prod":
    y_q = np.where(ok[:, None], y, np.where(underflow[:, None], y * 1e-30, 0.0))  # what was quantized
    r = y_q - c[gi]  # the residual of the kernel's own codes
    z = r @ np.asarray(tq.qjl.matrix, np.float64).T
    rn = np.linalg.norm(r, axis=1)
    sign_bits = np.asarray(packing.unpack(got.qjl_signs, 1, cfg.sketch_dim)).reshape(z.shape)
    np.testing.assert_array_equal(np.asarray(packing.pack(jnp.asarray(sign_bits), 1)),
                                  np.asarray(got.qjl_signs).reshape(z.shape[0], -1))
    flip = sign_bits != (z >= 0)
    assert flip.mean() <= max_frac, f"QJL sign mismatch fraction {flip.mean():.2e}"
    near = np.abs(z) <= 10 * truth_atol * np.sqrt(cfg.dim) * (amp * rn)[:, None]
    assert np.all(near[flip]), f"QJL sign flipped at |S·r| / ‖r‖ = {np.max(np.abs(z[flip]) / rn[np.nonzero(flip)[0]]):.2e}"
    grn = np.asarray(got.residual_norms.astype(jnp.float32), np.float64).reshape(-1)
    assert np.all(np.abs(grn - rn) <= NORM_RTOL[cfg.norm_dtype] * rn + 10 * truth_atol * np.sqrt(cfg.dim) * amp)


def _tols(precision, d, gpu=False):
  """(y_atol, truth_atol): how far from a boundary a code may flip (see the module docstring).

  Interpret mode: float32 dots on CPU; "high" keeps P to ~2^-17 (|Δy| ~ 1e-5/√d). GPU: the XLA
  path rotates at Precision.HIGH (tf32-class, |Δy| ~ 5e-4/√d), the kernel at "high" or tf32.
  """
  kernel = (1e-4 if precision == "high" else (5e-3 if gpu else 1e-6)) / np.sqrt(d)
  return dict(y_atol=5e-3 / np.sqrt(d) if gpu else kernel, truth_atol=kernel)


def _quantizer(d, bits, nc, nd, rotation="haar", seed=0):
  """mse with norm correction nc, or prod (nc == "prod")."""
  if nc == "prod":
    return Q.make_quantizer(d, bits, "prod", norm_dtype=nd, rotation=rotation, seed=seed)
  return Q.make_quantizer(d, bits, norm_correction=nc, norm_dtype=nd, rotation=rotation, seed=seed)


def _inputs(rng, lead, d, dtype, with_mean):
  """x [*lead, d] with special rows (NaN, ±Inf, zero, ‖x‖² over/underflowing float32, equal to
  its group's mean)."""
  x = rng.standard_normal((*lead, d)) * rng.uniform(0.1, 10.0, (*lead, 1)) + 0.3
  flat = x.reshape(-1, d)
  flat[1, 5] = np.nan
  flat[3, 0] = np.inf
  flat[4, d - 1] = -np.inf
  flat[6] = 0.0
  flat[7] *= 1e-30  # ‖x‖² underflows to 0 in float32 (a zero row in float16)
  if dtype != jnp.float16:
    flat[8] = 1e20  # finite, but ‖x‖² overflows float32: norm inf, zero-direction codes
  x = jnp.asarray(x, dtype)
  mean = None
  if with_mean:
    mean = jnp.asarray(rng.standard_normal((*lead[:-1], d)) * 0.5, jnp.float32)
    mean = mean.reshape(-1, d).at[-1].set(x.reshape(-1, lead[-1], d)[-1, 2].astype(jnp.float32)).reshape(mean.shape)
  return x, mean


def _centred(x, mean):
  xf = x.astype(jnp.float32)
  return xf if mean is None else xf - mean[..., None, :]


def _real_tokens(a, real):
  """a [B, K, S, ...] → the rows of the real tokens, real [B, T] (T ≤ S): [n, ...]."""
  t = real.shape[1]
  a = np.asarray(a)
  return a[:, :, :t][np.broadcast_to(real[:, None], (*a.shape[:2], t))]


def _check_caches(got, want, k, v, lengths, precision="high", gpu=False):
  """Caches from a prefill through the kernel (got) and through XLA (want) of k, v [B, K, T, D]."""
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in ((got.lengths, want.lengths), (got.key_mean, want.key_mean), (got.window_k, want.window_k),
               (got.window_v, want.window_v)):
    if b is not None:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  real = np.arange(k.shape[2])[None, :] < np.asarray(lengths)[:, None]  # [B, T]
  for sg, sw, x, mean in ((got.k, want.k, k, want.key_mean), (got.v, want.v, v, None)):
    tq = sw.quantizer
    code = lambda c: jax.tree_util.tree_map(lambda a: jnp.asarray(_real_tokens(a, real)), c)
    _check(tq, _real_tokens(_centred(x, mean), real), code(sg.main), code(sw.main),
           **_tols(precision, tq.dim, gpu), max_frac=1e-2 if gpu else 1e-3,
           x=None if mean is None else _real_tokens(x.astype(jnp.float32), real))
    # Slots past each sequence's real tokens keep what the empty cache held.
    for a, b in zip(jax.tree_util.tree_leaves(sg.main), jax.tree_util.tree_leaves(sw.main)):
      pad = ~np.broadcast_to(np.pad(real, ((0, 0), (0, a.shape[2] - real.shape[1])))[:, None], a.shape[:3])
      np.testing.assert_array_equal(np.asarray(a)[pad], np.asarray(b)[pad])


# ----------------------------------------------------------------------------- static tables


@pytest.mark.math
@pytest.mark.parametrize("d", [32, 64, 128, 256])
def test_tables_and_kernel_order(d):
  # b = 2: boundaries (−β, 0, β): the positive half is (β,); levels c_2, c_3 and squares c_2², c_3²
  # for m = 0, 1 (code 1 − m for y ≤ 0 has centroid −c_{2+m}).
  for bits in range(1, E.MAX_BITS + 1):
    c, b, _ = lloyd_max(bits, d)
    bounds, levels, squares = E.codebook_tables(bits, d)
    h = 2 ** (bits - 1)
    assert bounds == tuple(np.float32(b[h:]).tolist())
    assert levels == tuple(np.float32(c[h:]).tolist())
    np.testing.assert_array_equal(np.float32(squares), np.float32(c[h:]) * np.float32(c[h:]))
  # Column w·32 + s of the kernel-order operand gives coordinate s·W + w of Π·x.
  rng = np.random.default_rng(d)
  tq = Q.make_quantizer(d, 3, "prod", qjl_dim=2 * d)
  x = rng.standard_normal((5, d))
  (p,) = E.rotation_operands(tq, "tf32")
  y = x @ np.asarray(p, np.float64)
  want = x @ np.asarray(dense_matrix(tq.rotation), np.float64).T
  to_kernel = lambda a: np.asarray(to_column_major(jnp.asarray(a)))
  np.testing.assert_allclose(y, to_kernel(want), rtol=1e-5, atol=1e-5)
  w = d // 32
  for j in (0, 1, 33 % d, d - 1):
    np.testing.assert_allclose(y[:, j], want[:, (j % 32) * w + j // 32], rtol=1e-5, atol=1e-5)
  # The sketch maps a kernel-order residual to the kernel-order S·r (sketch has 2d rows here).
  (st,) = E.sketch_operands(tq, "tf32")
  z = to_kernel(x) @ np.asarray(st, np.float64)
  np.testing.assert_allclose(z, to_kernel(x @ np.asarray(tq.qjl.matrix, np.float64).T), rtol=1e-5, atol=1e-4)
  for full, parts in ((p, E.rotation_operands(tq, "high")), (st, E.sketch_operands(tq, "high"))):
    split = np.asarray(parts[0], np.float64) + np.asarray(parts[1], np.float64)
    assert np.max(np.abs(split - np.asarray(full, np.float64))) <= 2.0**-16 * np.max(np.abs(np.asarray(full)))


@pytest.mark.math
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_quantize_and_pack_tile_exact(bits):
  """The kernel's quantize + pack steps (plain jnp here) on crafted y: every float32 boundary
  ±b exactly (ties go to the lower code, as searchsorted side="left"), one float either side,
  ±0, denormals, ±1: codes equal `codebook.quantize`, words equal `packing.pack`, ĉ and ĉ² equal
  the float32 centroids (up to the rounding of their step sums)."""
  from tqjax.codebook import make_codebook, quantize

  d = 64
  cb = make_codebook(bits, d)
  b = np.asarray(cb.boundaries, np.float32)
  special = np.float32([0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0, 0.5, -0.5])
  near = np.concatenate([b, np.nextafter(b, np.float32(1)), np.nextafter(b, np.float32(-1))])
  vals = np.concatenate([near, -near, special])
  vals = np.resize(vals, 16 * 32).astype(np.float32)
  np.random.default_rng(bits).shuffle(vals)
  y = jnp.asarray(vals.reshape(16, 32))
  bounds, levels, squares = E.codebook_tables(bits, d)
  code, sq, chat = E._quantize_tile(y, bits, bounds, levels, squares, jnp.full(y.shape, squares[0]), True)
  want = np.asarray(quantize(cb, y)).astype(np.uint32)
  np.testing.assert_array_equal(np.asarray(code), want)
  c = np.asarray(cb.centroids, np.float32)
  np.testing.assert_allclose(np.asarray(chat), c[want], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(sq), c[want] * c[want], rtol=1e-6, atol=1e-8)
  # NaN quantizes exactly like 0 (the kernel's non-kept rows): code h − 1, ĉ² = c_h².
  nan_code, nan_sq, _ = E._quantize_tile(jnp.full((1, 16), jnp.nan), bits, bounds, levels, squares,
                                         jnp.full((1, 16), squares[0]))
  np.testing.assert_array_equal(np.asarray(nan_code), np.asarray(quantize(cb, jnp.zeros((1, 16)))))
  np.testing.assert_array_equal(np.asarray(nan_sq), np.float32(squares[0]))
  # One column (W = 1, d = 32 slots) in two 16-slot tiles: row r's word is the sum of its terms.
  words = {}
  for s0 in (0, E.TILE):
    for r, terms in E._pack_terms(code[:, s0:s0 + E.TILE], bits, s0):
      words[r] = words.get(r, 0) + np.asarray(terms).sum(axis=1, dtype=np.uint32)
  packed = np.asarray(packing.pack(jnp.asarray(want, jnp.uint8), bits))  # [16, bits]
  assert sorted(words) == list(range(bits))
  for r, word in words.items():
    np.testing.assert_array_equal(word, packed[:, r])


# ----------------------------------------------------------------------------- interpret mode


INTERPRET_CASES = [
    # d, bits, norm correction (or "prod"), norm dtype, x dtype, lead dims, mean, precision, block_t,
    # blocks per program, rotation
    (128, 3, True, "float16", jnp.bfloat16, (3, 37), False, "high", None, 1, "haar"),
    (128, 4, True, "float16", jnp.bfloat16, (2, 45), True, "high", 16, 2, "haar"),
    (64, 2, False, "float32", jnp.float32, (70,), False, "tf32", 32, 1, "hadamard"),
    (32, 1, True, "bfloat16", jnp.float16, (2, 3, 21), True, "high", 16, 1, "haar"),
    (256, 4, False, "bfloat16", jnp.float32, (50,), False, "high", 16, 4, "haar"),
    (64, 3, True, "float32", jnp.float32, (4, 33), True, "tf32", None, 1, "hadamard"),
    (128, 3, "prod", "float16", jnp.bfloat16, (2, 40), True, "high", 16, 1, "haar"),
    (32, 1, "prod", "float32", jnp.float32, (50,), False, "tf32", None, 1, "haar"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET_CASES,
                         ids=lambda c: f"d{c[0]}b{c[1]}{c[2] if c[2] == 'prod' else 'nc' if c[2] else ''}-{c[3]}-{jnp.dtype(c[4]).name}"
                         f"-{'mean' if c[6] else 'plain'}-{c[7]}")
def test_interpret_matches_xla_encode(case):
  d, bits, nc, nd, dtype, lead, with_mean, precision, block_t, bpp, rot = case
  rng = np.random.default_rng(d * 10 + bits)
  tq = _quantizer(d, bits, nc, nd, rotation=rot, seed=bits)
  x, mean = _inputs(rng, lead, d, dtype, with_mean)
  got = E.encode(tq, x, mean, block_t=block_t, blocks_per_program=bpp, precision=precision,
                 interpret=True, poison=True)
  xc = _centred(x, mean)
  want = E.encode_reference(tq, x, mean)  # Q.encode(tq, xc)
  _check(tq, xc, want, want, y_atol=0, truth_atol=1e-6, max_frac=1e-3)  # the XLA path passes its own bar
  _check(tq, xc, got, want, **_tols(precision, d), max_frac=1e-3, x=None if mean is None else x)
  # Zero rows (and a token equal to its group's mean) decode to exact zeros.
  dec = np.asarray(Q.decode(tq, got)).reshape(-1, lead[-1], d)
  assert np.all(dec[-1, 2] == 0) if mean is not None else np.all(dec.reshape(-1, d)[6] == 0)


@pytest.mark.interpret
def test_interpret_real_minilm_keys_and_values(minilm_qkv_path):
  """Real MiniLM K/V (head_dim 32, float16): layer-0 keys centred per head (its skewed head 2
  included), layer-5 values plain."""
  with np.load(minilm_qkv_path) as z:
    keys = jnp.asarray(z["keys"][0, 0, :, :256])  # [12, 256, 32] float16
    values = jnp.asarray(z["values"][0, 5, :, :256])
  tq_k = _quantizer(32, 3, True, "float16", seed=1)
  mean = jnp.mean(keys.astype(jnp.float32), axis=1)
  got = E.encode(tq_k, keys, mean, interpret=True, poison=True)
  xc = _centred(keys, mean)
  _check(tq_k, xc, got, Q.encode(tq_k, xc), **_tols("high", 32), max_frac=1e-3, x=keys)
  tq_v = _quantizer(32, 4, True, "bfloat16", seed=2)
  got = E.encode(tq_v, values, interpret=True, poison=True)
  _check(tq_v, values.astype(jnp.float32), got, Q.encode(tq_v, values), **_tols("high", 32), max_frac=1e-3)


@pytest.mark.interpret
def test_interpret_cache_prefill_matches_xla():
  """`prefill` through the kernel (implementation="pallas", interpret) equals the XLA prefill:
  K4/V4 defaults (centred keys, norm correction, float16 scales), right-padded sequences, window;
  then prod keys."""
  rng = np.random.default_rng(11)
  cfg = C.CacheConfig(head_dim=64, window=4)
  b, kh, t, s = 2, 3, 40, 48
  k = jnp.asarray(rng.standard_normal((b, kh, t, 64)) + 0.7, jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((b, kh, t, 64)), jnp.bfloat16)
  lengths = jnp.asarray([40, 17], jnp.int32)
  empty = C.init_cache(cfg, b, kh, s)
  got = pallas_prefill(empty, k, v, lengths, interpret=True, poison=True)
  want = tq_ops.prefill(empty, k, v, lengths, implementation="xla")
  _check_caches(got, want, k, v, lengths)
  # prod keys (QJL) with bfloat16 scales, float32 inputs, no window.
  cfg = C.CacheConfig(head_dim=32, k_bits=3, v_bits=2, k_variant="prod", norm_dtype="bfloat16")
  k, v = (x[..., :32].astype(jnp.float32) for x in (k, v))
  empty = C.init_cache(cfg, b, kh, s)
  got = pallas_prefill(empty, k, v, lengths, interpret=True, poison=True)
  _check_caches(got, tq_ops.prefill(empty, k, v, lengths, implementation="xla"), k, v, lengths)


@pytest.mark.interpret
def test_interpret_prefill_falls_back_per_store():
  """6-bit keys (beyond the kernel's 4 codebook bits): implementation=None on GPU encodes them
  with XLA and the values with the kernel; "pallas" refuses. (interpret=True stands in for the
  GPU backend.)"""
  rng = np.random.default_rng(12)
  cfg = C.CacheConfig(head_dim=32, k_bits=6, v_bits=2, norm_dtype="float32")
  k = jnp.asarray(rng.standard_normal((1, 2, 24, 32)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 2, 24, 32)), jnp.float32)
  empty = C.init_cache(cfg, 1, 2, 24)
  with pytest.raises(ValueError, match="keys: bits=6"):
    pallas_prefill(empty, k, v, interpret=True)
  got = pallas_prefill(empty, k, v, xla_fallback=True, interpret=True, poison=True)
  want = tq_ops.prefill(empty, k, v, implementation="xla")
  for a, b in zip(jax.tree_util.tree_leaves(got.k), jax.tree_util.tree_leaves(want.k)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the XLA encode itself
  _check(want.v.quantizer, v, got.v.main, want.v.main, **_tols("high", 32), max_frac=1e-3)


# ----------------------------------------------------------------------------- dispatch and errors


def test_dispatch_defaults_and_errors():
  cfg = C.CacheConfig(head_dim=64)
  cache = C.init_cache(cfg, 1, 1, 8)
  x = jnp.zeros((1, 1, 8, 64), jnp.bfloat16)
  assert dispatch.prefill_supports(cache, "gpu", (jnp.bfloat16, jnp.float32)) == (True, "")
  assert dispatch.prefill_supports(cache, "cpu")[0] is False
  assert "NVIDIA" in dispatch.prefill_supports(cache, "rocm")[1]
  if jax.default_backend() == "cpu":
    assert dispatch.default_prefill_implementation(cache) == "xla"
    with pytest.raises(ValueError, match="backend 'cpu'"):
      tq_ops.prefill(cache, x, x, implementation="pallas")
    # None on CPU is the XLA path, bit for bit.
    for a, b in zip(jax.tree_util.tree_leaves(tq_ops.prefill(cache, x + 1, x)),
                    jax.tree_util.tree_leaves(tq_ops.prefill(cache, x + 1, x, implementation="xla"))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="implementation="):
    tq_ops.prefill(cache, x, x, implementation="triton")
  for kw, why in ((dict(k_variant="prod", k_bits=6), "keys: bits=6 (5 codebook bits)"),
                  (dict(outlier_channels=4), "outlier_channels=4"), (dict(v_bits=5), "values: bits=5"),
                  (dict(head_dim=48), "dim=48")):
    cfg = C.CacheConfig(**{"head_dim": 64, **kw})
    c = C.init_cache(cfg, 1, 1, 8)
    ok, reason = dispatch.prefill_supports(c, "gpu")
    assert not ok and why in reason, reason
    xx = jnp.zeros((1, 1, 8, cfg.head_dim), jnp.float32)
    with pytest.raises(ValueError, match="not available"):
      pallas_prefill(c, xx, xx, interpret=True)
  assert "float64" in E.supported(Q.make_quantizer(64, 3), jnp.float64)[1]
  assert E.supported(Q.make_quantizer(64, 5, "prod"))[0]
  assert "qjl_dim=40" in E.supported(Q.make_quantizer(64, 3, "prod", qjl_dim=40))[1]
  with pytest.raises(ValueError, match="precision"):
    E.encode(Q.make_quantizer(64, 3), jnp.zeros((4, 64)), precision="fp8", interpret=True)
  with pytest.raises(ValueError, match="mean must be"):
    E.encode(Q.make_quantizer(64, 3), jnp.zeros((2, 4, 64)), jnp.zeros((4, 64)), interpret=True)
  empty = E.encode(Q.make_quantizer(64, 3), jnp.zeros((2, 0, 64)), interpret=True)
  assert empty.codes.shape == (2, 0, 6) and empty.norms.shape == (2, 0)


# ----------------------------------------------------------------------------- lowering


LOWERING_CASES = [
    # d, bits, norm correction (or "prod"), norm dtype, x dtype, mean, precision, blocks/program, qjl_dim
    (d, bits, bits % 2 == 0, ("float16", "float32", "bfloat16")[(d // 32 + bits) % 3],
     (jnp.bfloat16, jnp.float32, jnp.float16)[(d // 32 + 2 * bits) % 3], (d + bits) % 3 == 0,
     "tf32" if (d, bits) in ((64, 1), (128, 4), (256, 3)) else "high", 2 if (d, bits) == (128, 3) else 1, None)
    for d in E.DIMS for bits in range(1, E.MAX_BITS + 1)
] + [
    (128, 3, True, "float16", jnp.bfloat16, False, "high", 1, None),  # bf16 values: the 2-dot path
    (128, 4, True, "float16", jnp.bfloat16, False, "high", 4, None),
    (128, 3, "prod", "float16", jnp.bfloat16, True, "high", 1, None),
    (128, 4, "prod", "float16", jnp.bfloat16, True, "tf32", 2, None),
    (64, 1, "prod", "float32", jnp.float32, False, "high", 1, None),  # no codebook stage
    (256, 5, "prod", "bfloat16", jnp.float16, False, "high", 1, None),
    (32, 2, "prod", "float32", jnp.bfloat16, False, "high", 1, 64),
]


@pytest.mark.lowering
@pytest.mark.parametrize("case", LOWERING_CASES,
                         ids=lambda c: f"d{c[0]}b{c[1]}{'prod' if c[2] == 'prod' else ''}-{jnp.dtype(c[4]).name}"
                         f"-{c[6]}{'-mean' if c[5] else ''}{'-loop' if c[7] > 1 else ''}{f'-m{c[8]}' if c[8] else ''}")
def test_lowers_for_h100(case):
  d, bits, nc, nd, dtype, with_mean, precision, bpp, qjl_dim = case
  if nc == "prod":
    tq = Q.make_quantizer(d, bits, "prod", norm_dtype=nd, qjl_dim=qjl_dim)
  else:
    tq = Q.make_quantizer(d, bits, norm_correction=nc, norm_dtype=nd)
  x = jax.ShapeDtypeStruct((2, 3, 1000, d), dtype)
  mean = jax.ShapeDtypeStruct((2, 3, d), jnp.float32) if with_mean else None
  f = functools.partial(E.encode, precision=precision, blocks_per_program=bpp)
  with use_abstract_mesh(H100):
    jax.jit(f).trace(tq, x, mean).lower(lowering_platforms=("cuda",))


@pytest.mark.lowering
@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_prefill_lowers_for_h100(variant):
  """The whole prefill with the kernel as encoder (what implementation=None runs on a GPU)."""
  cfg = C.CacheConfig(head_dim=128, k_bits=4, v_bits=4, k_variant=variant)
  cache = jax.eval_shape(lambda: C.init_cache(cfg, 2, 2, 4096))
  k = jax.ShapeDtypeStruct((2, 2, 4096, 128), jnp.bfloat16)
  f = lambda c, k, v: C.prefill_with_encoder(c, k, v, encoder=E.encode)
  with use_abstract_mesh(H100):
    jax.jit(f).trace(cache, k, k).lower(lowering_platforms=("cuda",))


# ----------------------------------------------------------------------------- real GPU


def gpu_encode_matches_xla(encode, d, bits, nc, nd, dtype, lead, with_mean, precision="high"):
  """encode(tq, x, mean), compiled, against the XLA encode on `_inputs` (special rows included)."""
  rng = np.random.default_rng(d + bits)
  tq = _quantizer(d, bits, nc, nd, seed=bits)
  x, mean = _inputs(rng, lead, d, dtype, with_mean)
  got = jax.jit(encode)(tq, x, mean)
  xc = jax.jit(_centred)(x, mean)
  want = jax.jit(Q.encode)(tq, xc)
  _check(tq, xc, got, want, **_tols(precision, d, gpu=True), max_frac=1e-2, x=None if mean is None else x)


def prefill_inputs(seed, b, kh, t):
  """k (offset 0.5: a key mean to remove), v: bfloat16 [b, kh, t, 128]."""
  rng = np.random.default_rng(seed)
  k = jnp.asarray(rng.standard_normal((b, kh, t, 128)) + 0.5, jnp.bfloat16)
  return k, jnp.asarray(rng.standard_normal((b, kh, t, 128)), jnp.bfloat16)


def default_prefill_matches_xla(empty, k, v, lengths, precision="high"):
  """The default prefill (implementation=None: the kernels on a GPU, rotating at `precision`) against
  the XLA prefill."""
  got = jax.jit(lambda c, k, v, n: tq_ops.prefill(c, k, v, n))(empty, k, v, lengths)
  want = jax.jit(lambda c, k, v, n: tq_ops.prefill(c, k, v, n, implementation="xla"))(empty, k, v, lengths)
  _check_caches(got, want, k, v, lengths, precision, gpu=True)



GPU_CASES = [
    # d, bits, norm correction (or "prod"), norm dtype, x dtype, lead dims, mean, precision
    (128, 3, True, "float16", jnp.bfloat16, (4, 8, 1000), False, "high"),
    (128, 4, True, "float16", jnp.bfloat16, (4, 8, 1000), True, "high"),
    (128, 4, True, "float16", jnp.bfloat16, (4, 8, 1000), True, "tf32"),
    (64, 2, False, "float32", jnp.float32, (3, 777), False, "high"),
    (256, 3, True, "bfloat16", jnp.float16, (2, 513), True, "high"),
    (32, 1, True, "float32", jnp.float32, (5000,), False, "tf32"),
    (128, 3, "prod", "float16", jnp.bfloat16, (4, 8, 1000), True, "high"),
    (64, 1, "prod", "float32", jnp.float32, (3, 777), False, "high"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"d{c[0]}b{c[1]}{'prod' if c[2] == 'prod' else ''}"
                         f"-{jnp.dtype(c[4]).name}-{c[7]}"
                         f"{'-mean' if c[6] else ''}")
def test_gpu_compiled_matches_xla_encode(case):
  d, bits, nc, nd, dtype, lead, with_mean, precision = case
  gpu_encode_matches_xla(functools.partial(E.encode, precision=precision, poison=True), d, bits, nc, nd, dtype,
                         lead, with_mean, precision)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_gpu_prefill_default_is_the_kernel():
  k, v = prefill_inputs(5, 2, 4, 3001)
  lengths = jnp.asarray([3001, 1234], jnp.int32)
  empty = C.init_cache(C.CacheConfig(head_dim=128, k_bits=3, v_bits=3), 2, 4, 3001 + 7)
  assert dispatch.default_prefill_implementation(empty, (k.dtype, v.dtype)) == "pallas"
  default_prefill_matches_xla(empty, k, v, lengths)
