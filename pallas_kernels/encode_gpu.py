"""Fused GPU encode (rotate + quantize + pack [+ QJL sketch]) for TurboQuant codes (Pallas, Triton).

Implements `tqjax.quantizer.encode` (and `tqjax.cache.encode_tokens`, which also subtracts a
per-group mean such as the cache's key mean) in one pass: each program reads a block of BT
vectors x [BT, d] in their own dtype and writes only their packed codes and scales (and, for
prod quantizers, the packed QJL signs and residual norms). The XLA path instead makes separate
passes over float32 [.., d] intermediates (rotate, quantize, pack), which is why it costs 7-12x a
bf16 copy of K and V (experiments/results/bench_encode_*).

How one block is encoded without reshapes, gathers or value slices (Triton's rules):

* The rotation enters as P [d, d] in "kernel order": column j = w·32 + s holds row s·W + w of Π,
  i.e. the coordinate that `tqjax.packing` puts in slot s of column w (W = d/32). So the dot of
  the block with the ref slice P[:, w·32 + s0 : w·32 + s0 + n] is y for column w, slots
  s0 .. s0 + n − 1, as a [BT, n] tile. mse quantizers take n = 16 (half a column, wgmma N = 16)
  and loop over the W columns (`fori_loop`), so Triton prefetches the next column's P tiles
  (software pipelining, num_stages = 2); prod quantizers take whole columns (n = 32), unrolled.
* Dots: precision="high" (default) splits P into bf16 hi + lo parts (and x too unless it is
  bf16), 2-3 bf16 dots with float32 accumulation, ~2^-16 relative error; precision="tf32" is
  one TF32 dot (~2^-11). Per-row scaling by 1/‖x‖ comes after the dot. A mean is subtracted
  after the dot too, as mean·P (float32-exact, once per group outside): x stays an exact bf16
  operand (half the registers of a split x − mean, no spills), at the price of a dot error
  relative to ‖x‖ instead of ‖x − mean‖ (~2^-17·‖x‖ with "high": irrelevant next to the
  quantization error, but a centred row within that of its mean gets noisy codes).
* Quantize: the Lloyd–Max codebook is symmetric with a boundary at exactly 0, so the code is
  h + m for y > 0 and h − 1 − m for y ≤ 0 (h = 2^(b−1)), where m counts the positive boundaries
  below |y| (strictly, for y > 0) or at or below |y| (for y ≤ 0). Adding 1 to the bits of |y|
  when y ≤ 0 (the next float up) makes both a strict count: h − 1 compares instead of 2^b − 1,
  ties on a boundary resolved exactly like `searchsorted(side="left")`. m is counted in float32
  from 2^23 (compare → 0/1, add), so its bits are 0x4B000000 + m and the code's bits come from
  two bitwise ops with the y ≤ 0 mask, no float-to-int conversion.
* Norm correction: ĉ² depends only on m, so the same 0/1 steps step it from c_h² to c_{h+m}²
  (no gather); it accumulates per element over the block's tiles and is summed per row once;
  ‖x‖/‖ŷ‖ is the stored scale.
* Pack: a part of width p takes field (code >> offset) & (2^p − 1) of slot s to bit
  (s mod 32/p)·p of row s // (32/p): per tile, the terms field·2^bit of each row it touches
  (`_pack_terms`) are summed over the column's tiles and then over slots (fields are disjoint,
  so sums are ORs); row r's word of column w goes to column r·W + w of one [BT, 2^⌈log2(b·W)⌉]
  word tile, stored once per block with a column mask (b·W is often not a power of two).
* QJL (prod): the same steps give ±c_{h+m} too, so r = y − ŷ stays in the [BT, 32] tiles; the
  sketch S·r comes out in kernel order too (S permuted on both axes outside), one [BT, 32] tile
  per sign word column, as Σ_w r_w @ S[w-tile, c-tile] (K = N = 32 dots); bit j is S·r ≥ 0, one
  unmasked sum per word; the sign words are stored as one tile like the codes.
* Non-finite rows (some x ±inf or NaN: max |x| = inf, or Σx² NaN; Triton's max on the GPU need
  not propagate NaN) get the zero direction's codes and scale NaN: mse quantizers multiply y by
  NaN there (NaN fails every compare, so it quantizes exactly like 0: one select less per
  coordinate), prod quantizers set y = 0 (their residual must be that of y = 0). Zero rows give
  y = 0 exactly and scale 0; rows whose ‖x‖² underflows or overflows in float32 follow the XLA
  path too (x / 1 resp. x / inf before quantizing, scale 0 resp. inf), except that with a mean a
  row with ‖x − mean‖ = 0 in float32 (equal to the mean, or underflowing) gets the zero
  direction's codes (the XLA path quantizes the unscaled x − mean); both decode to zeros.
* N not a multiple of BT: masked loads (other=0) and masked stores.

Speed (experiments/bench_encode.py): a prefill's K3/V3 encode + cache write takes 3.3x a bf16
read + write of K and V on an H200 (2026-11-28; 3.4x with the column loop unrolled).
On Hopper, `encode_mgpu` (Mosaic GPU) replaces this kernel where it applies (`dispatch`).
The kernel is latency-bound, not issue-bound: Nsight Compute on an H100 (3-bit centred keys)
showed 0.48 instructions issued per cycle per scheduler at 16 warps per SM (114 registers), its
stalls mostly on global loads, barriers and shared memory; the unrolled form of the column loop
executed 17 % fewer instructions (44 against 53 per coordinate) in the same time.

Letters: G groups (leading dims that share a mean), T tokens per group, d dim, W = d/32 words
per packed row, m QJL sketch rows, Wm = m/32, BT tokens per block, b codebook bits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import bf16
from pallas_kernels.column_order import to_column_major
from tqjax import packing
from tqjax.codebook import lloyd_max  # static float64 codebooks (the pytree's arrays are traced under jit)
from tqjax.quantizer import Code, Quantizer, _check_vectors
from tqjax.rotation import dense_matrix

__all__ = ["DIMS", "INPUT_DTYPES", "LANES", "MAX_BITS", "MAX_SKETCH", "PRECISIONS", "TILE", "codebook_tables",
           "default_block_t", "encode", "encode_reference", "group_tokens", "nudged_magnitude",
           "rotation_operands", "sketch_operands", "supported", "tq_encode_kernel"]

LANES = packing.WORD_BITS  # 32 slots per packed word
TILE = 16  # slots per quantize/pack tile: half a packed column (wgmma N = 16); prod: a whole column
DIMS = (32, 64, 128, 256)
MAX_BITS = 4  # codebook bits (prod: total bits − 1)
MAX_SKETCH = 512
PRECISIONS = ("high", "tf32")
INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ----------------------------------------------------------------------------- static tables


def codebook_tables(bits: int, dim: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
  """Float32 (positive boundaries b_h..b_{n−2}, c_{h+m}, c_{h+m}² for m = 0..h−1) of the codebook.

  Checks the symmetry the kernel relies on: boundary h − 1 is exactly 0 and b_k = −b_{n−2−k},
  c_k = −c_{n−1−k} in float32, so |y| against the positive half reproduces `searchsorted` on all
  of them and the centroid of code h − 1 − m is −c_{h+m}.
  """
  c64, b64, _ = lloyd_max(bits, dim)
  c, b = c64.astype(np.float32), b64.astype(np.float32)
  n, h = 2**bits, 2 ** (bits - 1)
  if b[h - 1] != 0 or not np.array_equal(b, -b[::-1]) or not np.array_equal(c, -c[::-1]):
    raise AssertionError(f"codebook (bits={bits}, dim={dim}) is not exactly symmetric in float32")
  bounds = tuple(float(v) for v in b[h:])  # h − 1 values, increasing
  levels = tuple(float(v) for v in c[h:])
  squares = tuple(float(v) for v in c[h:] * c[h:])  # float32 products, as the XLA path's ŷ·ŷ
  assert len(bounds) == h - 1 and len(levels) == len(squares) == h and n == 2 * h
  return bounds, levels, squares


def _rotation_kernel_order(tq: Quantizer) -> jax.Array:
  return to_column_major(dense_matrix(tq.rotation).T.astype(jnp.float32))  # y = x @ it, kernel order


def group_tokens(x: jax.Array, mean: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """x [..., T, d] with mean [..., d] → (x [G, T, d], mean [G, d] float32); without a mean, all
  vectors x [..., d] form one group: (x [1, N, d], None). Raises ValueError on a mismatched mean."""
  d = x.shape[-1]
  if mean is None:
    return x.reshape(1, math.prod(x.shape[:-1]), d), None
  if x.ndim < 2 or mean.shape != (*x.shape[:-2], d):
    raise ValueError(f"mean must be [..., d] = {(*x.shape[:-2], d)} for x {x.shape}, got {mean.shape}")
  xg = x.reshape(math.prod(x.shape[:-2]), x.shape[-2], d)
  return xg, mean.astype(jnp.float32).reshape(xg.shape[0], d)


def _split(p: jax.Array, precision: str) -> tuple[jax.Array, ...]:
  if precision == "tf32":
    return (p,)
  return bf16.split(p)


def rotation_operands(tq: Quantizer, precision: str) -> tuple[jax.Array, ...]:
  """Πᵀ in kernel order: (P float32,) for "tf32", (P_hi, P_lo) bfloat16 with P ≈ P_hi + P_lo for "high"."""
  return _split(_rotation_kernel_order(tq), precision)


def sketch_operands(tq: Quantizer, precision: str) -> tuple[jax.Array, ...]:
  """Sᵀ [d, m] in kernel order on both axes (z = r @ it, r and z in kernel order), split like P."""
  st = to_column_major(tq.qjl.matrix.T.astype(jnp.float32))  # columns: sketch rows
  return _split(to_column_major(st.T).T, precision)  # rows: residual coordinates


# ----------------------------------------------------------------------------- the kernel


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_operands(x, split: bool, precision: str):
  """[(lhs, index of the rhs part)] whose dots sum to x @ rhs: rhs parts are (P,) or (P_hi, P_lo)."""
  if precision == "tf32":
    return [(x, 0)]
  if split:
    hi, lo = bf16.split(x)
    return [(lo, 0), (hi, 1), (hi, 0)]  # small terms first: lo·P_hi, hi·P_lo, hi·P_hi
  return [(x, 1), (x, 0)]  # x exact in bfloat16


def nudged_magnitude(y):
  """(neg, mag) of y float32: neg all ones (uint32) where y ≤ 0 or NaN, else 0; mag = |y|, moved one
  float up where y ≤ 0, so that "mag > b" counts b < y resp. b ≤ |y| (module docstring)."""
  neg = jnp.where(y > 0, jnp.uint32(0), jnp.uint32(0xFFFFFFFF))
  mag = lax.bitcast_convert_type((lax.bitcast_convert_type(y, jnp.uint32) - neg) & jnp.uint32(0x7FFFFFFF), jnp.float32)
  return neg, mag


def _quantize_tile(y, bits, bounds, levels, squares, sq=None, want_centroid: bool = False):
  """Codes of y [BT, n] float32 (uint32, `searchsorted(boundaries, y, side="left")`); with `sq`
  (float32 [BT, n]) also sq + ĉ² − c_h² (an accumulator of squared centroids, offset by c_h² per
  tile), and if asked the centroids ĉ themselves (float32 [BT, n])."""
  h = 2 ** (bits - 1)
  neg, mag = nudged_magnitude(y)
  # m counts in float32 from 2^23 (FSET 0/1 steps, FADDs): its bits are then 0x4B000000 + m, so
  # the code's low bits need no float-to-int conversion; ĉ² and ĉ step along with FFMAs.
  m = jnp.full(y.shape, 2.0**23, jnp.float32)
  level = jnp.full(y.shape, levels[0], jnp.float32) if want_centroid else None
  for j, bound in enumerate(bounds):
    step = (mag > bound).astype(jnp.float32)
    m = m + step
    if sq is not None:
      sq = sq + step * (squares[j + 1] - squares[j])
    if want_centroid:
      level = level + step * (levels[j + 1] - levels[j])
  mbits = lax.bitcast_convert_type(m, jnp.uint32)
  low = (mbits ^ neg) & jnp.uint32(h - 1)  # m for y > 0, h − 1 − m for y ≤ 0
  code = (~neg & jnp.uint32(h)) | low
  chat = jnp.where(neg == 0, level, -level) if want_centroid else None
  return code, sq, chat


def _pack_terms(code, bits: int, s0: int):
  """[(packed row, terms [BT, n] uint32)] of codes [BT, n] in slots s0 .. s0 + n − 1 of a column:
  row r's word is the sum of its terms over these slots (and the column's other slots)."""
  n = code.shape[-1]
  slot = s0 + lax.broadcasted_iota(jnp.int32, (1, n), 1)
  out = []
  for p, offset, row0 in packing.parts(bits):
    per_word = LANES // p
    field = code if p == bits else (code >> jnp.uint32(offset)) & jnp.uint32(2**p - 1)
    for r in range(s0 // per_word, (s0 + n - 1) // per_word + 1):
      mult = jnp.where(slot // per_word == r, jnp.uint32(1) << ((slot % per_word) * p).astype(jnp.uint32),
                       jnp.uint32(0))
      out.append((row0 + r, field * mult))  # fields are disjoint: sums are ORs
  return out


def _store_tile(ref, r0, tile, row_ok):
  """Stores words [BT, n] (n: ref's column count rounded up to a power of two) into rows r0 .. r0 + BT."""
  ncols = ref.shape[-1]
  col = lax.broadcasted_iota(jnp.int32, (1, tile.shape[1]), 1)
  pltriton.store(ref.at[pl.ds(r0, tile.shape[0]), pl.ds(0, tile.shape[1])], tile,
                 mask=row_ok[:, None] & (col < ncols))


def tq_encode_kernel(
    x_ref,  # [T, d] (block [BT·blocks_per_program, d]) input dtype
    mean_ref,  # [d] float32 per group, or None
    mrot_ref,  # [d] float32 per group: mean @ P (kernel order, float32-exact), or None
    p_refs,  # tuple of [d, d]: (P f32,) or (P_hi, P_lo) bf16, kernel order
    s_refs,  # tuple of [d, m] like p_refs: Sᵀ in kernel order (prod), else ()
    codes_ref,  # [T, b·W] uint32 out (None without a codebook)
    norms_ref,  # [T] norm dtype out
    signs_ref,  # [T, Wm] uint32 out (prod), else None
    rnorms_ref,  # [T] norm dtype out (prod), else None
    *,
    bits: int,
    bounds: tuple[float, ...],
    levels: tuple[float, ...],
    squares: tuple[float, ...],
    norm_correction: bool,
    block_t: int,
    blocks_per_program: int,
    num_tokens: int,
    precision: str,
):
  """One program of the encode: its `blocks_per_program` blocks of `block_t` tokens → packed
  codes, norms (and, prod, QJL signs and residual norms), as `tqjax.cache.encode_tokens`
  computes them (`encode_reference`)."""
  d = x_ref.shape[-1]
  width = d // LANES
  qjl = signs_ref is not None
  split_x = x_ref.dtype != jnp.bfloat16
  mean = mean_ref[...][None, :] if mean_ref is not None else None
  first = pl.program_id(0) * (block_t * blocks_per_program)

  def block(i, carry):
    r0 = i * block_t
    rows = first + r0 + lax.broadcasted_iota(jnp.int32, (block_t,), 0)
    row_ok = rows < num_tokens
    x_in = pltriton.load(x_ref.at[pl.ds(r0, block_t), pl.ds(0, d)], mask=row_ok[:, None], other=0)
    xc = x_in.astype(jnp.float32)
    if mean is not None:
      xc = xc - mean
    norm2 = jnp.sum(xc * xc, axis=1)
    norm = jnp.sqrt(norm2)
    # No ±inf (max of |x|) and no NaN (a sum of squares is NaN only from a NaN): robust whether or
    # not the backend's max propagates NaN (Triton's on GPU need not).
    finite = (jnp.max(jnp.abs(x_in), axis=1) < jnp.inf) & (norm2 == norm2)
    inv = 1.0 / jnp.where(finite & (norm > 0), norm, 1.0)  # as the XLA path: x / (‖x‖ or 1)
    # The dots take x itself (exact in bfloat16: no split) and the mean is subtracted after them,
    # rotated; x − mean feeds only the norm and the finiteness check.
    operands = _dot_operands(x_in if precision == "high" and not split_x else x_in.astype(jnp.float32), split_x,
                             precision)
    # Rows quantized as the zero direction: non-finite ones, and with a mean those with
    # ‖x − mean‖ = 0 (x·P − mean·P would be rounding noise there, not 0).
    keep = finite & (norm > 0) if mean is not None else finite
    inv_nan = jnp.where(keep, inv, jnp.nan)

    # Norm correction: Σĉ² accumulates per element over the tiles (from c_h² per tile), summed once.
    # Prod keys take whole 32-slot columns: their sketch dots then have K = 32 (half as many dots).
    tile = LANES if qjl else TILE
    sq = jnp.full((block_t, tile), squares[0] * (d // tile), jnp.float32) if norm_correction else None
    n_words = pl.next_power_of_2(codes_ref.shape[-1]) if bits else 1
    word_col = lax.broadcasted_iota(jnp.int32, (1, n_words), 1)

    def column(w, words, sq, residuals):
      """Column w (static or traced) of the block: its packed words put into words [BT, n_words], Σĉ²
      accumulated into sq, and (prod) its y − ŷ tiles appended to the list residuals."""
      terms = {}  # packed row → [BT, tile] terms of column w's word, summed over its tiles
      for s0 in range(0, LANES, tile):
        cols = pl.ds(w * LANES + s0, tile)
        acc = None
        for a, k in operands:
          part = _dot(a, p_refs[k][:, cols])
          acc = part if acc is None else acc + part
        if mean is not None:
          acc = acc - mrot_ref[cols][None, :]
        if qjl:  # [BT, tile]: column w, slots s0 .. s0 + tile − 1
          y = jnp.where(keep[:, None], acc * inv[:, None], 0.0)
        else:  # NaN where not kept: quantizes exactly like 0 (no compare holds), one select less
          y = acc * inv_nan[:, None]
        if bits:
          code, sq, chat = _quantize_tile(y, bits, bounds, levels, squares, sq, qjl)
          for row, t in _pack_terms(code, bits, s0):
            terms[row] = t if row not in terms else terms[row] + t
        if qjl:
          residuals.append(y - chat if bits else y)  # r = y − ŷ
      for row, t in terms.items():
        words = jnp.where(word_col == row * width + w, jnp.sum(t, axis=1, dtype=jnp.uint32)[:, None], words)
      return words, sq

    words = jnp.zeros((block_t, n_words), jnp.uint32)
    residuals = []
    if qjl:  # unrolled: the sketch needs every column's residual tiles
      for w in range(width):
        words, sq = column(w, words, sq, residuals)
    else:  # a loop over columns: Triton prefetches the next column's rotation tiles (software pipelining)
      words, sq = lax.fori_loop(0, width, lambda w, c: column(w, *c, None), (words, sq))
    if bits:
      _store_tile(codes_ref, r0, words, row_ok)

    scale = jnp.where(finite, norm, jnp.nan)
    if norm_correction:
      scale = scale / jnp.sqrt(jnp.sum(sq, axis=1))
    pltriton.store(norms_ref.at[pl.ds(r0, block_t)], scale.astype(norms_ref.dtype), mask=row_ok)

    if qjl:
      r_sum = sum(jnp.sum(res * res, axis=1) for res in residuals)
      r_ops = [_dot_operands(res, True, precision) for res in residuals]
      slot = lax.broadcasted_iota(jnp.uint32, (1, LANES), 1)
      sign_col = lax.broadcasted_iota(jnp.int32, (1, pl.next_power_of_2(signs_ref.shape[-1])), 1)
      signs = jnp.zeros((block_t, sign_col.shape[1]), jnp.uint32)
      for c in range(signs_ref.shape[-1]):
        z = None  # [BT, 32]: S·r for sign column c, slots 0..31
        for t, ops in enumerate(r_ops):
          s_tiles = [ref[pl.ds(t * tile, tile), pl.ds(c * LANES, LANES)] for ref in s_refs]
          for a, k in ops:
            part = _dot(a, s_tiles[k])
            z = part if z is None else z + part
        word = jnp.sum(jnp.where(z >= 0, jnp.uint32(1) << slot, jnp.uint32(0)), axis=1, dtype=jnp.uint32)
        signs = jnp.where(sign_col == c, word[:, None], signs)
      _store_tile(signs_ref, r0, signs, row_ok)
      pltriton.store(rnorms_ref.at[pl.ds(r0, block_t)], jnp.sqrt(r_sum).astype(rnorms_ref.dtype), mask=row_ok)
    return carry

  if blocks_per_program == 1:
    block(0, 0)
  else:
    lax.fori_loop(0, blocks_per_program, block, 0)


# ----------------------------------------------------------------------------- entry


def supported(tq: Quantizer, dtype=None) -> tuple[bool, str]:
  """(True, "") if the kernel encodes with `tq` (and inputs of `dtype`, if given), else (False, why)."""
  if not isinstance(tq, Quantizer):
    return False, f"expected a tqjax Quantizer, got {type(tq).__name__}"
  cfg = tq.config
  if cfg.dim not in DIMS:
    return False, f"dim={cfg.dim} not in {DIMS}"
  if cfg.mse_bits > MAX_BITS:
    return False, f"bits={cfg.bits} ({cfg.mse_bits} codebook bits); the encode kernel handles 1..{MAX_BITS}"
  m = cfg.sketch_dim
  if cfg.variant == "prod" and (m % LANES or m > MAX_SKETCH):
    return False, f"qjl_dim={m}; the encode kernel needs a multiple of {LANES} up to {MAX_SKETCH}"
  if dtype is not None and jnp.dtype(dtype) not in [jnp.dtype(t) for t in INPUT_DTYPES]:
    return False, f"input dtype {jnp.dtype(dtype)} (the kernel reads float32, bfloat16, float16)"
  return True, ""


def default_block_t(dim: int, tokens: int) -> int:
  """64 tokens per block (128 for d = 32), fewer for short inputs (≥ 16 rows for the dots).

  64 rows fill one warpgroup's wgmma (M = 64) with the default 4 warps; BT = 32 would waste half
  of each wgmma. On an H100 (2026-11-28, 3-bit centred keys, d = 128) BT = 64 with 4 warps and
  BT = 128 with 8 warps ran within 5 % of each other; BT = 128 with 4 warps, BT = 256, 8 warps at
  BT = 64 and num_stages = 3 were 10-90 % slower. Offline (ptxas for sm_90a, Triton 3.9) d = 128
  takes 87-141 registers, d = 256 133, float32 input 152, none spills.
  """
  bt = 128 if dim <= 32 else 64
  while bt > 16 and bt // 2 >= tokens:
    bt //= 2
  return bt


@functools.partial(
    jax.jit,
    static_argnames=("block_t", "blocks_per_program", "num_warps", "num_stages", "precision", "interpret",
                     "poison"),
)
def encode(
    tq: Quantizer,
    x: jax.Array,  # [..., T, d] (or [..., d] without a mean) float32 / bfloat16 / float16
    mean: jax.Array | None = None,  # [..., d] float32: subtracted from every token of its group
    *,
    block_t: int | None = None,
    blocks_per_program: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
    precision: str = "high",
    interpret: bool = False,
    poison: bool = False,
) -> Code:
  """`tqjax.quantizer.encode(tq, x)` (with a mean: of x − mean[..., None, :]) in one fused kernel.

  The same `Code` as the XLA path for mse and prod quantizers with ≤ 4 codebook bits and d in
  {32, 64, 128, 256}; a code (or QJL sign) can differ only for a coordinate within dot rounding
  (see `precision`) of a codebook boundary (of zero).
  block_t: tokens per block (power of two ≥ 16); blocks_per_program: blocks one program loops
  over; num_stages: Triton's software-pipelining depth (default 2: mse quantizers loop over the
  packed columns and prefetch the next column's rotation tiles); poison: outputs start as
  0xFFFFFFFF / NaN (tests: anything the kernel leaves unwritten shows).
  """
  _check_vectors(tq, x, "x")
  ok, why = supported(tq, x.dtype)
  if not ok:
    raise ValueError(f"the Pallas encode kernel does not support this quantizer: {why}")
  if precision not in PRECISIONS:
    raise ValueError(f"{precision=} must be one of {PRECISIONS}")
  cfg = tq.config
  d, bits, prod = cfg.dim, cfg.mse_bits, cfg.variant == "prod"
  lead = x.shape[:-1]
  xg, mean = group_tokens(x, mean)
  groups, tokens = xg.shape[:2]
  words = packing.packed_words(d, bits) if bits else 0
  sign_words = packing.num_columns(cfg.sketch_dim) if prod else 0
  norm_dtype = jnp.dtype(cfg.norm_dtype)

  out_shape = {  # name → (trailing shape, dtype, poison value); codes/signs absent when empty
      "codes": ((words,), jnp.uint32, 0xFFFFFFFF),
      "norms": ((), norm_dtype, jnp.nan),
      "signs": ((sign_words,), jnp.uint32, 0xFFFFFFFF),
      "rnorms": ((), norm_dtype, jnp.nan),
  }
  names = [n for n in out_shape if (n != "codes" or bits) and (n in ("codes", "norms") or prod)]
  if groups * tokens == 0:
    zeros = lambda n: jnp.zeros((*lead, *out_shape[n][0]), out_shape[n][1])
    return Code(zeros("codes"), zeros("norms"), *((zeros("signs"), zeros("rnorms")) if prod else ()), config=cfg)
  if block_t is None:
    block_t = default_block_t(d, tokens)
  if block_t < 16 or block_t & (block_t - 1):
    raise ValueError(f"{block_t=} must be a power of two >= 16")
  if num_warps is None:
    num_warps = 4
  rows = block_t * blocks_per_program
  p_ops = rotation_operands(tq, precision)
  s_ops = sketch_operands(tq, precision) if prod else ()
  bounds, levels, squares = codebook_tables(bits, d) if bits else ((), (), ())

  kernel = functools.partial(
      tq_encode_kernel,
      bits=bits,
      bounds=bounds,
      levels=levels,
      squares=squares,
      norm_correction=cfg.norm_correction,
      block_t=block_t,
      blocks_per_program=blocks_per_program,
      num_tokens=tokens,
      precision=precision,
  )
  has_mean = mean is not None

  def kernel_wrapper(*refs):
    it = iter(refs)
    x_ref = next(it)
    mean_ref = next(it) if has_mean else None
    mrot_ref = next(it) if has_mean else None
    p_refs = tuple(next(it) for _ in p_ops)
    s_refs = tuple(next(it) for _ in s_ops)
    outs = dict(zip(names, list(it)[-len(names):]))
    kernel(x_ref, mean_ref, mrot_ref, p_refs, s_refs, outs.get("codes"), outs["norms"], outs.get("signs"), outs.get("rnorms"))

  # Grid (token blocks, groups): consecutive programs stream consecutive tokens of a group.
  in_specs = [pl.BlockSpec((None, rows, d), lambda i, g: (g, i, 0))]
  args = [xg]
  if has_mean:
    mean_rot = jnp.dot(mean, _rotation_kernel_order(tq), precision=lax.Precision.HIGHEST)
    in_specs += [pl.BlockSpec((None, d), lambda i, g: (g, 0))] * 2
    args += [mean, mean_rot]
  for op in (*p_ops, *s_ops):
    in_specs.append(pl.BlockSpec(op.shape, lambda i, g: (0, 0)))
    args.append(op)
  out_specs, shapes = [], []
  for n in names:
    trail, dtype, _ = out_shape[n]
    if trail:
      out_specs.append(pl.BlockSpec((None, rows, *trail), lambda i, g: (g, i, 0)))
    else:
      out_specs.append(pl.BlockSpec((None, rows), lambda i, g: (g, i)))
    shapes.append(jax.ShapeDtypeStruct((groups, tokens, *trail), dtype))
  aliases = {}
  if poison:  # tests: outputs start as garbage (aliased inputs), so anything left unwritten shows
    aliases = {len(args) + k: k for k in range(len(names))}
    args += [jnp.full(s.shape, out_shape[n][2], s.dtype) for n, s in zip(names, shapes)]
    in_specs += out_specs

  params = dict(num_warps=num_warps, num_stages=2 if num_stages is None else num_stages)
  outs = pl.pallas_call(
      kernel_wrapper,
      grid=(pl.cdiv(tokens, rows), groups),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=shapes,
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(**params),
      interpret=interpret,
      name=f"tq_encode_{cfg.variant}_b{cfg.bits}_d{d}{'_nc' if cfg.norm_correction else ''}{'_mean' if has_mean else ''}",
  )(*args)
  got = {n: o.reshape(*lead, *out_shape[n][0]) for n, o in zip(names, outs)}
  if not bits:
    got["codes"] = jnp.zeros((*lead, 0), jnp.uint32)
  return Code(got["codes"], got["norms"], got.get("signs"), got.get("rnorms"), config=cfg)


def encode_reference(tq: Quantizer, x: jax.Array, mean: jax.Array | None = None) -> Code:
  """Plain-jnp reference of `encode`: the XLA encode of x (− mean over the token axis)."""
  from tqjax.quantizer import encode as xla_encode  # noqa: PLC0415

  if mean is not None:
    x = x.astype(jnp.float32) - mean.astype(jnp.float32)[..., None, :]
  return xla_encode(tq, x)
