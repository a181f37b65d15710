"""Fused decode attention on Hopper GPUs (Pallas Mosaic GPU) over the packed TurboQuant cache.

The contract of `tqjax.cache.compressed_partial_reference` (as `decode_attention_gpu`, the
Triton kernel, which handles every config this one does not) for: mse or prod keys and mse
values of 1-4 codebook bits (prod: a QJL sketch of 128 rows), head_dim 128, no outlier channels,
at most 8 query rows (G·T) per kv head.

Per (batch·kv head, split of the sequence) one CTA (one warpgroup) streams 64-token blocks of
packed key/value codes and norms through a TMA pipeline (all of a block's copies on one
barrier) and keeps an online softmax:

* Dequantization by byte permutes, in registers, straight into the wgmma operand layout. After
  the random rotation any coordinate order is as good as any other, so the kernel picks the one
  in which a thread's 32 coordinates of a token (the columns 8k + 2c + e it holds of a wgmma A
  operand, c = lane % 4) are exactly packed column w = c (`tqjax.packing`): the thread reads
  its b words of the token and no data moves between threads. From them it builds selector
  words holding four codes as nibbles (for 3 bits: the 2-bit fields at nibble positions come
  from one shift and mask; the 1-bit row is spread to even bits once per token), and each PTX
  `prmt` looks up four codes at once in a byte table held in registers: one for the low and one
  for the high bytes of the 16-bit centroids (float16 for keys, bfloat16 for values), two more
  interleave them into pairs (≈ 1.8 instructions per coordinate at 3 bits). 4-bit codes use the
  codebook's symmetry: the magnitude (8 entries) is looked up and the sign is flipped by a third
  `prmt` + XOR.
* Keys: logitsᵀ [64 tokens, 8] = K̂ [64, 128] (A from registers) · qᵀ in float16, the ≤ 8 query
  rows padded to 8 (the wgmma N) and scaled per row by a power of two (`_float16_rows`); × q
  scale × key norms, + offset, soft cap, masking of slots outside [lo, hi) (a last block reaching
  past S gets zeros from TMA, masked too). Prod keys add their QJL estimate of q·r: the sign
  words are a 1-bit row, expanded by the same permutes into ±1 (`SIGN_TABLE`) for a second
  float16 wgmma against S·q/(κ·m), × the residual norms.
* Online softmax over the tokens (a cross-warp max per block); l is kept per thread and reduced
  once at the end. Without a soft cap exp is approximate (ex2.approx).
* Values: V̂ [64, 128] is dequantized the same way (bfloat16) and stored to shared memory; p·‖v‖
  (bfloat16) is stored transposed, pᵀ [8, 64], by hand into its 128-byte-swizzled tile
  (`_store_transposed`); accᵀ [128, 8] += V̂ᵀ · p·‖v‖. That wgmma is left in flight: it runs
  while the next block's keys are dequantized, and the key dot's wait retires it.
* Three warpgroup barriers per block: two in the cross-warp max and `commit_smem`'s (which also
  frees the stage slot for its refill). Pallas' automatic barriers around shared-memory stores
  and TMA issues are off (`unsafe_no_auto_barriers`; 9 barriers per block with them).
* Splits are merged in the kernel (flash-decoding): every split but the last stores its
  partial (acc, m, l) to global memory and signals a semaphore of its (batch, kv head); the last
  split waits for the others and merges them, four partials per memory round trip. The kernel
  coordinate order is undone in XLA.

Status (H200, 2026-11-28, experiments/results/bench_decode_NVIDIA_H200_2026-11-28_pipelined20.md,
20 calls dispatched back to back): at S = 32k, B = 8, Hq = 32, Hkv = 8: K3/V3 165 µs, K4/V4
190 µs, K3 prod/V3 218 µs per call against cuDNN bf16's 268 µs (1.62×, 1.42×, 1.23×). Nsight
Compute puts one K3/V3 launch at 138 µs (96 registers); the rest is XLA glue. Still bound by
issue and latency, each warpgroup running its stages in sequence (kernel_notes.md, sessions 4-7).

Letters: B batch, K kv heads, G query heads per kv head, T query tokens, R = G·T rows, S cache
slots, D = 128, W = D/32 = 4 packed columns, BK = 64 tokens per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.encode_mgpu import _swizzled
from tqjax import packing
from tqjax.codebook import lloyd_max

BK = 64  # tokens per block (the wgmma M of one warpgroup)
HEAD_DIM = 128  # W = 4 packed columns: one per lane of a wgmma fragment's column quad
MAX_ROWS = 8  # G·T query rows per kv head: the wgmma N of both dots
MERGE_UNROLL = 4  # split partials the merging CTA loads at once
BITS = (1, 2, 3, 4)
_W = HEAD_DIM // packing.WORD_BITS


# ----------------------------------------------------------------------------- dequantization
# Written once against an `ops` object, so the same code emits the kernel's MLIR (`_MlirOps`) and
# runs on NumPy uint32 arrays in the CPU tests (`NumpyOps`).


class NumpyOps:
  """uint32 bit operations on NumPy arrays, with PTX `prmt.b32` semantics (default mode)."""

  @staticmethod
  def const(v):
    return np.uint32(v)

  shr = staticmethod(lambda x, n: np.uint32(x) >> np.uint32(n))
  shl = staticmethod(lambda x, n: (np.uint32(x) << np.uint32(n)) & np.uint32(0xFFFFFFFF))
  band = staticmethod(lambda x, y: np.uint32(x) & np.uint32(y))
  bor = staticmethod(lambda x, y: np.uint32(x) | np.uint32(y))
  bxor = staticmethod(lambda x, y: np.uint32(x) ^ np.uint32(y))
  mul = staticmethod(lambda x, k: (np.asarray(x, np.uint64) * np.uint64(k) & np.uint64(0xFFFFFFFF)).astype(np.uint32))

  @staticmethod
  def prmt(a, b, sel):
    """Byte i of the result: byte (sel >> 4i) & 7 of the 8-byte {b, a}; sign-replicated if bit 3."""
    a, b, sel = np.broadcast_arrays(np.asarray(a, np.uint32), np.asarray(b, np.uint32), np.asarray(sel, np.uint32))
    src = np.stack([(a >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)]
                   + [(b >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)])
    out = np.zeros(a.shape, np.uint32)
    for i in range(4):
      nib = (sel >> np.uint32(4 * i)) & np.uint32(0xF)
      byte = np.take_along_axis(src, (nib & np.uint32(7)).astype(np.int64)[None], axis=0)[0]
      byte = np.where(nib & np.uint32(8), np.where(byte & np.uint32(0x80), np.uint32(0xFF), np.uint32(0)), byte)
      out |= byte.astype(np.uint32) << np.uint32(8 * i)
    return out


def _spread_even(x, ops):
  """The 16 low bits of x moved to the even bits: bit s → bit 2s."""
  x = ops.prmt(x, ops.const(0), ops.const(0x4140))  # bytes [x0, 0, x1, 0]
  x = ops.band(ops.bor(x, ops.shl(x, 4)), ops.const(0x0F0F0F0F))
  x = ops.band(ops.bor(x, ops.shl(x, 2)), ops.const(0x33333333))
  return ops.band(ops.bor(x, ops.shl(x, 1)), ops.const(0x55555555))


def _selectors(words, bits: int, ops):
  """Selector words of a token's packed column: list of (word, slots), each word holding the
  codes of 8 slots as nibbles (`slots`, nibble order); for 4 bits, (magnitude index, negative
  flags) pairs instead of codes. words: this column's b packed words, `tqjax.packing` rows."""
  m2, m3 = ops.const(0x33333333), ops.const(0xCCCCCCCC)
  even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
  if bits == 4:
    out = []
    for r, x in enumerate(words):  # row r holds slots 8r + m at nibble m
      neg = ops.band(ops.bxor(ops.shr(x, 3), ops.const(0xFFFFFFFF)), ops.const(0x11111111))
      idx = ops.band(ops.bxor(x, ops.mul(neg, 7)), ops.const(0x77777777))
      out.append(((idx, neg), [8 * r + m for m in range(8)]))
    return out
  if bits == 1:
    (c,) = words
    halves = [_spread_even(c, ops), _spread_even(ops.shr(c, 16), ops)]  # slot s of half h at bit 2s
    out = []
    for h, e in enumerate(halves):
      one = ops.const(0x11111111)
      out += [(ops.band(e, one), [16 * h + s for s in even]), (ops.band(ops.shr(e, 2), one), [16 * h + s for s in odd])]
    return out
  low = words[:2]  # 2-bit rows: slots 16h + m at bits 2m
  tops = None
  if bits == 3:  # the 1-bit row holds code bit 2
    c = words[2]
    tops = [_spread_even(c, ops), _spread_even(ops.shr(c, 16), ops)]
  out = []
  for h, a in enumerate(low):
    x0, x1 = ops.band(a, m2), ops.band(ops.shr(a, 2), m2)  # nibble i: slot 2i / 2i + 1, low bits
    if tops is not None:  # top bit of slot s sits at bit 2s of tops[h]; nibble bit 2 wanted
      x0 = ops.bor(x0, ops.band(ops.shl(tops[h], 2), m3))
      x1 = ops.bor(x1, ops.band(tops[h], m3))
    out += [(x0, [16 * h + s for s in even]), (x1, [16 * h + s for s in odd])]
  return out


