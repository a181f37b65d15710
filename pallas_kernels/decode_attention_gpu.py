"""Fused GPU decode attention over the TurboQuant compressed KV cache (Pallas, Triton lowering).

Implements the contract of `tqjax.partials.compressed_partial_reference` (the `partial_fn` seam of
`tqjax.ops.chunked_attention`) for configs without outlier channels: per (batch, kv head,
split of the sequence) one program takes the G·T query rows of the kv head together (padded to
a power of two ≥ 16 for Triton), streams blocks of packed key codes + norms (+ QJL signs and
residual norms for prod keys) and packed value codes + norms, and keeps an online softmax.
Splits are merged in XLA (flash-decoding).

How a block is dequantized without gathers, reshapes of packed words or slicing of values:

* Coordinate i of a vector sits in slot s = i // W, column w = i % W (`tqjax.packing`). The
  kernel works in the transposed order j = w·32 + s ("kernel order"); the query (and the QJL
  projection) are permuted into it once per step outside, and the value accumulator is permuted
  back once after the merge. In kernel order a block [BK, D] is a join tree: 32 leaves [BK, W]
  (one per slot s), stacked pairwise (`jnp.stack(..., -1)` → `tt.join`, register-local), then
  one reshape of the trailing 2×2×2×2×2 dims into D.
* Leaf s needs, from each binary-digit part of width p, the field of row s // (32/p) at bit
  (s % (32/p))·p. The widest part's field stays where it is; narrower parts are shifted next to
  it; then one OR with the exponent of 2^23 and a bitcast give 2^23 + code·2^pos exactly, and one
  FMA turns that into t = (code − (2^b − 1)/2) / 2^(b−1) ∈ (−1, 1) exactly (power-of-two scales).
* The Lloyd–Max codebook is symmetric, c(−t) = −c(t), so the 2^b centroids are an odd polynomial
  of t of degree 2^b − 1 that interpolates them exactly: c = t·P(t²), Horner in t² with 2^(b−1)
  coefficients. b = 2 costs 3 flops, b = 3 five, b = 4 nine (select chains cost ~2·2^b).
* QJL signs (1-bit rows) become ±1 the same way: OR + bitcast + one FMA.
* Key norms scale the logits after the dot, value norms scale the probabilities before the
  second dot, so per-token scalars never touch the [BK, D] tiles. Both dots run on the tensor
  cores with the query rows as M: tf32 by default (4–5e-4 of the float32 oracle), or bf16
  operands with `dot_dtype="bfloat16"` (the query and probabilities split hi + lo by
  `pallas_kernels.bf16.split`, centroids rounded once: 0.9–2.3e-3; 5–35 % faster, most at D=256).

Speed (H200, 2026-11-27, experiments/kernel_variants.py): 2.4–4.4× faster than the XLA reference
path, but at S=32k only 0.34× (K4/V4, tf32) to 0.50× (K3/V3, bf16 dots) of cuDNN bf16, at 6–8 %
of copy bandwidth; on Hopper `decode_mgpu` replaces this kernel where it applies (`dispatch`).
Not memory-bound: ~18 SASS instructions per cached coordinate (~12 of them dequantization;
experiments/offline_triton_compile.py --decode), issued at ~35 % of peak because 168 registers
allow only 12 warps per SM (Nsight Compute: SM throughput 67 %, memory 41 %). Building the tiles
without the join tree (per-element word gathers, or broadcast + one reshape), tokens on M, and
CUDA-core (no-dot) forms were all measured and were slower; they are not kept.

Letters: B batch, K kv heads, G query heads per kv head, T query tokens, S cache slots, D head dim,
R = G·T query rows of one kv head, Rp = R padded, W = D / 32 words per packed row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import bf16
from pallas_kernels.column_order import from_column_major, to_column_major
from tqjax import packing
from tqjax.partials import compressed_partial_reference
from tqjax.codebook import lloyd_max  # static float64 centroids (the pytree's are traced under jit)

__all__ = ["DOT_DTYPES", "HEAD_DIMS", "LANES", "MAX_CODE_BITS", "MAX_ROWS", "decode_partial",
           "decode_partial_reference", "default_block_k", "default_num_splits", "merge_splits", "supported",
           "tq_decode_kernel"]

LANES = packing.WORD_BITS  # 32 slots per packed word
HEAD_DIMS = (32, 64, 128, 256)
MAX_CODE_BITS = 4  # codebook bits the polynomial dequantizer handles (odd degree ≤ 15)
MAX_ROWS = 64  # G·T query rows of one kv head in one program
_MAGIC = 0x4B000000  # bits of 2^23: OR-ing an integer < 2^23 into the mantissa gives 2^23 + n
DOT_DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- static tables


def _odd_poly(centroids: np.ndarray) -> tuple[float, ...]:
  """Coefficients a_i of c(t) = Σ a_i t^(2i+1) through the 2^b centroids at t = (k − (n−1)/2)/(n/2).

  Exact interpolation (the codebook is symmetric, so the even part is zero); solved in float64.
  """
  c = np.asarray(centroids, np.float64)
  n = c.shape[0]
  half = n // 2
  t = (np.arange(half, n) - (n - 1) / 2) / half
  vander = np.stack([t ** (2 * i + 1) for i in range(half)], axis=1)
  return tuple(float(a) for a in np.linalg.solve(vander, c[half:]))


def _leaf_plan(bits: int):
  """Per slot s: [(row, bit position, width, code-bit offset)] for each part, widest first."""
  plan = []
  for s in range(LANES):
    fields = []
    for p, offset, row0 in packing.parts(bits):
      per_word = LANES // p
      fields.append((row0 + s // per_word, (s % per_word) * p, p, offset))
    plan.append(fields)
  return plan


def _stack_tree(leaves):
  """Leaves[s] [..., X] for s in [0, 2^L) → [..., X, 2, ..., 2] with s's MSB first (tt.join)."""
  while len(leaves) > 1:
    half = len(leaves) // 2
    # Each stack appends its pair index as the innermost dim. Pairing s with s + half makes the
    # first (outermost) new dim the MSB; later levels append the lower bits after it.
    leaves = [jnp.stack([leaves[k], leaves[k + half]], axis=-1) for k in range(half)]
  return leaves[0]


