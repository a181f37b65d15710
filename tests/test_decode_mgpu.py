"""The Mosaic GPU decode kernel (pallas_kernels/decode_mgpu.py, its dequantizer
pallas_kernels/dequant.py) against the float32 oracle.

Tiers: `math` (on CPU: its byte-permute dequantizer on NumPy uint32 words, exact; its XLA-side
wrapper with the kernel body replaced by a plain-jnp model of it, `_kernel_model`, on the GPU
tier's cases), `lowering` (Mosaic GPU lowering for an abstract H100, on CPU), `gpu` (compiled
kernel on a Hopper GPU, skipped elsewhere). Mosaic GPU's interpret mode does not run
`inline_mgpu` code, so the kernel body runs only in the `gpu` tier; the dequantizer it inlines
is the code the `math` tier runs (`expand` is written once against an ops object: NumPy here,
MLIR in the kernel)."""

from __future__ import annotations

import functools
import importlib
import math
import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import use_abstract_mesh

from pallas_kernels import decode_attention_gpu, dispatch
from kernel_paths import pallas_attention
from pallas_kernels import decode_mgpu as M
from pallas_kernels import dequant as D
from test_encode_kernel import H100
from tqjax import cache as C
from tqjax import ops as tq_ops
from tqjax import partials as tq_partials
from tqjax import packing
from tqjax.codebook import lloyd_max

pytestmark = pytest.mark.math

IS_HOPPER = dispatch._is_hopper()
DEFAULT = M.DecodeTuning()


def _pairs_to_float(pairs, dtype):
  """16 uint32 words of 16-bit pairs of `dtype` → [..., 32] float32, low half first."""
  out = []
  for p in pairs:
    for half in (p & np.uint32(0xFFFF), p >> np.uint32(16)):
      out.append(half.astype(np.uint16).view(dtype).astype(np.float32))
  return np.stack(out, axis=-1)


def _expand_rows(words, bits, tables, dtype):
  """Packed rows words [n, b·W] through `expand` for every column → [n, D] float32 in kernel
  order (column 128u + 8k + 2c + e from column 4u + c's pair k, half e; at D = 64 column 8k +
  2c + e from pair k of half c // 2 of column c % 2, through `_half_words`)."""
  w = words.shape[1] // bits
  got = np.zeros((words.shape[0], w * packing.WORD_BITS), np.float32)
  if w < 4:
    for c in range(4):
      h, col = c // 2, c % 2
      half = D.half_words(lambda a, b: words[:, (a * h + b) * w + col], bits, 16 * h, D.NumpyOps)
      vals = _pairs_to_float(D.expand(half, bits, tables, D.NumpyOps, 16), dtype)
      for k in range(8):
        for e in range(2):
          got[:, 8 * k + 2 * c + e] = vals[:, 2 * k + e]
    return got
  for col in range(w):
    u, c = divmod(col, 4)
    vals = _pairs_to_float(D.expand([words[:, r * w + col] for r in range(bits)], bits, tables, D.NumpyOps), dtype)
    for k in range(16):
      for e in range(2):
        got[:, 128 * u + 8 * k + 2 * c + e] = vals[:, 2 * k + e]
  return got


@pytest.mark.math
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("bits", D.BITS)
@pytest.mark.parametrize("d", D.HEAD_DIMS)
def test_expand_is_the_codebook_of_unpack(d, bits, dtype):
  """Every code of every slot and column, through the kernel's byte permutes, equals the 16-bit
  centroid of `packing.unpack`'s code at the coordinate `kernel_perm` names."""
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, size=(300, d))
  codes[:16] = np.arange(16)[:, None] % 2**bits  # every code in every coordinate
  words = np.asarray(packing.pack(jnp.asarray(codes), bits))
  tables = D.byte_tables(bits, dtype, d)
  cb = np.asarray(lloyd_max(bits, d)[0], np.float32).astype(dtype).astype(np.float32)
  perm = D.kernel_perm(bits, d)
  got = _expand_rows(words, bits, tables, dtype)
  np.testing.assert_array_equal(got, cb[codes[:, perm]])
  assert sorted(perm) == list(range(d))


@pytest.mark.math
@pytest.mark.parametrize("d", D.HEAD_DIMS)
def test_expand_of_qjl_signs_is_plus_minus_one(d):
  """The QJL sign words through `expand` with `SIGN_TABLE` are `qjl.signs` (±1, exact in float16)
  at the coordinates `kernel_perm(1, d)` names."""
  from tqjax import qjl as Q

  sk = Q.make_qjl(d)
  r = np.random.default_rng(1).standard_normal((200, d))
  words = np.asarray(Q.qjl_encode(sk, jnp.asarray(r, jnp.float32))[0])
  want = np.asarray(Q.signs(sk, jnp.asarray(words)))[:, D.kernel_perm(1, d)]
  got = _expand_rows(words, 1, D.SIGN_TABLE, np.float16)
  np.testing.assert_array_equal(got, want)
  assert set(np.unique(got)) == {-1.0, 1.0}