def _lookup(sel, tables, ops):
  """Two bf16 pairs (as uint32) of the 4 low nibbles of `sel` (see `_selectors`)."""
  l0, l1, h0, h1 = (ops.const(t) for t in tables)
  if isinstance(sel, tuple):  # 4 bits: magnitude, then the sign by XOR on the high bytes
    idx, neg = sel
    lo, hi = ops.prmt(l0, l1, idx), ops.prmt(h0, h1, idx)
    hi = ops.bxor(hi, ops.prmt(ops.const(0x8000), ops.const(0), neg))
  else:
    lo, hi = ops.prmt(l0, l1, sel), ops.prmt(h0, h1, sel)
  return ops.prmt(lo, hi, ops.const(0x5140)), ops.prmt(lo, hi, ops.const(0x7362))


def expand(words, bits: int, tables, ops):
  """A token's packed column (b words) → 16 bf16 pairs (uint32, low half first): the thread's
  32 wgmma-operand columns 8k + 2c + e in order k = 0..15 (`kernel_slots` gives the slots)."""
  pairs = []
  for sel, _ in _selectors(words, bits, ops):
    shift = (lambda s: (ops.shr(s[0], 16), ops.shr(s[1], 16))) if isinstance(sel, tuple) else (lambda s: ops.shr(s, 16))
    for part in (sel, shift(sel)):
      pairs += list(_lookup(part, tables, ops))
  return pairs