def _to_kernel_order(leaves, block: int, width: int):
  """32 leaves [BK, W] (leaf s) → [BK, W·32] with column j = w·32 + s."""
  tree = _stack_tree(list(leaves))  # [BK, W, 2, 2, 2, 2, 2]
  return tree.reshape(block, width * LANES)


def _rows(ref, start, block: int, nrows: int, width: int):
  """Loads the packed rows [BK, W] of a block of tokens: rows[r] = words [r·W, (r+1)·W)."""
  return [ref[pl.ds(start, block), pl.ds(r * width, width)] for r in range(nrows)]


def _split_halves(rows):
  """(row << 1, row >> 14) of each row (one shift per word, shared by 16 or more leaves).

  A field at bit pos < 15 is read from the first at pos + 1, one at pos ≥ 15 from the second at
  pos − 14: every field then sits in bits [1, 22), so 2^23 + field·2^base is exact and the
  half-integer code offset (2^b − 1)/2 still fits the float32 mantissa (base ≥ 1).
  """
  return [(r << jnp.uint32(1), r >> jnp.uint32(14)) for r in rows]


def _field_source(halves, row: int, pos: int):
  lo, hi = halves[row]
  return (lo, pos + 1) if pos < 15 else (hi, pos - 14)


def _dequant_leaves(rows, bits: int, coeffs: tuple[float, ...]):
  """Codebook values of the 32 slots of a block: list of [BK, W] float32 (kernel order leaves)."""
  halves = _split_halves(rows)
  n = 2**bits
  h = n // 2
  leaves = []
  for fields in _leaf_plan(bits):
    # Widest part: its field stays in place at bit `base`; the narrower ones are moved beside it.
    row, pos, p, offset = fields[0]
    src, base = _field_source(halves, row, pos)
    code = src & jnp.uint32(((2**p) - 1) << base)
    for row, pos, p, offset in fields[1:]:
      src, at = _field_source(halves, row, pos)
      shift = base + offset - at
      if shift > 0:
        src = src << jnp.uint32(shift)
      elif shift < 0:
        src = src >> jnp.uint32(-shift)
      code = code | (src & jnp.uint32(((2**p) - 1) << (base + offset)))
    f = lax.bitcast_convert_type(code | jnp.uint32(_MAGIC), jnp.float32)  # 2^23 + code·2^base
    scale = 2.0 ** (-base) / h
    t = f * jnp.float32(scale) - jnp.float32(2.0 ** (23 - base) / h + (n - 1) / (2 * h))  # exact
    leaves.append(_odd_poly_eval(t, coeffs))
  return leaves


