"""Fused TurboQuant decode attention for TPU (Mosaic `pl.pallas_call`).

Implements the contract of `tqjax.partials.compressed_partial_reference` for one query token per
sequence (T = 1) and caches without outlier channels: from the prepared query (rotated, scaled
q, QJL projection S·q for prod keys, the key-centring logit offset) and the packed cache it
returns UNnormalized value accumulators in the value store's rotated space, the running max m
and the sum l of an online softmax over slots lo ≤ n < hi.

Layout inside the kernel (why it looks the way it does):

* The sequence axis is on lanes. A code tile is [rows, block_s] uint32: row r of
  `tqjax.packing`'s word layout (r = (first row of the part + part row)·W + column w), one
  token per lane. The cache stores [S, rows] (rows on lanes, 12 of 128 lanes used at 3 bits,
  d = 128), so the wrapper transposes codes and QJL signs to [rows, S] before the call. That is
  one extra read + write of the packed codes per call (about 2x the kernel's own HBM traffic);
  a cache that stores codes transposed removes it.
* Unpacking without gathers or reshapes: 8 consecutive slots of one column w share one word
  row for every part width p in {1, 2, 4} (32/p is a multiple of 8), so broadcasting that row
  to 8 sublanes and shifting each sublane by its own amount gives an [8, block_s] tile of
  fields. Tiles are concatenated (8-row aligned) into [32·W, block_s] codes in *column-major*
  coordinate order i' = w·32 + s (the packing's own order is i = s·W + w). The wrapper permutes
  the query (and S·q) into that order once per call and un-permutes the value accumulator.
* Codebook lookup without gather: the Lloyd–Max codebook is symmetric, c[k] = −c[2^b−1−k], so
  a code is a sign bit plus a (b−1)-bit magnitude index into the 2^(b−1) positive centroids,
  selected by a binary tree of `where`s (2^(b−1) − 1 selects; the centroids sit in SMEM).
* Both contractions run on the MXU in float32 (precision HIGHEST): logits [G, N] =
  q [G, D'] @ ŷ [D', N], and acc [G, D'] += (p·scale) [G, N] @ ŷ_v [D', N]ᵀ. Per-token scales
  multiply the logits / probabilities, never the [D', N] tile.
* Grid (B, K, S/block_s), ("parallel", "parallel", "arbitrary"); acc, m, l are output blocks
  resident across the sequence axis. lo and hi [B] are scalar-prefetched: the index maps clamp
  the block index into the attended range, so blocks outside it are not fetched again, and
  their compute is skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.column_order import from_column_major, to_column_major
from tqjax import packing
from tqjax.cache import KVCache
from tqjax.partials import PreparedQuery, compressed_partial_reference

__all__ = ["MAX_CODEBOOK_BITS", "decode_attention_kernel", "decode_partial_reference", "decode_partial_tpu",
           "supported"]

_HIGHEST = lax.Precision.HIGHEST
_SUBLANES = 8  # slots per unpacked tile: one sublane group
_LANES = 128
MAX_CODEBOOK_BITS = 7  # parts of width ≤ 4: 32/p slots per word is a multiple of 8


# ----------------------------------------------------------------------------- in-kernel helpers


def _unpack_tile(codes_ref, bits: int, cols: int, block_s: int) -> jax.Array:
  """codes_ref [bits·cols, N] uint32 → codes int32 [32·cols, N], row w·32 + s = slot s, column w."""
  rows = {}

  def row(r):  # each word row is loaded once and reused by every slot tile it feeds
    if r not in rows:
      rows[r] = lax.bitcast_convert_type(codes_ref[pl.ds(r, 1), :], jnp.int32)
    return rows[r]

  sub = lax.broadcasted_iota(jnp.int32, (_SUBLANES, block_s), 0)
  tiles = []
  for w in range(cols):
    for t in range(packing.WORD_BITS // _SUBLANES):
      code = None
      for p, offset, row0 in packing.parts(bits):
        part_row, first = divmod(_SUBLANES * t, packing.WORD_BITS // p)
        word = jnp.broadcast_to(row((row0 + part_row) * cols + w), (_SUBLANES, block_s))
        field = lax.shift_right_logical(word, (sub + first) * p) & (2**p - 1)
        if offset:
          field = lax.shift_left(field, jnp.int32(offset))
        code = field if code is None else code | field
      tiles.append(code)
  return jnp.concatenate(tiles, axis=0) if len(tiles) > 1 else tiles[0]


def _centroids(code: jax.Array, mag_ref, bits: int) -> jax.Array:
  """Codebook values float32 of codes int32 [...] in [0, 2^bits) for a symmetric codebook.

  mag_ref: SMEM [2^(bits−1)] the non-negative centroids c[2^(bits−1) + j], j = 0 .. 2^(bits−1)−1.
  Code k ≥ 2^(bits−1) is +mag[k − 2^(bits−1)]; code k below is −mag[2^(bits−1) − 1 − k], i.e. the
  magnitude index is the low bits, flipped when the sign bit is 0.
  """
  half = bits - 1
  high = lax.shift_right_logical(code, jnp.int32(half))  # 1: upper (positive) half
  j = (code ^ (high - 1)) & (2**half - 1)  # high − 1 = 0 keeps the bits, −1 flips them
  level = [mag_ref[i] for i in range(2**half)]
  for k in range(half):
    bit = (lax.shift_right_logical(j, jnp.int32(k)) & 1) != 0
    level = [jnp.where(bit, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
  mag = level[0]
  return jnp.where(high != 0, mag, -mag)


def _signs_tile(signs_ref, cols: int, block_s: int) -> jax.Array:
  """signs_ref [cols, N] uint32 (1-bit packing) → ±1.0 float32 [32·cols, N], column-major order."""
  bits = _unpack_tile(signs_ref, 1, cols, block_s)
  return jnp.where(bits != 0, jnp.float32(1.0), jnp.float32(-1.0))


def _dot(a, b, contract_b: int):
  """a [M, C] · b (contracting b's axis `contract_b`) in float32 on the MXU."""
  dims = (((1,), (contract_b,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- kernel


def decode_attention_kernel(
    # scalar prefetch (SMEM)
    lo_ref,  # [B] int32, first attended slot
    hi_ref,  # [B] int32, one past the last attended slot
    # inputs
    kmag_ref,  # SMEM [2^(kb−1)] float32 positive key centroids (unused when kb = 0)
    vmag_ref,  # SMEM [2^(vb−1)] float32 positive value centroids
    q_ref,  # [G, 32·Wk] float32 rotated, scaled query, column-major coordinate order
    off_ref,  # [G, 1] float32 logit offset (key centring)
    *refs,
    k_bits: int,
    v_bits: int,
    k_cols: int,
    v_cols: int,
    qjl_cols: int,
    qjl_scale: float,
    block_s: int,
    soft_cap: float | None,
):
  """One (batch, kv head, sequence block) step of the online softmax; see the module docstring.

  refs, in order: [kc_ref [kb·Wk, N] uint32 key codes (only when kb > 0)], ks_ref [1, N] key
  scales, [sq_ref [G, 32·Wm] float32 S·q, sg_ref [Wm, N] uint32 QJL signs, rn_ref [1, N]
  residual norms (prod keys only)], vc_ref [vb·Wv, N] uint32 value codes, vs_ref [1, N] value
  scales; outputs acc_ref [G, 32·Wv] float32, m_ref [G, 1], l_ref [G, 1].
  """
  refs = list(refs)
  kc_ref = refs.pop(0) if k_bits else None
  ks_ref = refs.pop(0)
  sq_ref, sg_ref, rn_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if qjl_cols else (None,) * 3
  vc_ref, vs_ref, acc_ref, m_ref, l_ref = refs

  b, j = pl.program_id(0), pl.program_id(2)
  lo, hi = lo_ref[b], hi_ref[b]
  start = j * block_s

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when((start < hi) & (start + block_s > lo) & (lo < hi))
  def _step():
    pos = start + lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
    ok = (pos >= lo) & (pos < hi)  # [1, N]; also masks the padded tail of the last block

    ip = jnp.zeros((q_ref.shape[0], block_s), jnp.float32)  # [G, N]
    if k_bits:
      k_hat = _centroids(_unpack_tile(kc_ref, k_bits, k_cols, block_s), kmag_ref, k_bits)  # [Dk', N]
      ip = _dot(q_ref[...], k_hat, 0)
    if qjl_cols:  # ⟨S·q, sign(S·r)⟩·‖r‖/(κ·m), as `tqjax.qjl.qjl_ip`
      qjl = _dot(sq_ref[...], _signs_tile(sg_ref, qjl_cols, block_s), 0)
      ip = ip + qjl * (rn_ref[...].astype(jnp.float32) * jnp.float32(qjl_scale))
    logits = ip * ks_ref[...].astype(jnp.float32) + off_ref[...]
    if soft_cap is not None:
      logits = jnp.float32(soft_cap) * jnp.tanh(logits / jnp.float32(soft_cap))
    logits = jnp.where(ok, logits, -jnp.inf)  # `where`, not a product: padded tails may hold NaN

    m_prev = m_ref[...]  # [G, 1]
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    m_safe = jnp.where(jnp.abs(m_new) < jnp.inf, m_new, 0.0)
    p = jnp.exp(logits - m_safe)  # [G, N]
    corr = jnp.exp(jnp.where(jnp.abs(m_prev) < jnp.inf, m_prev, m_safe) - m_safe)
    l_ref[...] = l_ref[...] * corr + jnp.sum(p, axis=1, keepdims=True)

    v_hat = _centroids(_unpack_tile(vc_ref, v_bits, v_cols, block_s), vmag_ref, v_bits)  # [Dv', N]
    pv = p * jnp.where(ok, vs_ref[...].astype(jnp.float32), 0.0)
    acc_ref[...] = acc_ref[...] * corr + _dot(pv, v_hat, 1)  # [G, Dv']
    m_ref[...] = m_new


# ----------------------------------------------------------------------------- wrapper


def supported(cache: KVCache) -> tuple[bool, str]:
  """(True, "") if the kernel handles this cache's configuration, else (False, reason)."""
  outlier_channels = cache.config.outlier_channels
  if outlier_channels or cache.k.outlier is not None or cache.v.outlier is not None:
    return False, f"{outlier_channels=} is not supported by the TPU decode kernel (needs 0)"
  for part, tq in (("key", cache.k.quantizer), ("value", cache.v.quantizer)):
    bits = tq.codebook.bits if tq.codebook is not None else 0
    if bits > MAX_CODEBOOK_BITS:
      return False, f"{part} codebook bits={bits} > {MAX_CODEBOOK_BITS} are not supported (8-bit parts)"
  if cache.v.quantizer.codebook is None:
    return False, "values need a codebook (mse values of >= 1 bit)"
  return True, ""


def _check_supported(cache: KVCache, pq: PreparedQuery, lo, hi, block_s: int) -> None:
  if not isinstance(cache, KVCache):
    raise TypeError(f"expected a tqjax KVCache, got {type(cache).__name__}")
  ok, why = supported(cache)
  if not ok:
    raise ValueError(why)
  t = pq.offset.shape[-1]
  if t != 1:
    raise ValueError(f"the TPU decode kernel takes one query token per sequence, got {t=}")
  b = cache.batch_size
  if lo.shape != (b, 1) or hi.shape != (b, 1):
    raise ValueError(f"lo and hi must be [batch={b}, 1], got {lo.shape=} {hi.shape=}")
  if isinstance(block_s, bool) or not isinstance(block_s, int) or block_s < 1 or block_s % _LANES:
    raise ValueError(f"{block_s=} must be a positive multiple of {_LANES} (the sequence is on lanes)")


@functools.partial(jax.jit, static_argnames=("soft_cap", "block_s", "interpret"))
def decode_partial_tpu(
    cache: KVCache,
    pq: PreparedQuery,
    lo: jax.Array,  # [B, 1] int32
    hi: jax.Array,  # [B, 1] int32
    soft_cap: float | None = None,
    *,
    block_s: int = 512,
    interpret=False,
):
  """Fused decode partial over the packed cache: `compressed_partial_reference` for T = 1.

  Returns (accs, m, l): accs = (acc [B, K, G, 1, d_v],) UNnormalized in the value store's rotated
  space, m and l [B, K, G, 1]; an empty range [lo, hi) gives m = −inf, l = 0, acc = 0.
  Usable as `chunked_attention(..., partial_fn=functools.partial(decode_partial_tpu, ...))`.
  block_s: cached tokens per grid step (multiple of 128; clipped to the capacity).
  interpret: False on TPU; True or `pltpu.InterpretParams()` to run on CPU.
  """
  lo = jnp.asarray(lo, jnp.int32)
  hi = jnp.asarray(hi, jnp.int32)
  _check_supported(cache, pq, lo, hi, block_s)
  tqk, tqv = cache.k.quantizer, cache.v.quantizer
  kcode, vcode = cache.k.main, cache.v.main
  bsz, kh, cap = kcode.norms.shape
  g = pq.offset.shape[2]
  k_bits = tqk.codebook.bits if tqk.codebook is not None else 0
  v_bits = tqv.codebook.bits
  k_cols, v_cols = packing.num_columns(tqk.dim), packing.num_columns(tqv.dim)
  prod = tqk.qjl is not None
  qjl_cols = packing.num_columns(tqk.qjl.sketch_dim) if prod else 0
  qjl_scale = 1.0 / (tqk.qjl.kappa * tqk.qjl.sketch_dim) if prod else 0.0

  n = min(block_s, cap)  # a block as long as the whole cache is a "full dim" block
  num_blocks = pl.cdiv(cap, n)

  def seq_block(b, j, lo_ref, hi_ref):
    """Clamps j into the blocks of [lo, hi): outside it the block index repeats (no new DMA)."""
    first = jnp.minimum(lax.div(lo_ref[b], n), num_blocks - 1)
    last = jnp.minimum(lax.div(jnp.maximum(hi_ref[b] - 1, 0), n), num_blocks - 1)
    return jnp.clip(j, first, jnp.maximum(last, first))

  def per_head(shape):
    return pl.BlockSpec((None, None, *shape), lambda b, k, j, *_: (b, k, *(0,) * len(shape)))

  def per_token(rows):
    return pl.BlockSpec((None, None, rows, n), lambda b, k, j, lo_ref, hi_ref: (b, k, 0, seq_block(b, j, lo_ref, hi_ref)))

  smem = pl.BlockSpec(memory_space=pltpu.SMEM)
  # Magnitudes of the symmetric codebooks: the upper half, c[2^(b−1):] ≥ 0.
  kmag = tqk.codebook.centroids[2 ** (k_bits - 1) :] if k_bits else jnp.zeros((1,), jnp.float32)
  vmag = tqv.codebook.centroids[2 ** (v_bits - 1) :]
  q = to_column_major(pq.q[0][:, :, :, 0, :].astype(jnp.float32), k_cols)  # [B, K, G, 32·Wk]
  off = pq.offset.astype(jnp.float32)  # [B, K, G, 1]
  as_row = lambda x: x.reshape(bsz, kh, 1, cap)  # [B, K, S] → [B, K, 1, S], free
  # The extra HBM pass this module's docstring accounts for: rows onto the sublane axis.
  t_codes = lambda x: jnp.swapaxes(x, 2, 3)  # [B, K, S, R] → [B, K, R, S]

  inputs = [kmag, vmag, q, off]
  specs = [smem, smem, per_head((g, q.shape[-1])), per_head((g, 1))]
  if k_bits:
    inputs.append(t_codes(kcode.codes))
    specs.append(per_token(k_bits * k_cols))
  inputs.append(as_row(kcode.norms))
  specs.append(per_token(1))
  if prod:
    sq = to_column_major(pq.sq[0][:, :, :, 0, :].astype(jnp.float32), qjl_cols)  # [B, K, G, 32·Wm]
    inputs += [sq, t_codes(kcode.qjl_signs), as_row(kcode.residual_norms)]
    specs += [per_head((g, sq.shape[-1])), per_token(qjl_cols), per_token(1)]
  inputs += [t_codes(vcode.codes), as_row(vcode.norms)]
  specs += [per_token(v_bits * v_cols), per_token(1)]

  dv_pad = packing.WORD_BITS * v_cols
  kernel = functools.partial(
      decode_attention_kernel,
      k_bits=k_bits,
      v_bits=v_bits,
      k_cols=k_cols,
      v_cols=v_cols,
      qjl_cols=qjl_cols,
      qjl_scale=qjl_scale,
      block_s=n,
      soft_cap=None if soft_cap is None else float(soft_cap),
  )
  acc, m, l = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(bsz, kh, num_blocks),
          in_specs=specs,
          out_specs=[per_head((g, dv_pad)), per_head((g, 1)), per_head((g, 1))],
      ),
      out_shape=[
          jax.ShapeDtypeStruct((bsz, kh, g, dv_pad), jnp.float32),
          jax.ShapeDtypeStruct((bsz, kh, g, 1), jnp.float32),
          jax.ShapeDtypeStruct((bsz, kh, g, 1), jnp.float32),
      ],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="tq_decode_attention_tpu",
  )(lo[:, 0], hi[:, 0], *inputs)
  acc = from_column_major(acc, tqv.dim)[:, :, :, None, :]
  return (acc,), m, l


def decode_partial_reference(cache: KVCache, pq: PreparedQuery, lo, hi, soft_cap=None, *, block_s: int = 512):
  """Plain-jnp reference with the kernel's contract and checks (the tqjax oracle, T = 1)."""
  lo, hi = jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)
  _check_supported(cache, pq, lo, hi, block_s)
  return compressed_partial_reference(cache, pq, lo, hi, soft_cap, block_s)