def kernel_slots(bits: int) -> np.ndarray:
  """slots [32]: the thread's operand column 8k + 2c + e holds slot slots[2k + e] of column c."""
  out = []
  for _, slots in _selectors([np.uint32(0)] * bits, bits, NumpyOps):
    out += slots
  return np.asarray(out)


def kernel_perm(bits: int) -> np.ndarray:
  """perm [D]: kernel coordinate j = 8k + 2c + e is natural coordinate perm[j] = slot·W + c."""
  slots = kernel_slots(bits)
  perm = np.empty(HEAD_DIM, np.int64)
  for k in range(16):
    for c in range(_W):
      for e in range(2):
        perm[8 * k + 2 * c + e] = slots[2 * k + e] * _W + c
  return perm


def byte_tables(bits: int, dtype, dim: int = HEAD_DIM) -> tuple[int, int, int, int]:
  """The lookup table of the `bits`-bit codebook in `dtype` (bfloat16 or float16): the codebook
  (b ≤ 3, zero-padded to 8 entries) or its 8 non-negative magnitudes (b = 4; the sign is the top
  bit of the high byte in both dtypes). See `table_words`."""
  c = np.asarray(lloyd_max(bits, dim)[0], np.float64)
  if bits == 4:
    if not np.allclose(c[8:], -c[7::-1], rtol=1e-12, atol=0):
      raise AssertionError("the 4-bit codebook is not symmetric")
    c = c[8:]
  return table_words(c, dtype)


def table_words(values, dtype) -> tuple[int, int, int, int]:
  """(lo bytes of entries 0-3, of 4-7, hi bytes of 0-3, of 4-7) of ≤ 8 `values` in the 16-bit
  `dtype`, zero-padded to 8 entries: the four registers `_lookup` permutes."""
  values = np.asarray(values, np.float64)
  u16 = np.zeros(8, np.uint16)
  u16[: values.size] = values.astype(np.float32).astype(dtype).view(np.uint16)
  lo, hi = (u16 & 0xFF).astype(np.uint32), (u16 >> 8).astype(np.uint32)
  word = lambda b: int(b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24))
  return word(lo[:4]), word(lo[4:]), word(hi[:4]), word(hi[4:])


SIGN_TABLE = table_words([-1.0, 1.0], np.float16)  # QJL sign bits 0 / 1 → −1 / +1 (1-bit `expand`)


class _MlirOps:
  """The `ops` of `expand` as MLIR (arith + PTX prmt), on i32 values."""

  def __init__(self):
    from jax._src.lib.mlir import ir  # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith  # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mgpu_utils  # noqa: PLC0415

    self._arith, self._utils = arith, mgpu_utils
    self._i32 = ir.IntegerType.get_signless(32)
    self._consts = {}

  def const(self, v):
    v = int(v) & 0xFFFFFFFF
    if v not in self._consts:
      self._consts[v] = self._arith.constant(self._i32, v - (1 << 32) if v >= 1 << 31 else v)
    return self._consts[v]

  def shr(self, x, n):
    return self._arith.shrui(x, self.const(n))

  def shl(self, x, n):
    return self._arith.shli(x, self.const(n))

  def band(self, x, y):
    return self._arith.andi(x, y)

  def bor(self, x, y):
    return self._arith.ori(x, y)

  def bxor(self, x, y):
    return self._arith.xori(x, y)

  def mul(self, x, k):
    return self._arith.muli(x, self.const(k))

  def prmt(self, a, b, sel):
    return self._utils.inline_ptx("prmt.b32 $0, $1, $2, $3;", a, b, sel, result_types=self._i32)