def _odd_poly_eval(t, coeffs: tuple[float, ...]):
  """c(t) = t·P(t²), Horner in t² (see `_odd_poly`)."""
  if len(coeffs) == 1:
    return t * jnp.float32(coeffs[0])
  t2 = t * t
  acc = jnp.full_like(t, coeffs[-1])
  for a in reversed(coeffs[:-1]):
    acc = acc * t2 + jnp.float32(a)
  return acc * t


def _sign_leaves(row):
  """±1 QJL signs (bit 1 → +1) of the 32 slots of a 1-bit row [BK, W]: list of [BK, W] float32."""
  halves = _split_halves([row])
  leaves = []
  for s in range(LANES):
    src, pos = _field_source(halves, 0, s)
    f = lax.bitcast_convert_type((src & jnp.uint32(1 << pos)) | jnp.uint32(_MAGIC), jnp.float32)
    leaves.append(f * jnp.float32(2.0 ** (1 - pos)) - jnp.float32(2.0 ** (24 - pos) + 1.0))
  return leaves


# ----------------------------------------------------------------------------- the kernel


def tq_decode_kernel(
    # inputs
    q_ref,  # [Rp, D] f32: rotated, scaled query rows in kernel order
    sq_ref,  # [Rp, D] f32: QJL projection S·q · 1/(κ·m) in kernel order (prod keys), else None
    off_ref,  # [Rp] f32: logit offset (key centring)
    lo_ref,  # [Rp] int32: first attended slot per row
    hi_ref,  # [Rp] int32: one past the last attended slot per row (0 for padded rows)
    kc_ref,  # [S, bk·W] uint32: packed key codes
    kn_ref,  # [S] key norms (norm dtype)
    ks_ref,  # [S, W] uint32: packed QJL signs (prod keys), else None
    kr_ref,  # [S] QJL residual norms (prod keys), else None
    vc_ref,  # [S, bv·W] uint32: packed value codes
    vn_ref,  # [S] value norms
    # outputs
    acc_ref,  # [R, D] (block [Rp, D]) f32: unnormalized Σ p·‖v‖·ŷ_v in the value kernel order
    m_ref,  # [R] (block [Rp]) f32: running max
    l_ref,  # [R] (block [Rp]) f32: Σ exp(logit − m)
    *,
    k_bits: int,
    v_bits: int,
    k_coeffs: tuple[float, ...],
    v_coeffs: tuple[float, ...],
    soft_cap: float | None,
    block_k: int,
    blocks_per_split: int,
    num_rows: int,
    seq_len: int,
    dot_dtype: str,
):
  """One split of one (batch, kv head): the online softmax of the query rows over the blocks of
  block_k slots this split owns, clipped to the blocks that hold attended slots [min lo, max hi);
  writes the split's unnormalized accumulator, running max and sum."""
  rows_p, head_dim = q_ref.shape
  width = head_dim // LANES
  num_blocks = pl.cdiv(seq_len, block_k)
  split = pl.program_id(0)

  lo = lo_ref[...]
  hi = hi_ref[...]
  lo_min = jnp.min(lo)
  hi_max = jnp.max(hi)
  first = jnp.maximum(split * blocks_per_split, lo_min // block_k)
  last = jnp.minimum(jnp.minimum((split + 1) * blocks_per_split, num_blocks), pl.cdiv(hi_max, block_k))

  q = q_ref[...]
  sq = sq_ref[...] if sq_ref is not None else None
  offset = off_ref[...]

  def deq(ref, start, nbits, coeffs):
    rows = _rows(ref, start, block_k, nbits, width)
    return _to_kernel_order(_dequant_leaves(rows, nbits, coeffs), block_k, width)

  def signs(start):
    return _to_kernel_order(_sign_leaves(_rows(ks_ref, start, block_k, 1, width)[0]), block_k, width)

  def matmul(a, b, contract):
    """a·b over dims `contract` ((1, 1): a @ b.T; (1, 0): a @ b) with f32 accumulation."""
    dn = ((contract[:1], contract[1:]), ((), ()))
    if dot_dtype == "float32":
      return lax.dot_general(a, b, dn, preferred_element_type=jnp.float32)
    # bf16 operands: b rounded once (centroids, ±1 signs); a split into hi + lo keeps ~16 bits.
    b16 = b.astype(jnp.bfloat16)
    a_hi, a_lo = bf16.split(a)
    return (lax.dot_general(a_hi, b16, dn, preferred_element_type=jnp.float32)
            + lax.dot_general(a_lo, b16, dn, preferred_element_type=jnp.float32))

  def body(i, carry):
    acc_prev, m_prev, l_prev = carry
    # The last block is moved back inside the cache; slots it re-reads are masked (slot < i·BK).
    start = jnp.minimum(i * block_k, seq_len - block_k)
    slots = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    ok = (slots >= i * block_k) & (slots >= lo[:, None]) & (slots < hi[:, None])  # [Rp, BK]

    kdeq = deq(kc_ref, start, k_bits, k_coeffs)
    ip = matmul(q, kdeq, (1, 1))  # [Rp, BK]
    if sq is not None:
      ip = ip + matmul(sq, signs(start), (1, 1)) * kr_ref[pl.ds(start, block_k)].astype(jnp.float32)[None, :]
    knorm = kn_ref[pl.ds(start, block_k)].astype(jnp.float32)
    logits = ip * knorm[None, :] + offset[:, None]
    if soft_cap is not None:
      logits = jnp.float32(soft_cap) * jnp.tanh(logits / jnp.float32(soft_cap))
    logits = jnp.where(ok, logits, -jnp.inf)

    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(logits - m_safe[:, None])
    corr = jnp.exp(jnp.where(m_prev == -jnp.inf, m_safe, m_prev) - m_safe)
    l_new = l_prev * corr + jnp.sum(p, axis=1)
    vnorm = vn_ref[pl.ds(start, block_k)].astype(jnp.float32)
    # where, not multiply: a masked slot's norm may be NaN or garbage and must not leak.
    pv = jnp.where(ok, p * vnorm[None, :], 0.0)
    acc = acc_prev * corr[:, None] + matmul(pv, deq(vc_ref, start, v_bits, v_coeffs), (1, 0))
    return acc, m_new, l_new

  acc0 = jnp.zeros((rows_p, head_dim), jnp.float32)
  m0 = jnp.full((rows_p,), -jnp.inf, jnp.float32)
  l0 = jnp.zeros((rows_p,), jnp.float32)
  acc, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, (acc0, m0, l0))

  row_ok = lax.broadcasted_iota(jnp.int32, (rows_p,), 0) < num_rows
  pltriton.store(acc_ref.at[pl.ds(0, rows_p), pl.ds(0, head_dim)], acc, mask=row_ok[:, None])
  pltriton.store(m_ref.at[pl.ds(0, rows_p)], m, mask=row_ok)
  pltriton.store(l_ref.at[pl.ds(0, rows_p)], l, mask=row_ok)