@pytest.mark.math
@pytest.mark.parametrize("d", D.HEAD_DIMS)
def test_q_fragments_are_the_mma_b_fragments(d):
  """`q_fragments`: lane 4g + c, word 2j + e holds (q[g, 16j + 8e + 2c], q[g, 16j + 8e + 2c + 1])
  (low half first) at [part, word // 4, lane, word % 4], element by element."""
  r = np.random.default_rng(1)
  q = r.standard_normal((3, 16, d)).astype(np.float16)
  got = np.asarray(M.q_fragments(jnp.asarray(q)))
  bits = q.view(np.uint16).astype(np.uint32)
  for n in range(3):
    for part in range(2):
      for g in range(8):
        for c in range(4):
          for j in range(d // 16):
            for e in range(2):
              col = 16 * j + 8 * e + 2 * c
              want = bits[n, 8 * part + g, col] | (bits[n, 8 * part + g, col + 1] << 16)
              word = 2 * j + e
              assert got[n, part, word // 4, 4 * g + c, word % 4] == want


@pytest.mark.math
def test_float16_rows():
  """q rows → float16 at a power-of-two scale: max |q / scale| in [256, 512) for every finite
  row whose max is at least 2^-118 (tiny, huge), relative error ≤ 2^-11 of the row max; rows
  below 2^-118 (zero, 2^-119) → scale 1; NaN and inf kept."""
  r = np.random.default_rng(0)
  q = r.standard_normal((7, 128)) * np.asarray([1e-30, 1e-3, 1.0, 3e4, 1e30, 1.0, 1.0])[:, None]
  q[0, 5] = 2.0**-118 * 1.01  # the smallest scaled max, with everything else below it
  q[0, np.arange(128) != 5] = np.clip(q[0, np.arange(128) != 5], -2.0**-118, 2.0**-118)
  q[5] = 0.0
  q[6] = np.clip(q[6], -1, 1) * 2.0**-119
  q16, scale = (np.asarray(x, np.float64) for x in M.float16_rows(jnp.asarray(q, jnp.float32)))
  assert np.all(np.log2(scale) == np.round(np.log2(scale)))
  amax = np.abs(q16).max(axis=1)
  assert np.all((amax[:5] >= 256) & (amax[:5] < 512)) and np.all(scale[5:] == 1) and np.all(q16[5:] == 0)
  q32 = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
  err = np.abs(q16 * scale[:, None] - q32).max(axis=1)[:5]
  assert np.all(err <= 2.0**-11 * np.abs(q32[:5]).max(axis=1))
  q[2, 7], q[3, 9] = np.nan, -np.inf
  q16, scale = (np.asarray(x) for x in M.float16_rows(jnp.asarray(q, jnp.float32)))
  assert np.isnan(q16[2, 7]) and q16[3, 9] == -np.inf and scale[2] == scale[3] == 1


@pytest.mark.math
def test_numpy_prmt_model():
  """The NumPy model of PTX prmt.b32 (the GPU tier checks the real one): byte select, sign mode."""
  a, b = np.uint32(0x83828180), np.uint32(0x07060504)
  for sel, want in ((0x4140, 0x04810480), (0x3210, 0x83828180), (0x7654, 0x07060504),
                    (0x0008, 0x808080FF), (0x000C, 0x80808000), (0xFFFF3210, 0x83828180)):
    assert D.NumpyOps.prmt(a, b, np.uint32(sel)) == np.uint32(want), hex(sel)


@pytest.mark.math
def test_table_values_are_the_codebooks():
  """`_table_values` (the CPU kernel model's reading of the par byte tables) gives back each
  codebook in its 16-bit dtype, so the model checks what `par_tables` put in par."""
  for d in D.HEAD_DIMS:
    for kb in D.BITS:
      for vb in D.BITS:
        tables, signs = M.par_tables(kb, vb, d)
        for bits, dtype, words in ((kb, np.float16, tables[:4]), (vb, ml_dtypes.bfloat16, tables[4:])):
          want = np.asarray(lloyd_max(bits, d)[0], np.float32).astype(dtype).astype(np.float32)
          np.testing.assert_array_equal(_table_values(words, bits, dtype), want)
        np.testing.assert_array_equal(_table_values(signs[:4], 1, np.float16), [-1.0, 1.0])
        assert not signs[4:].any()


@pytest.mark.math
def test_tokens_per_row():
  """Rows of as many of 8, 4, 2 tokens as divide the capacity (at least the 16-byte minimum of
  1- and 3-bit codes at D = 64); a TMA row stays within 256 words; a capacity that is not a
  multiple of the minimum is refused."""
  assert M._tokens_per_row(3, 128, 4133) == 1 and M._tokens_per_row(3, 128, 4096) == 8
  assert M._tokens_per_row(3, 128, 700) == 4 and M._tokens_per_row(2, 128, 4134) == 2
  assert M._min_tokens_per_row(3, 64) == 2 and M._tokens_per_row(3, 64, 4134) == 2
  assert M._min_tokens_per_row(4, 64) == 1 and M._tokens_per_row(1, 64, 1000) == 8
  for d in D.HEAD_DIMS:
    for bits in D.BITS:
      f = M._tokens_per_row(bits, d, 8 * 1024)
      assert f == 8 and DEFAULT.block_tokens(d) % f == 0 and f * bits * d // 32 <= 256
  with pytest.raises(ValueError, match="not a multiple of 2"):
    M._tokens_per_row(3, 64, 4133)


@pytest.mark.math
def test_supported_and_errors():
  cfg = C.CacheConfig(head_dim=128, k_bits=3, v_bits=3)
  assert M.supported(C.init_cache(cfg, 1, 1, 8)) == (True, "")
  for kb in (2, 5):  # prod keys: 1 or 4 codebook bits + the QJL row
    assert M.supported(C.init_cache(C.CacheConfig(head_dim=128, k_bits=kb, v_bits=3, k_variant="prod"), 1, 1, 8))[0]
  for d in (64, 256):
    assert M.supported(C.init_cache(C.CacheConfig(head_dim=d, k_bits=4, v_bits=2, k_variant="prod"), 1, 1, 8))[0]
  for kw, word in ((dict(k_variant="prod", k_bits=1), "codebook bits"), (dict(head_dim=96), "head_dim"),
                   (dict(v_bits=5), "bits"), (dict(outlier_channels=32), "outlier")):
    ok, why = M.supported(C.init_cache(C.CacheConfig(**{**dict(head_dim=128, k_bits=3, v_bits=3), **kw}), 1, 1, 8))
    assert not ok and word in why
  cache = C.init_cache(cfg, 1, 1, 8)
  pq = tq_partials.prepare_query(cache, jnp.zeros((1, 1, 9, 1, 128), jnp.float32), 1.0)
  lo, hi = tq_partials.query_ranges(cache, 1, None)
  with pytest.raises(ValueError, match="query rows"):
    M.decode_partial(cache, pq, lo, hi)


LOWERING_CASES = [  # k bits, v bits, norm dtype, G, T, S, soft cap, key variant, head_dim
    (3, 3, "float16", 4, 1, 32768, None, "mse", 128),
    (4, 4, "float32", 8, 1, 1000, 30.0, "mse", 128),
    (2, 1, "bfloat16", 2, 2, 37, None, "mse", 128),
    (1, 2, "float16", 1, 1, 4133, 20.0, "mse", 128),
    (3, 3, "float16", 4, 1, 32768, None, "prod", 128),
    (5, 2, "float32", 8, 1, 100, 30.0, "prod", 128),
    (3, 3, "float16", 4, 1, 16384, None, "mse", 256),
    (4, 4, "float32", 8, 1, 1000, 30.0, "mse", 256),
    (2, 1, "bfloat16", 2, 2, 37, None, "mse", 256),
    (4, 3, "float16", 4, 1, 16384, None, "prod", 256),
    (3, 3, "float16", 4, 1, 32768, None, "mse", 64),
    (1, 4, "float32", 8, 1, 1001, 30.0, "mse", 64),
    (2, 1, "bfloat16", 2, 2, 37, None, "mse", 64),
    (3, 3, "float16", 4, 1, 4133, None, "prod", 64),
]


@pytest.mark.lowering
@pytest.mark.parametrize("case", LOWERING_CASES,
                         ids=lambda c: f"d{c[8]}-k{c[0]}{c[7]}v{c[1]}-{c[2]}-g{c[3]}t{c[4]}-s{c[5]}")
def test_lowers_for_h100(case):
  kb, vb, nd, g, t, s, cap, var, d = case
  cfg = C.CacheConfig(head_dim=d, k_bits=kb, v_bits=vb, norm_dtype=nd, k_variant=var)
  cache = jax.eval_shape(lambda: C.init_cache(cfg, 2, 3, s))
  pq = jax.eval_shape(lambda c: tq_partials.prepare_query(c, jnp.zeros((2, 3, g, t, d), jnp.float32), 0.1), cache)
  ranges = jax.ShapeDtypeStruct((2, t), jnp.int32)
  with use_abstract_mesh(H100):
    for tuning in (DEFAULT, M.DecodeTuning(stages=1), M.DecodeTuning(stages=3)):  # the default, one, more
      jax.jit(functools.partial(M.decode_partial, soft_cap=cap, tuning=tuning)).trace(cache, pq, ranges, ranges).lower(
          lowering_platforms=("cuda",))


@pytest.mark.lowering
@pytest.mark.parametrize("tuning", [
    M.DecodeTuning(max_slack=None, edge_masks_only=False), M.DecodeTuning(max_slack=0.0),
    M.DecodeTuning(max_slack=4.0, edge_masks_only=False), M.DecodeTuning(tiles=1, key_chains=1, merge_unroll=2),
    M.DecodeTuning(num_splits=3)], ids=repr)
def test_lowers_with_tuning_alternatives(tuning):
  """The A/B alternatives (the exact max, a zero and a positive slack; masks in every block or only
  at the edges; other tiles, chains, unroll and split counts) lower for an abstract H100, on prod
  keys (both dots, all the dequantizer's shifts) at D = 128."""
  kb, vb, nd, g, t, s, cap, var, d = LOWERING_CASES[4]
  cfg = C.CacheConfig(head_dim=d, k_bits=kb, v_bits=vb, norm_dtype=nd, k_variant=var)
  cache = jax.eval_shape(lambda: C.init_cache(cfg, 2, 3, s))
  pq = jax.eval_shape(lambda c: tq_partials.prepare_query(c, jnp.zeros((2, 3, g, t, d), jnp.float32), 0.1), cache)
  ranges = jax.ShapeDtypeStruct((2, t), jnp.int32)
  with use_abstract_mesh(H100):
    jax.jit(functools.partial(M.decode_partial, tuning=tuning)).trace(cache, pq, ranges, ranges).lower(
        lowering_platforms=("cuda",))


@pytest.mark.math
@pytest.mark.parametrize("field,value", [
    ("stages", 0), ("stages", 2.0), ("tiles", 0), ("num_splits", -1), ("merge_unroll", 0), ("key_chains", True),
    ("edge_masks_only", 1), ("max_slack", -1.0), ("max_slack", float("nan")), ("max_slack", float("inf"))])
def test_tuning_refuses_bad_values(field, value):
  """A bad tuning value is refused when the tuning is made, naming the field and the value."""
  with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
    M.DecodeTuning(**{field: value})


@pytest.mark.math
def test_tuning_is_a_static_value():
  """Equal tunings are equal and hash alike (one jit cache entry); `tiles` None takes the per-head_dim
  default; a tuning that is not a DecodeTuning is refused by `decode_partial`."""
  assert M.DecodeTuning(stages=3) == M.DecodeTuning(stages=3) and hash(M.DecodeTuning()) == hash(DEFAULT)
  assert [DEFAULT.block_tokens(d) for d in D.HEAD_DIMS] == [64 * M.DEFAULT_TILES[d] for d in D.HEAD_DIMS]
  assert M.DecodeTuning(tiles=3).block_tokens(256) == 192
  cache = C.init_cache(C.CacheConfig(head_dim=128, k_bits=3, v_bits=3), 1, 1, 8)
  pq = tq_partials.prepare_query(cache, jnp.zeros((1, 1, 1, 1, 128), jnp.float32), 1.0)
  lo, hi = tq_partials.query_ranges(cache, 1, None)
  with pytest.raises(ValueError, match="must be a DecodeTuning"):
    M.decode_partial(cache, pq, lo, hi, tuning=("stages", 2))


# The key dot runs in float16: centroids and q (at a power-of-two scale per row) rounded to 2^-11
# relative, so a logit moves by ≲ 2^-10·Σ|q_j k_j| (≈ 1e-3·|logit| scale, and p·l with it). The
# value dot runs in bfloat16: centroids (the same for every coordinate of a code) and p·‖v‖ each
# ≤ 2^-9 relative, so o moves by ≲ 2^-8 ≈ 4e-3. Bound: 1e-2.
TOL = 1e-2

GPU_CASES = [  # config, B, K, G, T, S, lengths, soft cap, sliding window
    (dict(k_bits=3, v_bits=3), 2, 2, 4, 1, 4133, [4133, 1000], None, None),
    (dict(k_bits=4, v_bits=4), 2, 2, 4, 1, 4096, [4096, 1], None, None),
    (dict(k_bits=2, v_bits=3, norm_dtype="float32"), 2, 2, 8, 1, 777, [777, 0], 30.0, None),
    (dict(k_bits=1, v_bits=4, norm_dtype="bfloat16"), 1, 3, 1, 1, 300, [299], None, 100),
    (dict(k_bits=3, v_bits=2), 2, 1, 4, 2, 50, [50, 7], None, None),
    (dict(k_bits=4, v_bits=1, center_keys=False), 1, 2, 2, 1, 1000, [1000], 20.0, None),
    (dict(k_bits=3, v_bits=3, k_variant="prod"), 2, 2, 4, 1, 3001, [3001, 1], None, None),
    (dict(k_bits=5, v_bits=2, k_variant="prod", norm_dtype="float32"), 1, 2, 8, 1, 700, [650], 30.0, None),
    (dict(k_bits=2, v_bits=4, k_variant="prod"), 2, 1, 2, 2, 40, [40, 3], None, 10),
    (dict(k_bits=3, v_bits=3, head_dim=256), 2, 2, 4, 1, 2100, [2100, 1000], None, None),
    (dict(k_bits=4, v_bits=2, head_dim=256, norm_dtype="float32"), 1, 2, 8, 1, 700, [650], 30.0, 100),
    (dict(k_bits=4, v_bits=3, head_dim=256, k_variant="prod"), 2, 2, 4, 1, 1500, [1500, 1], None, None),
    (dict(k_bits=2, v_bits=4, head_dim=256, k_variant="prod"), 2, 1, 2, 2, 40, [40, 0], 20.0, None),
    (dict(k_bits=3, v_bits=3, head_dim=64), 2, 2, 4, 1, 4133, [4133, 1000], None, None),
    (dict(k_bits=1, v_bits=4, head_dim=64, norm_dtype="float32"), 1, 2, 8, 1, 1001, [1001], 30.0, 100),
    (dict(k_bits=4, v_bits=3, head_dim=64, k_variant="prod"), 2, 2, 4, 1, 3001, [3001, 1], None, None),
    (dict(k_bits=3, v_bits=2, head_dim=64, k_variant="prod"), 2, 1, 2, 2, 41, [41, 0], 20.0, None),
]


def _case_id(c):
  return (f"d{c[0].get('head_dim', 128)}-k{c[0]['k_bits']}{c[0].get('k_variant', 'mse')}v{c[0]['v_bits']}"
          f"-g{c[3]}t{c[4]}-s{c[5]}")


def _check_case(case, decode_partial, ramp=0.0):
  """decode_partial (the contract of `decode_partial_reference`) on a prefilled random cache: no
  NaN, the same empty rows, l and o within TOL of the float32 reference, empty rows exactly 0.
  ramp: keys scaled by 1 .. 1 + ramp along the sequence (logits that keep growing)."""
  cfgkw, b, kh, g, t, s, lengths, cap, win = case
  d = cfgkw.get("head_dim", 128)
  r = np.random.default_rng(s)
  grow = 1.0 + ramp * np.linspace(0.0, 1.0, s)[:, None]
  cache = tq_ops.prefill(C.init_cache(C.CacheConfig(**{"head_dim": d, **cfgkw}), b, kh, s),
                    jnp.asarray((r.standard_normal((b, kh, s, d)) + 0.4) * grow, jnp.float32),
                    jnp.asarray(r.standard_normal((b, kh, s, d)), jnp.float32), jnp.asarray(lengths, jnp.int32))
  pq = tq_partials.prepare_query(cache, jnp.asarray(r.standard_normal((b, kh, g, t, d)) * 2, jnp.float32), 1 / math.sqrt(d))
  lo, hi = tq_partials.query_ranges(cache, t, win)
  (acc, m, l) = decode_partial(cache, pq, lo, hi, cap)
  (acc_r, m_r, l_r) = decode_attention_gpu.decode_partial_reference(cache, pq, lo, hi, cap)
  acc, m, l, acc_r, m_r, l_r = (np.asarray(x, np.float64) for x in (acc[0], m, l, acc_r[0], m_r, l_r))
  assert not (np.isnan(acc).any() or np.isnan(m).any() or np.isnan(l).any())
  np.testing.assert_array_equal(np.isneginf(m), np.isneginf(m_r))
  fin = np.isfinite(m_r)
  scale = np.where(fin, np.exp(np.where(fin, m, 0.0) - np.where(fin, m_r, 0.0)), 0.0)
  np.testing.assert_allclose(l * scale, l_r, rtol=TOL, atol=0)
  o = acc / np.where(l > 0, l, 1.0)[..., None]
  o_r = acc_r / np.where(l_r > 0, l_r, 1.0)[..., None]
  assert np.linalg.norm(o - o_r) < TOL * np.linalg.norm(o_r)
  assert np.all(acc[l_r == 0] == 0)


def _prepared_rows(q, bits, coef=1.0):
  """The reference of `M._prepare_query` for one part: q [N, R, D] float32 (natural order) →
  (float16 rows in kernel order padded to 8, as float32 [N, 8, D], scales [N, 8])."""
  q = q[..., D.kernel_perm(bits, q.shape[-1])] * jnp.float32(coef)
  q = jnp.pad(q, [(0, 0), (0, M.MAX_ROWS - q.shape[1]), (0, 0)])
  q16, scale = M.float16_rows(q)
  return q16.astype(jnp.float32), scale


def _table_values(words, bits, dtype):
  """The 2^bits centroids (float32) that a byte table holds: words [4] int32 in `D.table_words`'
  layout (low bytes of entries 0-3, 4-7, high bytes of 0-3, 4-7) of 16-bit `dtype` values; for 4
  bits its 8 entries are the non-negative magnitudes of a symmetric codebook."""
  b = np.asarray(words, np.int32).view(np.uint8).reshape(4, 4)  # [word, byte] (little-endian)
  u16 = np.concatenate([b[0], b[1]]).astype(np.uint16) | (np.concatenate([b[2], b[3]]).astype(np.uint16) << 8)
  values = u16.view(dtype).astype(np.float32)
  if bits == 4:
    values = np.concatenate([-values[::-1], values])
  return values[:2**bits]


def _kernel_model(q, par, kc, kn, vc, vn, ks=None, kr=None, sq=None, *, k_bits, v_bits, qjl_coef, soft_cap,
                  num_splits, tuning):
  """`M._decode_call` in plain jnp (no splits to merge): the same inputs (layouts, kernel coordinate
  order, float16 key / bfloat16 value operands, `par` rows) and outputs, without the GPU."""
  del num_splits
  seq, d = kc.shape[1], q.shape[2]
  # the wrapper's padding meets the kernel's preconditions:
  assert seq >= tuning.block_tokens(d) and kn.shape[1] % 8 == 0 and vn.shape[1] % 8 == 0  # a block, 16-byte rows
  for x, bits in ((kc, k_bits), (vc, v_bits)) + (((ks, 1),) if ks is not None else ()):
    assert x.shape[1] == seq and seq % M._min_tokens_per_row(bits, d) == 0  # whole TMA rows of tokens
  row = lambda name: par[:, M._PAR.index(name)]  # [N, 8]
  for name in ("tables", "signs"):  # the same byte tables for every head: the kernel reads them per head
    assert (row(name) == row(name)[:1]).all()
  assert not (row("qscale").any() or row("sqscale").any())  # the kernel writes the scales
  rows = q.shape[1]
  q, qscale = _prepared_rows(q, k_bits)
  offset, lo, hi = lax.bitcast_convert_type(row("offset"), jnp.float32), row("lo"), row("hi")
  # the range every real row attends (the kernel masks only blocks reaching outside it):
  np.testing.assert_array_equal(row("span")[:, :2], np.stack([lo[:, :rows].max(1), hi[:, :rows].min(1)], 1))

  def deq(words, bits, dtype, name, first):  # [N, S, b·W] → [N, S, D] kernel order, centroids from par
    table = jnp.asarray(_table_values(np.asarray(row(name)[0, first:first + 4]), bits, dtype))
    return table[packing.unpack(words, bits, d)][..., D.kernel_perm(bits, d)]

  dot = lambda x, y: jnp.einsum("nsd,nrd->nsr", x, y.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  s = dot(deq(kc, k_bits, np.float16, "tables", 0), q) * qscale[:, None]
  if ks is not None:
    signs = deq(ks, 1, np.float16, "signs", 0)
    sq, sqscale = _prepared_rows(sq, 1, qjl_coef)
    s = s + dot(signs, sq) * sqscale[:, None] * kr[:, :seq, None].astype(jnp.float32)
  s = s * kn[:, :seq, None].astype(jnp.float32) + offset[:, None]
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  slots = jnp.arange(seq)[None, :, None]
  ok = (slots >= lo[:, None]) & (slots < hi[:, None])
  s = jnp.where(ok, s, -jnp.inf)
  m = jnp.max(s, axis=1)
  p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)[:, None])
  pv = jnp.where(ok, p * vn[:, :seq, None].astype(jnp.float32), 0.0).astype(jnp.bfloat16).astype(jnp.float32)
  acc = jnp.einsum("nsd,nsr->ndr", deq(vc, v_bits, ml_dtypes.bfloat16, "tables", 4), pv,
                   precision=lax.Precision.HIGHEST)
  l = jnp.sum(p, axis=1)
  return acc, jnp.stack([m, l, jnp.zeros_like(m), jnp.zeros_like(m)], axis=1)


@pytest.mark.math
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_wrapper_with_kernel_model_matches_reference(case, monkeypatch):
  """`decode_partial`'s XLA side (query rows, S·q, `par`, padding of tiny caches and norms,
  un-permutation) on CPU, with the kernel body (query preparation included) replaced by
  `_kernel_model`: the GPU cases, against the float32 reference."""
  monkeypatch.setattr(M, "_decode_call", _kernel_model)
  _check_case(case, M.decode_partial.__wrapped__)  # not jitted: no trace cached with the real kernel


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
def test_gpu_compiled_matches_reference(case):
  _check_case(case, M.decode_partial)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("d", D.HEAD_DIMS)
def test_gpu_prepare_query_is_float16_rows_and_q_fragments(d):
  """The kernel's query preparation (`_prepare_query`: 6 rows of a 3-bit query and of a 1-bit
  S·q scaled by a coefficient) against its references: the fragments
  `q_fragments(_float16_rows(...))` value for value (NaN, ±inf, zero and tiny rows included), the
  scales in their `par` rows, and the other `par` rows untouched."""
  r = np.random.default_rng(2)
  mags = np.asarray([1e-30, 1e-3, 1.0, 3e4, 1e30, 1.0])
  q = r.standard_normal((3, 2, 6, d)) * np.stack([mags, mags[::-1]])[:, :, None]
  q[0, 0, 5], q[1, 1, 3] = 0.0, np.clip(q[1, 1, 3], -1, 1) * 2.0**-119
  q[1, 0, 2, 7], q[2, 0, 3, 9], q[2, 1, 4, 0] = np.nan, -np.inf, np.inf
  q = jnp.asarray(q, jnp.float32)
  par = jnp.asarray(r.integers(-2**31, 2**31, (3, 8, 8)), jnp.int32)
  par = par.at[:, [M._PAR.index("qscale"), M._PAR.index("sqscale")]].set(0)
  parts = ((3, 1.0), (1, 0.37))

  def kernel(q_gmem, sq_gmem, par_gmem, qf_out, par_out, q_smem, sq_smem, qf_smem, par_smem, bar):
    n = lax.axis_index("n")
    for src, dst in ((q_gmem, q_smem), (sq_gmem, sq_smem), (par_gmem, par_smem)):
      plgpu.copy_gmem_to_smem(src.at[n], dst, bar.at[0])
    plgpu.barrier_wait(bar.at[0])
    M._prepare_query(parts)((q_smem, sq_smem), qf_smem, par_smem)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qf_smem, qf_out.at[n])
    plgpu.copy_smem_to_gmem(par_smem, par_out.at[n])
    plgpu.wait_smem_to_gmem(0)

  run = plgpu.kernel(kernel, out_type=(jax.ShapeDtypeStruct((3, 2, d // 32, 32, 4), jnp.uint32),
                                       jax.ShapeDtypeStruct(par.shape, jnp.int32)),
                     grid=(3,), grid_names=("n",),
                     compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
                     scratch_types=[plgpu.SMEM((6, d), jnp.float32), plgpu.SMEM((6, d), jnp.float32),
                                    plgpu.SMEM((2, d // 32, 32, 4), jnp.uint32), plgpu.SMEM((8, 8), jnp.int32),
                                    plgpu.Barrier(num_barriers=1, num_arrivals=3)])
  qf_got, par_got = (np.asarray(x) for x in jax.jit(run)(q[:, 0], q[:, 1], par))
  prepared = [_prepared_rows(q[:, p], bits, coef) for p, (bits, coef) in enumerate(parts)]
  want_qf = M.q_fragments(jnp.concatenate([q16 for q16, _ in prepared], axis=1).astype(jnp.float16))
  as_f16 = lambda x: np.asarray(x).view(np.float16)
  np.testing.assert_array_equal(as_f16(qf_got), as_f16(want_qf))
  want_par = np.asarray(par).copy()
  for (_, scale), name in zip(prepared, ("qscale", "sqscale")):
    want_par[:, M._PAR.index(name)] = np.asarray(scale).view(np.int32)
  np.testing.assert_array_equal(par_got, want_par)


RAMPS = [(GPU_CASES[0], 3.0), (GPU_CASES[6], 3.0), (GPU_CASES[9], 3.0), (GPU_CASES[10], 3.0)]


@pytest.mark.math
@pytest.mark.parametrize("case,ramp", RAMPS, ids=lambda x: f"ramp{x}" if isinstance(x, float) else _case_id(x))
def test_wrapper_with_kernel_model_growing_logits(case, ramp, monkeypatch):
  """The kernel model on logits that keep growing along the sequence (the reference side of
  `test_gpu_running_max_moves`)."""
  monkeypatch.setattr(M, "_decode_call", _kernel_model)
  _check_case(case, M.decode_partial.__wrapped__, ramp)


def _lazy_softmax_model(s, v, slack, d, per_split):
  """NumPy model (float64) of the kernel's online softmax with `_running_max`'s rule, in its token
  order: s [S, R] logits of one kv head's rows (−inf outside a row's range; NaN allowed), v [S]
  (one value coordinate); per split of `per_split` blocks of `DecodeTuning.block_tokens(d)` tokens, each
  of the 4 warps runs over its `DecodeTuning.tiles_for(d)` 16-token tiles of every block (tokens 64t + 16w .. + 15) with
  a running max that moves, to the exact max, only when a logit of the warp exceeds it by more
  than `slack` (None: every block); the partials are merged by their own maxima.
  → (o [R], blocks where a warp's max moved, blocks where it held, the largest p = exp(s − m))."""
  seq, bk = s.shape[0], DEFAULT.block_tokens(d)
  tile = np.arange(16)
  parts, moves, holds, p_max = [], 0, 0, 0.0
  for first in range(0, seq, per_split * bk):
    for w in range(4):
      m, l, acc = np.full(s.shape[1], -np.inf), np.zeros(s.shape[1]), np.zeros(s.shape[1])
      for b0 in range(first, min(first + per_split * bk, seq), bk):
        idx = np.concatenate([b0 + 64 * t + 16 * w + tile for t in range(DEFAULT.tiles_for(d))])
        idx = idx[idx < seq]
        if not idx.size:
          continue
        x = s[idx]
        if slack is None or np.any(~(x.max(0) <= m + slack)):  # NaN counts as exceeding
          new, moves = np.maximum(m, x.max(0)), moves + 1
        else:
          new, holds = m, holds + 1
        live = ~np.isneginf(new)
        corr = np.where(live, np.exp(np.where(live, m - np.where(live, new, 0.0), 0.0)), 1.0)
        p = np.where(live, np.exp(x - np.where(live, new, 0.0)), 0.0)
        p_max = max(p_max, np.nanmax(p, initial=0.0))
        l, acc, m = l * corr + p.sum(0), acc * corr + (p * v[idx, None]).sum(0), new
      parts.append((m, l, acc))
  m, l, acc = (np.stack(x) for x in zip(*parts))
  top = m.max(0)
  weight = np.where(np.isneginf(m), 0.0, np.exp(m - np.where(np.isneginf(top), 0.0, top)))
  return (acc * weight).sum(0) / (l * weight).sum(0), moves, holds, p_max


@pytest.mark.math
@pytest.mark.parametrize("case,ramp", RAMPS + [(GPU_CASES[0], 0.0)],
                         ids=lambda x: f"ramp{x}" if isinstance(x, float) else _case_id(x))
def test_lazy_softmax_model(case, ramp):
  """The lazy running max (`DecodeTuning.max_slack`) on the logits of `test_gpu_running_max_moves` (before
  quantization, real rows only), in a NumPy model of the kernel's token order and splits: the
  same softmax as the exact max (float64), p never above e^slack, the max held in more blocks
  with a slack than without, and with the ramp both branches taken in many blocks; an exact max
  moves in every block; a NaN logit gives NaN."""
  cfgkw, b, kh, g, t, seq, lengths, cap, win = case
  d = cfgkw.get("head_dim", 128)
  r = np.random.default_rng(seq)  # `_check_case`'s data
  k = (r.standard_normal((b, kh, seq, d)) + 0.4) * (1.0 + ramp * np.linspace(0.0, 1.0, seq)[:, None])
  v = r.standard_normal((b, kh, seq, d))[..., 0]
  q = r.standard_normal((b, kh, g, t, d)).reshape(b, kh, g * t, d) * 2 / math.sqrt(d)
  lo, hi = (np.asarray(x) for x in tq_partials.query_ranges(SimpleNamespace(lengths=jnp.asarray(lengths), capacity=seq), t, win))
  nblocks = -(-seq // DEFAULT.block_tokens(d))
  per_split = -(-nblocks // M.default_num_splits(b * kh, seq, DEFAULT.block_tokens(d)))
  counts = {}
  for bi in range(b):
    slots = np.arange(seq)[:, None]
    ok = np.tile((slots >= lo[bi]) & (slots < hi[bi]), (1, g))  # [S, G·T]: row g·T + t attends like t
    for h in range(kh):
      s = np.einsum("sd,rd->sr", k[bi, h], q[bi, h])
      if cap is not None:
        s = cap * np.tanh(s / cap)
      s = np.where(ok, s, -np.inf)
      if not ok.any():
        continue
      with np.errstate(invalid="ignore"):
        e = np.exp(s - s.max(0))
        exact = (e * v[bi, h][:, None]).sum(0) / e.sum(0)
      for slack in (None, 0.0, DEFAULT.max_slack):
        o, moves, holds, p_max = _lazy_softmax_model(s, v[bi, h], slack, d, per_split)
        np.testing.assert_allclose(o, exact, rtol=1e-10, atol=1e-12, equal_nan=True)
        assert p_max <= np.exp(slack or 0.0) * (1 + 1e-12)
        counts[slack] = np.add(counts.get(slack, 0), (moves, holds))
      s[s.shape[0] // 2, 0] = np.nan
      assert np.isnan(_lazy_softmax_model(s, v[bi, h], DEFAULT.max_slack, d, per_split)[0][0])
  assert counts[None][1] == 0 and counts[None][0] > 0
  assert counts[DEFAULT.max_slack][1] >= counts[0.0][1] > 0, counts  # a slack holds the max in more blocks
  if ramp:  # 13-181 moves and 75-382 holds per case
    assert min(*counts[DEFAULT.max_slack], *counts[0.0]) >= 10, counts


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("case,ramp", RAMPS, ids=lambda x: f"ramp{x}" if isinstance(x, float) else _case_id(x))
def test_gpu_running_max_moves(case, ramp):
  """Keys growing 4× along the sequence (logits of growing magnitude, of either sign by row): the
  running max of a warp moves by less and by more than `DecodeTuning.max_slack` in many blocks, so `_running_max`
  takes both of its branches, with and without a soft cap; within TOL of the reference."""
  _check_case(case, M.decode_partial, ramp)


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("stages", [1, 3, 6])
def test_gpu_pipeline_depths(stages):
  """One stage (each slot refilled right after its block), one more than the default and more
  stages than a split has blocks: the same results (an mse and a prod case at D = 128, a D = 256
  case, and a D = 64 prod case whose streams have 64- and 128-row stages)."""
  for case in (GPU_CASES[0], GPU_CASES[6], GPU_CASES[9], GPU_CASES[15]):
    _check_case(case, functools.partial(M.decode_partial, tuning=M.DecodeTuning(stages=stages)))


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("d", D.HEAD_DIMS)
def test_gpu_default_attention_is_the_mosaic_kernel(d):
  """dispatch picks this kernel on Hopper for K3/V3 and its attention matches the XLA path."""
  r = np.random.default_rng(0)
  cache = tq_ops.prefill(C.init_cache(C.CacheConfig(head_dim=d, k_bits=3, v_bits=3), 2, 2, 640),
                    jnp.asarray(r.standard_normal((2, 2, 640, d)), jnp.float32),
                    jnp.asarray(r.standard_normal((2, 2, 640, d)), jnp.float32), jnp.asarray([640, 333], jnp.int32))
  q = jnp.asarray(r.standard_normal((2, 8, d)), jnp.float32)
  assert dispatch._mosaic_decode(cache, 4) and not dispatch._mosaic_decode(cache, 9)
  got = np.asarray(pallas_attention(cache, q))
  want = np.asarray(tq_ops.attention(cache, q, implementation="xla"))
  assert np.linalg.norm(got - want) < TOL * np.linalg.norm(want)


@pytest.mark.math
def test_kernel_time_harness():
  """experiments/kernel_time.py: ncu's launches map to (variant, config) in the order its child runs
  them (rounds, variants, configs, reps), in µs from any unit; a variant is a `DecodeTuning`, and an
  unknown field or a bad value is refused."""
  from experiments import kernel_time as KT  # noqa: PLC0415

  values = [("us", "1.5"), ("ns", "2,500"), ("us", "3.0"), ("us", "4.0"),
            ("us", "5.0"), ("us", "6.0"), ("ms", "0.007"), ("us", "8.0")]
  head = ("  tq_decode_mgpu_mosaic_gpu_kernel (16, 64, 1)x(128, 1, 1), Context 1, Stream 14, Device 0, CC 9.0\n"
          "    Section: Command line profiler metrics\n    Metric Name   Metric Unit Metric Value\n")
  report = "==PROF== Connected\n" + "".join(
      f"{head}    gpu__time_duration.sum   {u}   {v}\n    smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"
      f"   {i / 10}\n    smsp__inst_executed.sum   inst   1,024\n\n" for i, (u, v) in enumerate(values))
  got = KT.parse(report, [{}, {"stages": 3}], ["K3/V3"], 2)
  duration = lambda i: [x[KT.DURATION] for x in got[i, "K3/V3"]]
  np.testing.assert_allclose(duration(0), [1.5, 2.5, 5.0, 6.0])
  np.testing.assert_allclose(duration(1), [3.0, 4.0, 7.0, 8.0])
  stall = [x["smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"] for x in got[1, "K3/V3"]]
  np.testing.assert_allclose(stall, [0.2, 0.3, 0.6, 0.7])
  assert {x["smsp__inst_executed.sum"] for x in got[0, "K3/V3"]} == {1024.0}
  with pytest.raises(RuntimeError, match="expected 12"):
    KT.parse(report, [{}, {}, {}], ["K3/V3"], 2)
  fn = KT.partial_fn({"stages": 3, "num_splits": 5})
  assert fn.func is M.decode_partial and fn.keywords == {"tuning": M.DecodeTuning(stages=3, num_splits=5)}
  assert KT.partial_fn({}).keywords == {"tuning": DEFAULT}
  with pytest.raises(ValueError, match="FOO"):
    KT.partial_fn({"FOO": 1})
  with pytest.raises(ValueError, match="stages=0"):
    KT.partial_fn({"stages": 0})


@pytest.mark.math
def test_kernel_time_source_and_wall(monkeypatch, tmp_path):
  """experiments/kernel_time.py: a "source" variant runs another version of decode_mgpu.py, loaded as
  a module of its own (decode_mgpu itself untouched), with its own tuning, or none for a version
  without `DecodeTuning`; `wall` times every (variant, config), interleaved (here the XLA path on
  CPU stands in for the kernel)."""
  import sys  # noqa: PLC0415

  from experiments import kernel_time as KT  # noqa: PLC0415

  source = tmp_path / "other.py"
  source.write_text(Path(M.__file__).read_text())
  fn = KT.partial_fn({"source": str(source), "stages": 5})
  other = KT.load_source(str(source))
  assert other is not M and other.__file__ == str(source) and sys.modules["pallas_kernels.decode_mgpu"] is M
  assert fn.func is other.decode_partial and fn.keywords == {"tuning": other.DecodeTuning(stages=5)}
  assert importlib.import_module("pallas_kernels.decode_mgpu") is M
  plain = tmp_path / "plain.py"
  plain.write_text("def decode_partial(cache, pq, lo, hi, soft_cap=None):\n  return None\n")
  assert KT.partial_fn({"source": str(plain)}) is KT.load_source(str(plain)).decode_partial
  with pytest.raises(ValueError, match="no DecodeTuning"):
    KT.partial_fn({"source": str(plain), "stages": 3})

  seen = []
  xla = jax.jit(lambda cache, q: tq_ops.attention(cache, q, implementation="xla"))
  monkeypatch.setattr(KT, "WALL_CALLS", 2)
  monkeypatch.setattr(KT, "WALL_DISPATCHES", 1)
  monkeypatch.setattr(KT, "attention_fn", lambda variant: seen.append(variant) or xla)
  args = SimpleNamespace(configs=["K3/V3", "K4/V4"], head_dim=64, seq=64, reps=2)
  got = KT.wall(args, [{}, {"stages": 3}])
  assert seen == [{}, {"stages": 3}] * 2
  assert sorted(got) == [(i, c) for i in (0, 1) for c in args.configs]
  assert all(len(x) == KT.ROUNDS * 2 and all(0 < t[KT.DURATION] < 1e7 for t in x) for x in got.values())


@pytest.mark.math
def test_sass_mix_finds_the_main_loop():
  """experiments/sass_mix.py: the main loop is the widest conditional backward branch (not an
  out-of-line jump back, not a spin-wait), its instructions counted by opcode and pipe."""
  from experiments import sass_mix as S  # noqa: PLC0415

  body = ["PRMT R1, R2, R3, 0x7904388 ;", "PRMT R1, R1, 0x5140, R4 ;", "LOP3.LUT R5, R5, 0xf0f0f0f, R6, 0xc8, !PT ;",
          "IMAD.SHL.U32 R7, R7, 0x4, RZ ;", "HMMA.16816.F32 R8, R8, R10, R8 ;", "MOVM.16.MT88 R9, R9 ;",
          "@P5 BRA 0x0090 ;", "FMUL R1, R1, R2 ;", "@P1 BRA 0x0020 ;"]
  lines = ["SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR17], R52 ;", "@!P1 BRA 0x0200 ;"] + body + [
      "EXIT ;", "@!P1 BRA 0x00b0 ;", "BRA 0x0010 ;"]
  sass = "\n".join(f"        /*{16 * i:04x}*/                   {x}  /* 0x0 */" for i, x in enumerate(lines))
  (lo, hi), ops, pipes = S.mix(sass)
  assert (lo, hi) == (0x20, 0xa0)
  assert ops == {"PRMT": 2, "LOP3": 1, "IMAD": 1, "HMMA": 1, "MOVM": 1, "BRA": 2, "FMUL": 1}
  assert pipes == {"alu": 3, "fma": 2, "tensor": 1, "mio": 1, "other": 2}
  log = ("MOSAIC dump\n.version 8.8\n.entry other_kernel(\n{\n}\n"
         ".version 8.8\n.target sm_90a\n.entry tq_decode_mgpu_mosaic_gpu_kernel(\n{\n ret;\n}\ntrailing")
  want = ".version 8.8\n.target sm_90a\n.entry tq_decode_mgpu_mosaic_gpu_kernel(\n{\n ret;\n}"
  assert S.ptx_module(log, "tq_decode_mgpu") == want
  with pytest.raises(ValueError, match="no PTX module"):
    S.ptx_module(log, "missing")


@pytest.mark.math
def test_bench_decode_quick_runs(tmp_path):
  """experiments/bench_decode.py --quick (XLA paths, queries cycling over the buffers) writes its
  table: every row timed, finite and positive; --headline leaves out our XLA rows."""
  import json  # noqa: PLC0415

  from experiments import bench_decode as BD  # noqa: PLC0415

  BD.main(["--quick", "--out", str(tmp_path), "--reps", "3"])
  (path,) = tmp_path.glob("bench_decode_*_quick.json")
  rows = json.loads(path.read_text())["rows"]
  assert [r["impl"] for r in rows] == ["xla bf16", "xla int8 (per-token scale)"] + [
      f"ours xla {c}" for c in BD.CONFIGS]
  assert all(np.isfinite(r["us"]) and r["us"] > 0 for r in rows)
  BD.main(["--quick", "--headline", "--out", str(tmp_path), "--reps", "3"])  # the baselines only, on CPU
  (path,) = tmp_path.glob("bench_decode_*_quick_headline.json")
  assert [r["impl"] for r in json.loads(path.read_text())["rows"]] == ["xla bf16", "xla int8 (per-token scale)"]