def _dequantizer(bits: int, dtype, tables):
  """inline_mgpu function: words ref [BK, b·W] uint32 (SMEM) → [BK, D] `dtype` (bfloat16 or
  float16) in the WGMMA layout, columns in kernel order (`kernel_perm`), values from `tables`."""

  @plgpu.inline_mgpu(
      arg_types=(plgpu.RefType(),),
      return_type=plgpu.ShapeDtypeStruct((BK, HEAD_DIM), dtype, layout=plgpu.Layout.WGMMA),
  )
  def dequant(ctx, words_ref):
    del ctx
    from jax._src.lib.mlir import ir  # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, memref  # noqa: PLC0415
    from jax.experimental.mosaic.gpu import fragmented_array as fa  # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mgpu_utils  # noqa: PLC0415

    ops = _MlirOps()
    index = ir.IndexType.get()
    col, row0 = _thread_coords(ops)
    pair_ty = ir.VectorType.get((2,), mgpu_utils.dtype_to_ir_type(dtype))
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((BK, HEAD_DIM)), dtype=object)
    for h in range(2):  # rows r and r + 8 of the warp's 16
      row = arith.index_cast(index, arith.addi(row0, ops.const(8 * h)))
      words = [
          memref.load(words_ref, [row, arith.index_cast(index, arith.addi(col, ops.const(r * _W)))])
          for r in range(bits)
      ]
      for k, pair in enumerate(expand(words, bits, tables, ops)):
        regs[0, k, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(pair, pair_ty)
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

  return dequant


def _thread_coords(ops):
  """(column quad c = lane % 4, first row 16·warp + lane / 4) of this thread in a WGMMA tile."""
  from jax._src.lib.mlir.dialects import arith  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # noqa: PLC0415

  tid = arith.remui(mgpu_utils.thread_idx(), ops.const(128))
  lane = arith.remui(tid, ops.const(32))
  row0 = arith.addi(arith.muli(arith.divui(tid, ops.const(32)), ops.const(16)), arith.divui(lane, ops.const(4)))
  return arith.remui(lane, ops.const(_W)), row0


_PT_TRANSFORMS = _swizzled(BK)  # pᵀ [8, BK] bfloat16: 128-byte rows, 128-byte swizzle (`swizzle128_column`)


def swizzle128_column(row, col, ops):
  """Column of element (row, col) of a 16-bit tile with 128-byte rows as stored under a 128-byte
  swizzle (`SwizzleTransform(128)`, what wgmma reads): 16-byte chunk col / 8 is XORed with row % 8."""
  return ops.bor(ops.shl(ops.bxor(ops.shr(col, 3), ops.band(row, ops.const(7))), 3), ops.band(col, ops.const(7)))


@plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(transforms=_PT_TRANSFORMS)))
def _store_transposed(ctx, p, pt_ref):
  """p [BK, 8] bfloat16 (WGMMA layout) → pt_ref [8, BK] (tiled [1, 1, 8, BK], 128-byte swizzle):
  each thread writes its 4 values to their transposed, swizzled places."""
  del ctx
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import arith, memref, vector  # noqa: PLC0415

  ops = _MlirOps()
  index = ir.IndexType.get()
  c, row0 = _thread_coords(ops)
  zero = arith.constant(index, 0)
  for h in range(2):
    t = arith.addi(row0, ops.const(8 * h))
    pair = p.registers[0, 0, 0, 0, h, 0, 0, 0, 0]
    for e in range(2):
      r = arith.addi(arith.muli(c, ops.const(2)), ops.const(e))
      tcol = swizzle128_column(r, t, ops)
      val = vector.extract(pair, [], [e])
      memref.store(val, pt_ref, [zero, zero, arith.index_cast(index, r), arith.index_cast(index, tcol)])


@plgpu.inline_mgpu()
def _fence_gpu(ctx):
  """`fence.acq_rel.gpu` in every thread: its earlier global stores are ordered before its later
  ones GPU-wide (here: before a semaphore signal another CTA acquires)."""
  del ctx
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # noqa: PLC0415

  mgpu_utils.inline_ptx("fence.acq_rel.gpu;", has_side_effects=True)


# ----------------------------------------------------------------------------- the kernel