def _decode_unbatched(
    q,  # [Rp, D] f32
    sq,  # [Rp, D] f32 or None
    offset,  # [Rp] f32
    lo,  # [Rp] int32
    hi,  # [Rp] int32
    kc,  # [S, bk·W] uint32
    kn,  # [S]
    ks,  # [S, W] uint32 or None
    kr,  # [S] or None
    vc,  # [S, bv·W] uint32
    vn,  # [S]
    *,
    num_rows: int,
    k_bits: int,
    v_bits: int,
    k_coeffs,
    v_coeffs,
    soft_cap,
    block_k: int,
    num_splits: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    dot_dtype: str,
    poison: bool,
):
  rows_p, head_dim = q.shape
  seq_len = kc.shape[0]
  num_blocks = pl.cdiv(seq_len, block_k)
  blocks_per_split = pl.cdiv(num_blocks, num_splits)
  splits = pl.cdiv(num_blocks, blocks_per_split)
  prod = sq is not None
  kernel = functools.partial(
      tq_decode_kernel,
      k_bits=k_bits,
      v_bits=v_bits,
      k_coeffs=k_coeffs,
      v_coeffs=v_coeffs,
      soft_cap=soft_cap,
      block_k=block_k,
      blocks_per_split=blocks_per_split,
      num_rows=num_rows,
      seq_len=seq_len,
      dot_dtype=dot_dtype,
  )
  full = lambda shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))
  args = [q, sq, offset, lo, hi, kc, kn, ks, kr, vc, vn]
  specs = [None if a is None else full(a.shape) for a in args]

  out_specs = [
      pl.BlockSpec((None, rows_p, head_dim), lambda j: (j, 0, 0)),
      pl.BlockSpec((None, rows_p), lambda j: (j, 0)),
      pl.BlockSpec((None, rows_p), lambda j: (j, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((splits, num_rows, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((splits, num_rows), jnp.float32),
      jax.ShapeDtypeStruct((splits, num_rows), jnp.float32),
  ]
  present = [a for a in args if a is not None]
  in_specs = [s for s in specs if s is not None]
  aliases = {}
  if poison:  # tests: outputs start as NaN (aliased inputs), so anything left unwritten shows
    aliases = {len(present) + i: i for i in range(3)}
    present += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
    in_specs += out_specs

  def kernel_wrapper(*refs):
    it = iter(refs)
    ins = [None if a is None else next(it) for a in args]
    rest = list(it)
    kernel(*ins, *rest[-3:])

  acc, m, l = pl.pallas_call(
      kernel_wrapper,
      grid=(splits,),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"tq_decode_k{k_bits}{'p' if prod else ''}_v{v_bits}_d{head_dim}",
  )(*present)
  return acc, m, l


# ----------------------------------------------------------------------------- public entry


def supported(cache) -> tuple[bool, str]:
  """(True, "") if the kernel handles this cache's config, else (False, reason)."""
  cfg = cache.config
  if cfg.outlier_channels:
    return False, f"outlier_channels={cfg.outlier_channels} (the kernel has no outlier-channel path)"
  if cfg.head_dim not in HEAD_DIMS:
    return False, f"head_dim={cfg.head_dim} not in {HEAD_DIMS}"
  kq, vq = cache.k.quantizer, cache.v.quantizer
  for name, tq in (("keys", kq), ("values", vq)):
    b = tq.codebook.bits if tq.codebook is not None else 0
    if not 1 <= b <= MAX_CODE_BITS:
      return False, f"{name} use {b} codebook bits; the kernel handles 1..{MAX_CODE_BITS}"
  if kq.qjl is not None and kq.qjl.sketch_dim != cfg.head_dim:
    return False, f"QJL sketch dim {kq.qjl.sketch_dim} != head_dim {cfg.head_dim}"
  return True, ""


def default_block_k(head_dim: int, seq_len: int) -> int:
  """Slots per block: 64 up to head_dim 128, else 32, halved (not below 16) while longer than seq_len."""
  bk = 64 if head_dim <= 128 else 32
  while bk > 16 and bk > seq_len:
    bk //= 2
  return bk


def default_num_splits(batch: int, kv_heads: int, seq_len: int, block_k: int) -> int:
  """Enough programs to fill ~132 SMs several times over, with ≥ 4 blocks per split."""
  num_blocks = pl.cdiv(seq_len, block_k)
  want = max(1, pl.cdiv(1024, batch * kv_heads))
  return max(1, min(want, num_blocks // 4 if num_blocks >= 4 else 1))


@functools.partial(
    jax.jit,
    static_argnames=(
        "soft_cap", "block_k", "num_splits", "num_warps", "num_stages", "interpret", "dot_dtype",
        "poison"),
)
def decode_partial(
    cache,  # tqjax.cache.KVCache without outlier channels
    pq,  # tqjax.partials.PreparedQuery: q [B, K, G, T, D], sq [B, K, G, T, D] (prod), offset [B, K, G, T]
    lo,  # [B, T] int32: first attended slot per query token
    hi,  # [B, T] int32: one past the last attended slot
    soft_cap: float | None = None,
    *,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
    dot_dtype: str = "float32",
    poison: bool = False,
):
  """The fused kernel under the contract of `tqjax.partials.compressed_partial_reference`.

  Returns (accs, m, l): accs = (acc [B, K, G, T, D],) unnormalized in the value rotated space,
  m, l [B, K, G, T]; an empty range gives m = −inf, l = 0, acc = 0. block_k, num_splits,
  num_warps, num_stages: Triton's tiling (None: the defaults here); dot_dtype: "float32" (tf32
  dots) or "bfloat16" (split operands); interpret: Pallas interpret mode (any backend); poison: a
  test switch, outputs start as NaN (aliased inputs) so that anything left unwritten shows.
  """
  ok, why = supported(cache)
  if not ok:
    raise ValueError(f"the Pallas GPU decode kernel does not support this cache: {why}")
  if dot_dtype not in DOT_DTYPES:
    raise ValueError(f"{dot_dtype=} must be one of {DOT_DTYPES}")
  b, kh, g, t, d = pq.q[0].shape
  rows = g * t
  if rows > MAX_ROWS:
    raise ValueError(f"G·T = {g}·{t} = {rows} query rows per kv head exceed {MAX_ROWS=}")
  rows_p = max(16, 1 << (rows - 1).bit_length())  # Triton dots need M ≥ 16
  kq, vq = cache.k.quantizer, cache.v.quantizer
  k_bits, v_bits = kq.codebook.bits, vq.codebook.bits
  seq = cache.capacity
  kc, kn = cache.k.main.codes, cache.k.main.norms
  vc, vn = cache.v.main.codes, cache.v.main.norms
  ks, kr = cache.k.main.qjl_signs, cache.k.main.residual_norms
  if seq < 16:  # Triton dots need N ≥ 16: pad tiny caches (their padding is never attended)
    pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, 0), (0, 16 - seq)] + [(0, 0)] * (x.ndim - 3))
    kc, kn, vc, vn, ks, kr = map(pad, (kc, kn, vc, vn, ks, kr))
    seq = 16
  if block_k is None:
    block_k = default_block_k(d, seq)
  if block_k < 16 or block_k & (block_k - 1) or block_k > seq:
    raise ValueError(f"{block_k=} must be a power of two in [16, {seq=}]")
  if num_splits is None:
    num_splits = default_num_splits(b, kh, seq, block_k)
  if num_warps is None:
    num_warps = 4 if block_k * d <= 8192 else 8

  def rows_of(x):  # [B, K, G, T, ...] → [B, K, Rp, ...] zero-padded
    x = x.reshape(b, kh, rows, *x.shape[4:])
    return jnp.pad(x, [(0, 0), (0, 0), (0, rows_p - rows)] + [(0, 0)] * (x.ndim - 3))

  q = rows_of(to_column_major(pq.q[0].astype(jnp.float32)))
  sq = None
  if kq.qjl is not None:
    coef = 1.0 / (kq.qjl.kappa * kq.qjl.sketch_dim)
    sq = rows_of(to_column_major(pq.sq[0].astype(jnp.float32) * jnp.float32(coef)))
  offset = rows_of(pq.offset.astype(jnp.float32))
  row_range = lambda x, fill: jnp.pad(
      jnp.broadcast_to(x.astype(jnp.int32)[:, None, None, :], (b, kh, g, t)).reshape(b, kh, rows),
      [(0, 0), (0, 0), (0, rows_p - rows)], constant_values=fill)
  lo_r, hi_r = row_range(lo, seq), row_range(hi, 0)

  inner = functools.partial(
      _decode_unbatched,
      num_rows=rows,
      k_bits=k_bits,
      v_bits=v_bits,
      k_coeffs=_odd_poly(lloyd_max(k_bits, kq.codebook.dim)[0]),
      v_coeffs=_odd_poly(lloyd_max(v_bits, vq.codebook.dim)[0]),
      soft_cap=None if soft_cap is None else float(soft_cap),
      block_k=block_k,
      num_splits=num_splits,
      num_warps=num_warps,
      num_stages=num_stages,
      interpret=interpret,
      dot_dtype=dot_dtype,
      poison=poison,
  )
  acc, m, l = jax.vmap(jax.vmap(inner))(q, sq, offset, lo_r, hi_r, kc, kn, ks, kr, vc, vn)
  acc, m_all, l_all = merge_splits(acc, m, l)
  acc = from_column_major(acc).reshape(b, kh, g, t, d)
  return (acc,), m_all.reshape(b, kh, g, t), l_all.reshape(b, kh, g, t)


def merge_splits(acc, m, l):
  """Flash-decoding merge of per-split partials: acc [..., splits, R, D], m, l [..., splits, R]
  → (acc [..., R, D], m [..., R], l [..., R]); splits with m = −inf contribute nothing."""
  m_all = jnp.max(m, axis=-2)
  m_all = lax.optimization_barrier(m_all)  # as in JAX's decode_attention: avoids NaNs after jit
  m_safe = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  w = jnp.where(m == -jnp.inf, 0.0, jnp.exp(m - m_safe[..., None, :]))
  return jnp.sum(acc * w[..., None], axis=-3), m_all, jnp.sum(l * w, axis=-2)


def decode_partial_reference(cache, pq, lo, hi, soft_cap=None):
  """Plain-jnp reference of `decode_partial`: the tqjax oracle itself (float32, HIGHEST dots)."""
  return compressed_partial_reference(cache, pq, lo, hi, soft_cap)