def _decode_call(q, par, kc, kn, vc, vn, ks=None, kr=None, *, k_bits, v_bits, soft_cap, num_splits, stages):
  """q [N, 8 or 16, D] float16 (kernel order; rows scaled by powers of two; rows 8-15: the QJL
  projections S·q of prod keys), par [N, 8, 8] int32 per row: offset, q scale (float32 bits),
  lo, hi, S·q scale (float32 bits), unused; kc [N, S, bk·W] u32, kn [N, S'], vc [N, S, bv·W] u32,
  vn [N, S'], and for prod keys the QJL signs ks [N, S, W] u32 and residual norms kr [N, S']
  (N = B·K, S ≥ BK, S' ≥ S: padded norms) → acc [N, D, 8] f32 (value kernel order), ml [N, 4, 8]
  f32 (m, l, and two unused rows: a TMA copy moves a multiple of 128 bytes), the splits merged."""
  n, seq = kc.shape[:2]
  nblocks = pl.cdiv(seq, BK)
  per_split = pl.cdiv(nblocks, num_splits)
  splits = pl.cdiv(nblocks, per_split)
  prod = ks is not None
  deq_k = _dequantizer(k_bits, jnp.float16, byte_tables(k_bits, np.float16))
  deq_v = _dequantizer(v_bits, jnp.bfloat16, byte_tables(v_bits, ml_dtypes.bfloat16))
  deq_s = _dequantizer(1, jnp.float16, SIGN_TABLE)
  streams = 6 if prod else 4  # per stage: kc, kn, vc, vn (, ks, kr), all on one barrier
  L = plgpu.Layout
  R = MAX_ROWS

  def tq_decode_mgpu(*refs):
    n_in = streams + 2
    q_gmem, par_gmem, *stage_gmem = refs[:n_in]
    acc_gmem, ml_gmem = refs[n_in:n_in + 2]
    q_smem, par_smem, const_bar, *stage_smem, bars = refs[n_in + (2 if splits == 1 else 4):]
    kc_smem, kn_smem, vc_smem, vn_smem = stage_smem[:4]
    bh = lax.axis_index("bh")
    split = lax.axis_index("split")
    first = split * per_split
    steps = jnp.minimum(first + per_split, nblocks) - first
    plgpu.copy_gmem_to_smem(q_gmem.at[bh], q_smem, const_bar.at[0])
    plgpu.copy_gmem_to_smem(par_gmem.at[bh], par_smem, const_bar.at[1])

    def fetch(i, slot):
      rows = pl.ds((first + i) * BK, BK)  # past the end TMA reads zeros (masked below)
      for src, dst in zip(stage_gmem, stage_smem):
        plgpu.copy_gmem_to_smem(src.at[bh, rows], dst.at[slot], bars.at[slot])

    for i in range(stages):
      pl.when(i < steps)(functools.partial(fetch, i, i))
    for b in range(2):
      plgpu.barrier_wait(const_bar.at[b])
    par = [plgpu.load(par_smem.at[r], layout=L.WGMMA.reduce(0)) for r in range(5)]
    f32 = lambda x: lax.bitcast_convert_type(x, jnp.float32)
    offset, qscale, lo, hi, sqscale = f32(par[0]), f32(par[1]), par[2], par[3], f32(par[4])
    shape = (BK, R)
    col = lambda x: lax.broadcast_in_dim(x, shape, [1])
    row = lambda x: lax.broadcast_in_dim(x, shape, [0])
    iota = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=L.WGMMA)
    norm = lambda ref, slot: plgpu.load(ref.at[slot], layout=L.WGMMA.reduce(1)).astype(jnp.float32)

    def logits(slot):
      """[BK, R] float32 q·k̂ (+ the QJL estimate of q·r for prod keys), before the key norms."""

      def dot(operand, rows):  # against rows 0-7 (q) or 8-15 (S·q) of q_smem; waits for every wgmma
        def run(acc_ref):
          plgpu.wgmma(acc_ref, operand, q_smem.at[pl.ds(rows * R, R)].T)
          return acc_ref[...]
        return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

      s = dot(deq_k(kc_smem.at[slot]), 0) * col(qscale)  # also retires the previous value dot
      if not prod:
        return s
      # The signs are expanded after the key dot's wait, so K̂'s registers are free by then.
      return s + dot(deq_s(stage_smem[4].at[slot]), 1) * col(sqscale) * row(norm(stage_smem[5], slot))

    def blocks(acc_ref, vd_smem, pt_smem):
      """The online softmax over this split's blocks; returns m, lpart (acc_ref holds acc)."""

      def step(i, carry):
        m, lpart = carry
        slot = lax.rem(i, stages)
        start = (first + i) * BK
        plgpu.barrier_wait(bars.at[slot])
        s = logits(slot) * row(norm(kn_smem, slot)) + col(offset)
        if soft_cap is not None:
          s = jnp.float32(soft_cap) * jnp.tanh(s * jnp.float32(1.0 / soft_cap))
        slots = iota + start
        ok = (slots >= col(lo)) & (slots < col(hi))  # hi ≤ S: the zeros past the end never count
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=0))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - col(m_safe))
        corr = jnp.exp(jnp.where(m == -jnp.inf, m_safe, m) - m_safe)
        lpart = lpart * col(corr) + p
        pv = jnp.where(ok, p * row(norm(vn_smem, slot)), 0.0)  # where: a masked slot's norm may be NaN
        vd_smem[...] = deq_v(vc_smem.at[slot])  # the previous value dot is done: the key dot waited
        _store_transposed(pv.astype(jnp.bfloat16), pt_smem)
        plgpu.commit_smem()  # every thread is done with this slot's codes and norms: refill it
        pl.when(i + stages < steps)(functools.partial(fetch, i + stages, slot))
        acc_ref[...] = acc_ref[...] * lax.broadcast_in_dim(corr, (HEAD_DIM, R), [1])
        plgpu.wgmma(acc_ref, vd_smem.T, pt_smem.T)  # left in flight: overlaps the next key dequantization
        return m_new, lpart

      acc_ref[...] = plgpu.layout_cast(jnp.zeros((HEAD_DIM, R), jnp.float32), L.WGMMA)
      m0 = plgpu.layout_cast(jnp.full((R,), -jnp.inf, jnp.float32), L.WGMMA.reduce(0))
      l0 = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), L.WGMMA)
      return lax.fori_loop(0, steps, step, (m0, l0))

    def loop(acc_ref):
      m, lpart = pl.run_scoped(functools.partial(blocks, acc_ref),
                               plgpu.SMEM((BK, HEAD_DIM), jnp.bfloat16, transforms=_swizzled(HEAD_DIM)),
                               plgpu.SMEM((R, BK), jnp.bfloat16, transforms=_PT_TRANSFORMS))
      return acc_ref[...], m, lpart

    acc, m, lpart = pl.run_scoped(loop, plgpu.ACC((HEAD_DIM, R), jnp.float32))
    l = jnp.sum(lpart, axis=0)

    def store(acc, m, l):  # in the shared memory the value tiles used
      def run(out_smem, ml_smem):
        out_smem[...] = acc
        ml_smem[0] = m
        ml_smem[1] = l
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, acc_gmem.at[bh])
        plgpu.copy_smem_to_gmem(ml_smem, ml_gmem.at[bh])
        plgpu.wait_smem_to_gmem(0)

      pl.run_scoped(run, plgpu.SMEM((HEAD_DIM, R), jnp.float32), plgpu.SMEM((4, R), jnp.float32))

    if splits == 1:
      store(acc, m, l)
      return
    # Flash-decoding merge in the kernel: splits 0 .. last − 1 publish their partials to global
    # memory and signal a semaphore of their (batch, kv head); the last split waits for all of
    # them and merges. CTAs start in grid order, split after split, so every CTA the last split
    # waits for was started before it and never waits itself: no deadlock.
    part_acc, part_ml = refs[n_in + 2:n_in + 4]
    sem = pl.get_global(plgpu.SemaphoreType.REGULAR((n,)))  # zeroed by every call
    last = splits - 1

    @pl.when(split < last)
    def _publish():
      part_acc.at[bh, split][...] = acc
      part_ml.at[bh, split, 0][...] = m
      part_ml.at[bh, split, 1][...] = l
      _fence_gpu()  # this thread's stores are visible GPU-wide before ...
      plgpu.commit_smem()  # ... every thread has reached this barrier, then one thread signals
      plgpu.semaphore_signal(sem.at[bh], memory_scope="gpu")

    @pl.when(split == last)
    def _merge():
      plgpu.semaphore_wait(sem.at[bh], last, memory_scope="gpu")  # acquire; zero again after
      cols = lambda x: lax.broadcast_in_dim(x, (HEAD_DIM, R), [1])

      def add(carry, first_split, count):
        """Merges partials first_split .. + count − 1 into carry, all loads issued first."""
        acc, m, l = carry
        parts = []
        for j in range(count):
          ml_s = part_ml.at[bh, first_split + j]
          parts.append((plgpu.load(part_acc.at[bh, first_split + j], layout=L.WGMMA, optimized=False),
                        plgpu.load(ml_s.at[0], layout=L.WGMMA.reduce(0), optimized=False),
                        plgpu.load(ml_s.at[1], layout=L.WGMMA.reduce(0), optimized=False)))
        m_new = functools.reduce(jnp.maximum, [m_s for _, m_s, _ in parts], m)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all −inf: every weight exp(−inf) = 0
        w = jnp.exp(m - m_safe)
        acc, l = acc * cols(w), l * w
        for acc_s, m_s, l_s in parts:
          w_s = jnp.exp(m_s - m_safe)
          acc, l = acc + acc_s * cols(w_s), l + l_s * w_s
        return acc, m_new, l

      # MERGE_UNROLL partials per step: one memory latency per step, not per partial.
      carry = lax.fori_loop(0, last // MERGE_UNROLL, lambda c, x: add(x, c * MERGE_UNROLL, MERGE_UNROLL), (acc, m, l))
      if last % MERGE_UNROLL:
        carry = add(carry, last - last % MERGE_UNROLL, last % MERGE_UNROLL)
      store(*carry)

  inputs = (q, par, kc, kn, vc, vn) + ((ks, kr) if prod else ())
  stage_types = [plgpu.SMEM((stages, BK, x.shape[2]), x.dtype) if x.ndim == 3 else plgpu.SMEM((stages, BK), x.dtype)
                 for x in inputs[2:]]
  run = plgpu.kernel(
      tq_decode_mgpu,
      out_type=(jax.ShapeDtypeStruct((n, HEAD_DIM, R), jnp.float32), jax.ShapeDtypeStruct((n, 4, R), jnp.float32))
      + ((jax.ShapeDtypeStruct((n, splits - 1, HEAD_DIM, R), jnp.float32),  # partials of the splits
          jax.ShapeDtypeStruct((n, splits - 1, 2, R), jnp.float32)) if splits > 1 else ()),  # before the last
      grid=(n, splits),
      grid_names=("bh", "split"),
      # Approximate math (ex2.approx, ~2^-22 relative) only without a soft cap: it would also
      # approximate tanh (~2^-11 absolute, × the cap on a logit). 2-5 % faster at S = 32k.
      # No automatic barriers around shared-memory stores and TMA issues (6 of the 9 warpgroup
      # barriers per block): the stage slots are refilled after `commit_smem`'s barrier, and the
      # value tiles are rewritten only after the key dot's wait has retired the value dot.
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                           approx_math=soft_cap is None, unsafe_no_auto_barriers=True),
      scratch_types=[
          plgpu.SMEM(q.shape[1:], jnp.float16, transforms=_swizzled(HEAD_DIM)),
          plgpu.SMEM(par.shape[1:], jnp.int32),
          plgpu.Barrier(num_barriers=2),
          *stage_types,
          plgpu.Barrier(num_barriers=stages, num_arrivals=streams),
      ],
  )
  return run(*inputs)[:2]


# ----------------------------------------------------------------------------- public entry


def supported(cache) -> tuple[bool, str]:
  """(True, "") if this kernel handles the cache's config, else (False, reason)."""
  cfg = cache.config
  if cfg.outlier_channels:
    return False, f"outlier_channels={cfg.outlier_channels} (no outlier-channel path)"
  if cfg.head_dim != HEAD_DIM:
    return False, f"head_dim={cfg.head_dim} (the Mosaic GPU decode kernel does {HEAD_DIM})"
  for name, tq in (("keys", cache.k.quantizer), ("values", cache.v.quantizer)):
    if tq.config.mse_bits not in BITS:
      return False, f"{name} use {tq.config.mse_bits} codebook bits, not in {BITS}"
    if tq.config.variant == "prod" and tq.config.sketch_dim != HEAD_DIM:
      return False, f"{name} use a QJL sketch of {tq.config.sketch_dim} rows, not {HEAD_DIM}"
  return True, ""


def default_num_splits(heads: int, seq: int, ctas: int = 132 * 8) -> int:
  """A power of two near ctas / (B·K), so B·K·splits CTAs fill 132 SMs several deep in even
  splits, each ≥ 4 blocks (16 at B·K = 64; 8 and 32 splits were within ±2 % of it at S = 32k on
  an H200, 2026-11-28)."""
  nblocks = pl.cdiv(seq, BK)
  want = 1 << (max(1, ctas // heads).bit_length() - 1)
  return max(1, min(want, nblocks // 4 if nblocks >= 4 else 1))


@functools.partial(jax.jit, static_argnames=("soft_cap", "num_splits", "stages"))
def decode_partial(
    cache,  # tqjax.cache.KVCache that `supported` accepts
    pq,  # tqjax.cache.PreparedQuery: q [B, K, G, T, D], offset [B, K, G, T]
    lo,  # [B, T] int32: first attended slot per query token
    hi,  # [B, T] int32: one past the last attended slot
    soft_cap: float | None = None,
    *,
    num_splits: int | None = None,
    stages: int = 3,
):
  """The kernel under the contract of `tqjax.cache.compressed_partial_reference`.

  Returns (accs, m, l): accs = (acc [B, K, G, T, D],) unnormalized in the value rotated space,
  m, l [B, K, G, T]; an empty range gives m = −inf, l = 0, acc = 0.
  """
  ok, why = supported(cache)
  if not ok:
    raise ValueError(f"the Mosaic GPU decode kernel does not support this cache: {why}")
  b, kh, g, t, d = pq.q[0].shape
  rows = g * t
  if rows > MAX_ROWS:
    raise ValueError(f"G·T = {g}·{t} = {rows} query rows per kv head exceed {MAX_ROWS=}")
  if stages < 1:
    raise ValueError(f"{stages=} must be ≥ 1")
  kq = cache.k.quantizer
  k_bits, v_bits = kq.config.mse_bits, cache.v.quantizer.config.mse_bits
  kc, kn = cache.k.main.codes, cache.k.main.norms
  vc, vn = cache.v.main.codes, cache.v.main.norms
  ks, kr = cache.k.main.qjl_signs, cache.k.main.residual_norms  # prod keys, else None
  prod = kq.qjl is not None
  seq = cache.capacity
  if seq < BK:  # tiny caches: pad to one block (padding slots are never attended)
    pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, 0), (0, BK - seq)] + [(0, 0)] * (x.ndim - 3))
    kc, kn, vc, vn, ks, kr = map(pad, (kc, kn, vc, vn, ks, kr))
    seq = BK
  n = b * kh
  flat = lambda x: x.reshape(n, seq, *x.shape[3:])
  # TMA needs 16-byte row strides: norms of a capacity that is not a multiple of 8 are padded.
  norms = lambda x: jnp.pad(flat(x), [(0, 0), (0, -seq % 8)])
  if num_splits is None:
    num_splits = default_num_splits(n, seq)

  def rows_of(x, fill=0):  # [B, K, G, T, ...] → [N, 8, ...]: rows padded to 8
    x = x.reshape(n, rows, *x.shape[4:])
    return jnp.pad(x, [(0, 0), (0, MAX_ROWS - rows)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

  q, qscale = _float16_rows(rows_of(pq.q[0].astype(jnp.float32)[..., kernel_perm(k_bits)]))
  sqscale = jnp.zeros_like(qscale)
  if prod:  # the QJL term ‖r‖·(S·q)·signs / (κ·m) is a second dot against rows 8-15 of q
    coef = jnp.float32(1.0 / (kq.qjl.kappa * kq.qjl.sketch_dim))
    sq, sqscale = _float16_rows(rows_of(pq.sq[0].astype(jnp.float32)[..., kernel_perm(1)] * coef))
    q = jnp.concatenate([q, sq], axis=1)
  f32_bits = lambda x: lax.bitcast_convert_type(x, jnp.int32)
  rng = lambda x, fill: rows_of(jnp.broadcast_to(x.astype(jnp.int32)[:, None, None, :], (b, kh, g, t)), fill)
  par = [f32_bits(rows_of(pq.offset.astype(jnp.float32))), f32_bits(qscale), rng(lo, seq), rng(hi, 0),
         f32_bits(sqscale)]  # padded rows attend nothing
  par = jnp.stack(par + [jnp.zeros_like(par[0])] * 3, axis=1)  # [N, 8, 8]: a TMA copy of 256 bytes
  qjl = (flat(ks), norms(kr)) if prod else ()
  acc, ml = _decode_call(q, par, flat(kc), norms(kn), flat(vc), norms(vn), *qjl, k_bits=k_bits, v_bits=v_bits,
                         soft_cap=None if soft_cap is None else float(soft_cap), num_splits=num_splits,
                         stages=stages)
  m, l = ml[:, 0, :rows], ml[:, 1, :rows]  # [N, R]
  acc = jnp.swapaxes(acc[..., :rows], -1, -2)[..., np.argsort(kernel_perm(v_bits))]  # [N, R, D] natural order
  return (acc.reshape(b, kh, g, t, d),), m.reshape(b, kh, g, t), l.reshape(b, kh, g, t)


def _float16_rows(q):
  """q [..., D] float32 → (q / scale as float16, scale [...] float32): per row a power of two that
  puts max |q| in [256, 512), so float16 keeps q's relative precision (2^-11) at any magnitude
  (scale 1 for an all-zero row; NaN/Inf stay NaN/Inf)."""
  amax = jnp.max(jnp.abs(q), axis=-1)
  _, e = jnp.frexp(jnp.where(jnp.isfinite(amax) & (amax > 0), amax, 256.0))  # amax = f·2^e, f ∈ [0.5, 1)
  scale = jnp.ldexp(jnp.ones_like(amax), e - 9)
  return (q / scale[..., None]).astype(jnp.float16), scale
