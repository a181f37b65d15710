"""Fused decode attention on Hopper GPUs (Pallas Mosaic GPU) over the packed TurboQuant cache.

The contract of `tqjax.partials.compressed_partial_reference` (`decode_partial_reference` here; the
Triton kernel `decode_attention_gpu` handles every config this one does not) for: mse or prod
keys and mse values of 1-4 codebook bits (prod: a QJL sketch of head_dim rows), head_dim 64, 128
or 256, no outlier channels, at most 8 query rows (G·T) per kv head. Tuned by `DecodeTuning`, a
static argument of `decode_partial`.

Per (batch·kv head, split of the sequence) one CTA (one warpgroup) streams blocks of packed
key/value codes and norms through a TMA pipeline of `stages` blocks (all of a block's copies on
one barrier). Each of its four warps owns `tiles` 16-token tiles of every block (tokens
64t + 16w .. 64t + 16w + 15 of tile t: by default two tiles of a 128-token block at D = 64 and
128, one of a 64-token block at D = 256) and runs its own online softmax with warp-level
`mma.sync` m16n8k16 (inline PTX, `pallas_kernels.ptx`): no shared-memory staging and no
cross-warp barrier inside a block but the one that frees the stage slot for its refill. At
D = 256 a thread holds two 128-coordinate halves of each of its tokens (packed columns c and
c + 4), each dequantized and multiplied as a whole D = 128 token is; at D = 64 it holds half of
one packed column (slots 16·(c // 2) .. + 15 of column c % 2, `dequant.half_words`). Code arrays
are read as TMA rows of up to eight tokens (`_tokens_per_row`: narrow rows stream slowly; rows
are multiples of 16 bytes, so at D = 64 codes of 2 or 6 words per token need at least two).

* Dequantization by byte permutes, in registers, straight into the mma operand layout
  (`pallas_kernels.dequant`, in the kernel coordinate order `dequant.kernel_perm`).
* Keys (`_key_dot`): per warp and tile logitsᵀ [16 tokens, 8] = K̂ [16, D] · qᵀ in float16, D/16
  mma k-steps, the ≤ 8 query rows padded to 8 (the mma N) and scaled per row by a power of two,
  their B fragments built once per CTA from the float32 rows of the rotation's output
  (`_prepare_query`; references `float16_rows`, `q_fragments`); × q scale × key norms,
  + offset, soft cap, masking of slots outside [lo, hi) (a last block reaching past S gets zeros
  from TMA, masked too). Prod keys add their QJL estimate of q·r: the sign words are a 1-bit
  row, expanded into ±1 (`dequant.SIGN_TABLE`) for a second float16 dot against S·q/(κ·m), × the
  residual norms.
* Online softmax per warp: its running max moves only when a logit of its 16·tiles tokens
  exceeds it by more than `max_slack` (one vote), then by three rounds of shuffles
  (`_running_max`); l is kept per thread. Without a soft cap exp is approximate (ex2.approx).
* Values (`_value_dot`): V̂ [16, D] of a tile is dequantized the same way (bfloat16), each 8×8 tile
  transposed in registers (`movmatrix`) into the A fragments of V̂ᵀ; p·‖v‖ (bfloat16) likewise
  into the B fragment; accᵀ [D, 8] += V̂ᵀ · p·‖v‖ by D/16 mma (one per 16 columns), each warp
  into its own accumulator, rescaled only when the warp's max moved.
* At the end the four warps' partials are merged: m and l by Pallas reductions, acc through
  shared memory (`_warp_sum`).
* Splits are merged in the kernel (flash-decoding): every split but the last stores its
  partial (acc, m, l) to global memory and signals a semaphore of its (batch, kv head); the last
  split waits for the others and merges them, `merge_unroll` partials per memory round trip. The
  kernel coordinate order is undone in XLA.
* Pallas' automatic barriers around shared-memory stores and TMA issues are off
  (`unsafe_no_auto_barriers`): the one barrier per block (`commit_smem`) orders the slot refill.

Measurements behind the defaults: `DecodeTuning`'s field comments and docs/kernels.md; the decode
benchmark: README ("Decode speed").

Letters: B batch, K kv heads, G query heads per kv head, T query tokens, R = G·T rows, S cache
slots, D = 64, 128 or 256, W = D/32 packed columns, BK = `DecodeTuning.block_tokens(D)` tokens per
block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import ptx
from pallas_kernels.dequant import BITS, HEAD_DIMS, QUAD, SIGN_TABLE, byte_tables, expand, half_words, kernel_perm
from pallas_kernels.numerics import float16_row_scales
from tqjax import packing
from tqjax.partials import compressed_partial_reference

__all__ = ["DEFAULT_TILES", "MAX_ROWS", "DecodeTuning", "decode_partial", "decode_partial_reference",
           "default_num_splits", "float16_rows", "par_tables", "q_fragments", "supported"]

# 16-token tiles (the mma M of the key dot, the K of the value dot) per warp and block, per
# head_dim (H200, pipelined same-run A/B, 2026-11-29; register counts of those builds).
# * D = 128, two: per call 6-9 % faster than one for mse keys and 4-5 % for prod keys at S = 32k
#   and 128k (twice the independent work between a block's shuffles and barrier; 126 registers,
#   138 for prod keys; compiled for a 3001-slot cache: 128 for K3/V3, 136 for K4/V4, 141 for
#   prod keys, i.e. 4, 3 and 3 CTAs per SM; the count moves with the split count).
#   Three: 3 % slower for K3/V3, 1 % faster for prod keys; four: 8-9 % slower (158 / 178
#   registers: 3 CTAs per SM). Two stages of 128 tokens keep K3/V3 at 4 CTAs per SM.
# * D = 256 (twice the accumulator per thread), one: 5 % faster than two for K3/V3 at S = 16k,
#   2-3 % for K4/V4 and prod keys (139-147 against 169-186 registers); three stages instead of
#   two: 9 % slower for K3/V3, 3 % for prod keys, ±0 for K4/V4.
# * D = 64, two: 107-126 registers (154-194 with four). Four against two: within the harness'
#   noise for mse keys, 2-8 % slower for prod keys at S = 32k (two runs).
DEFAULT_TILES = {64: 2, 128: 2, 256: 1}
MAX_ROWS = 8  # G·T query rows per kv head: the mma N of both dots


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
  """How `decode_partial` runs the kernel (a static argument: each value compiles its own kernel).
  The defaults are the fastest measured forms; the other values are the A/B alternatives.

  stages: pipeline depth, blocks in flight per CTA.
  tiles: 16-token tiles per warp and block; None: `DEFAULT_TILES[D]`.
  num_splits: CTAs per (batch, kv head) along the sequence; None: `default_num_splits`.
  merge_unroll: split partials the merging CTA loads at once (one memory latency per group).
  key_chains: independent `mma.sync` accumulators of the key dot (shorter dependent chains).
  edge_masks_only: masks (slots outside a row's [lo, hi), and a masked slot's p·‖v‖) only in the
    blocks that reach past some real row's range: a block-uniform branch (`lax.cond`) saves the
    compares and selects (~40 ALU instructions per block and warp at K3/V3) everywhere else.
    Padded rows are then unmasked there, harmlessly (their q is zero and they are dropped).
    False: masks in every block.
  max_slack: how far a logit may exceed the running max before it moves (`_running_max`):
    p ≤ e^max_slack; None: the exact max every block.
  """

  stages: int = 2
  tiles: int | None = None
  num_splits: int | None = None
  merge_unroll: int = 4
  key_chains: int = 2
  edge_masks_only: bool = True
  max_slack: float | None = 4.0

  def __post_init__(self):
    for name in ("stages", "merge_unroll", "key_chains"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int ≥ 1")
    for name in ("tiles", "num_splits"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} must be None or an int ≥ 1")
    if not isinstance(self.edge_masks_only, bool):
      raise ValueError(f"edge_masks_only={self.edge_masks_only!r} must be a bool")
    if self.max_slack is not None and (isinstance(self.max_slack, bool) or not isinstance(self.max_slack, (int, float))
                                       or not 0 <= self.max_slack < math.inf):
      raise ValueError(f"max_slack={self.max_slack!r} must be None or a finite number ≥ 0")

  def tiles_for(self, d: int) -> int:
    """16-token tiles per warp and block at head_dim d."""
    return DEFAULT_TILES[d] if self.tiles is None else self.tiles

  def block_tokens(self, d: int) -> int:
    """BK: tokens per block (and stage) at head_dim d: 64 per tile."""
    return 64 * self.tiles_for(d)


# The rows of par (8 · 4 bytes each). "tables": the key (words 0-3, float16) and value (4-7,
# bfloat16) byte tables of `byte_tables`; "signs": `SIGN_TABLE` (0-3). The kernel loads the tables
# from here (a few shared-memory loads per block) rather than taking them as constants: as
# constants ptxas kept them in uniform registers and copied one into a register before every
# `prmt` (129 `IMAD.U32` per block and warp for K3/V3 at D = 128, 12 % of the loop's
# instructions; loaded, 1.5-2 % faster for K4/V4 and prod keys, neutral for K3/V3).
# "span": words 0, 1 = the largest lo and the smallest hi over the head's real rows: a block inside
# [span[0], span[1]) needs no masks (`DecodeTuning.edge_masks_only`).
_PAR = ("offset", "qscale", "lo", "hi", "sqscale", "tables", "signs", "span")
_MIN_EXPONENT = 9  # float32 exponent field of the smallest row max that `float16_rows` scales (2^-118)


def _min_tokens_per_row(bits: int, d: int) -> int:
  """The fewest tokens per TMA row of a `bits`-row code array at head_dim d (b·d/32 uint32 words
  per token): rows (and the global stride) must be a multiple of 16 bytes, so D = 64 arrays of 2
  or 6 words per token need two tokens per row. The capacity must be a multiple of it."""
  return 4 // math.gcd(4, bits * d // packing.WORD_BITS)


def _tokens_per_row(bits: int, d: int, seq: int) -> int:
  """Tokens per TMA row (a free reshape of the code array) over a capacity of seq slots: the most of
  8, 4, 2, 1 that divides seq and is at least `_min_tokens_per_row`. TMA streams narrow rows
  slowly: with one token per row (48 bytes for K3/V3 at D = 128) the kernel's loads alone, every
  computation left out, took 74 µs at S = 32k, B·K = 64 on an H200 (210 MB: 2.8 TB/s); with
  eight (384 bytes) 54 µs (3.9 TB/s, 92 % of the copy bandwidth)."""
  need = _min_tokens_per_row(bits, d)
  if seq % need:
    raise ValueError(f"capacity {seq} is not a multiple of {need} (tokens per TMA row of {bits}-bit codes at D = {d})")
  return next(f for f in (8, 4, 2, 1) if f >= need and seq % f == 0)


def _halves(d: int) -> int:
  """128-coordinate halves of a thread's token (one at D = 64, where it holds half of one)."""
  return max(1, d // 128)


def _token_pairs(words_ref, bits: int, tables, ops, tile: int, half: int, d: int):
  """The thread's two tokens of a block's 16-token tile (rows 64·tile + 16·warp + lane / 4 + 8h,
  h = 0, 1) expanded in one 128-coordinate half (packed column c + 4·half of the words ref
  [BK / f, f·b·W], f tokens per row: `_tokens_per_row`): pairs[h][k] (i32: two 16-bit values,
  low first) of kernel columns 128·half + 8k + 2c + e. At d = 64 half c // 2 of packed column
  c % 2 (`half_words`), 8 pairs."""
  ir, arith, memref, *_ = ptx.modules()
  index = ir.IndexType.get()
  w = d // packing.WORD_BITS
  per_token = bits * w
  f = ir.MemRefType(words_ref.type).shape[1] // per_token
  col, row0 = ptx.thread_coords(ops)
  if half:
    col = arith.addi(col, ops.const(QUAD * half))
  if w < QUAD:
    h, col = arith.shrui(col, ops.const(1)), arith.andi(col, ops.const(1))
    shift = arith.shli(h, ops.const(4))
  if f > 1:  # the thread's tokens are all ≡ row0 (mod f) (f | 8 | 64·tile + 8h): one column offset
    col = arith.addi(col, arith.muli(arith.remui(row0, ops.const(f)), ops.const(per_token)))
  out = []
  for th in range(2):
    token = arith.addi(row0, ops.const(64 * tile + 8 * th))
    row = arith.index_cast(index, arith.divui(token, ops.const(f)) if f > 1 else token)
    load = lambda offset: memref.load(words_ref, [row, arith.index_cast(index, arith.addi(col, offset))])
    if w < QUAD:
      words = half_words(lambda a, b: load(arith.addi(arith.muli(h, ops.const(a * w)), ops.const(b * w))),
                          bits, shift, ops)
      out.append(expand(words, bits, tables, ops, 16))
    else:
      out.append(expand([load(ops.const(r * w)) for r in range(bits)], bits, tables, ops))
  return out


def _key_dot(bits: int, table_at: tuple[str, int], part: int, d: int, tuning: DecodeTuning):
  """inline_mgpu function: (words ref [BK / f, f·b·W] uint32 (`_token_pairs`), qf ref
  [P, d/32, 32, 4] uint32, par ref [8, 8] int32) → [BK, 8] float32 (WGMMA layout): each of a
  warp's 16-token tiles of the block, expanded in float16 from the byte table at `table_at` (par
  row name, first word: `_load_table`), times qᵀ, the float16 B fragments qf[part]
  (`q_fragments`), by d/16 `mma.sync` (k = 16 columns each). The A fragment of k-step j of half u
  is the thread's pairs 2j and 2j + 1 of both its tokens of the tile in that half."""
  bk = tuning.block_tokens(d)

  @plgpu.inline_mgpu(
      arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((bk, MAX_ROWS), jnp.float32, layout=plgpu.Layout.WGMMA),
  )
  def dot(ctx, words_ref, qf_ref, par_ref):
    del ctx
    ir, arith, _, vector, mgpu_utils, _ = ptx.modules()
    ops = ptx.MlirOps()
    index, i32 = ir.IndexType.get(), ir.IntegerType.get_signless(32)
    tab = _load_table(par_ref, *table_at)
    lane = arith.index_cast(index, arith.remui(mgpu_utils.thread_idx(), ops.const(32)))
    at = lambda i: arith.constant(index, i)
    qv = [vector.load(ir.VectorType.get((4,), i32), qf_ref, [at(part), at(v), lane, at(0)]) for v in range(d // 32)]
    qw = [vector.extract(qv[i // 4], [], [i % 4]) for i in range(d // 8)]  # word 2·(k-step) + e
    zero = arith.constant(ir.F32Type.get(), 0.0)
    tot = []
    for tile in range(tuning.tiles_for(d)):
      d_acc = [[zero] * 4 for _ in range(tuning.key_chains)]  # independent accumulators: shorter dependent chains
      for u in range(_halves(d)):
        pairs = _token_pairs(words_ref, bits, tab, ops, tile, u, d)
        steps = len(pairs[0]) // 2  # k-steps per half: 16 columns each
        for j in range(steps):
          a = [pairs[0][2 * j], pairs[1][2 * j], pairs[0][2 * j + 1], pairs[1][2 * j + 1]]
          step = steps * u + j
          chain = step % tuning.key_chains
          d_acc[chain] = ptx.mma("f16", a, [qw[2 * step], qw[2 * step + 1]], d_acc[chain])
      tot.append([functools.reduce(arith.addf, [x[e] for x in d_acc]) for e in range(4)])
    return ptx.fragment(lambda t, h: tot[t][2 * h:2 * h + 2], (bk, MAX_ROWS))

  return dot


def _load_table(par_ref, name: str, first: int):
  """The four words of a byte table (`table_words`) from par row `name`, words first .. first + 3."""
  ir, arith, memref, *_ = ptx.modules()
  at = lambda i: arith.constant(ir.IndexType.get(), i)
  return [memref.load(par_ref, [at(_PAR.index(name)), at(first + i)]) for i in range(4)]


def par_tables(k_bits: int, v_bits: int, d: int) -> np.ndarray:
  """[2, 8] int32: par rows "tables" (key float16, value bfloat16 byte tables) and "signs"."""
  words = lambda ws: np.asarray(ws, np.uint32).view(np.int32)
  tables = words(byte_tables(k_bits, np.float16, d) + byte_tables(v_bits, ml_dtypes.bfloat16, d))
  return np.stack([tables, np.pad(words(SIGN_TABLE), (0, 4))])


def _value_dot(bits: int, table_at: tuple[str, int], d: int, tuning: DecodeTuning):
  """inline_mgpu function: (words ref [BK / f, f·b·W] uint32, pv [BK, 8] bfloat16, corr [BK, 8] f32,
  acc [4·d, 8] f32, par ref [8, 8] int32) → acc·corr + V̂ᵀ·pv per warp (all WGMMA layout). acc
  row 64i + 16w + r is warp w's accumulator of kernel column 16i + r: each warp sums its own
  tokens. For each of the warp's 16-token tiles, V̂ (bfloat16 from the byte table at `table_at`,
  as `_key_dot`; one 128-coordinate half at a time) and pv are transposed in registers
  (`_transpose8`) into the A fragments of V̂ᵀ [16 columns, 16 tokens] and the B fragment of pv
  [16 tokens, 8 rows]: d/16 `mma.sync`, one per 16 columns. corr: the warp's rescaling of its
  accumulator (equal in a warp's rows; skipped when it is 1 in every lane)."""

  @plgpu.inline_mgpu(
      arg_types=(plgpu.RefType(), plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((4 * d, MAX_ROWS), jnp.float32, layout=plgpu.Layout.WGMMA),
  )
  def dot(ctx, words_ref, pv, corr, acc, par_ref):
    del ctx
    ir, arith, *_, mgpu_utils, _ = ptx.modules()
    from jax._src.lib.mlir.dialects import scf  # noqa: PLC0415

    ops = ptx.MlirOps()
    i32 = ir.IntegerType.get_signless(32)
    tab = _load_table(par_ref, *table_at)
    cr = ptx.elems(corr, 0, 0)
    old = [x for i in range(d // 16) for h in range(2) for x in ptx.elems(acc, i, h)]  # [i][h][e]
    # Rescaled only when the warp's max moved (corr ≠ 1 somewhere in the warp): rarely, after
    # the first blocks. d/4 multiplies per thread skipped; the branch is warp-uniform.
    one = arith.constant(ir.F32Type.get(), 1.0)
    unchanged = [arith.cmpf(arith.CmpFPredicate.OEQ, x, one) for x in cr]
    branch = scf.IfOp(ptx.warp_all(arith.andi(*unchanged)), [x.type for x in old], has_else=True)
    with ir.InsertionPoint(branch.then_block):
      scf.yield_(old)
    with ir.InsertionPoint(branch.else_block):
      scf.yield_([arith.mulf(x, cr[j % 2]) for j, x in enumerate(old)])
    out = [list(branch.results)[4 * i:4 * i + 4] for i in range(d // 16)]
    for tile in range(tuning.tiles_for(d)):
      for u in range(_halves(d)):
        pairs = _token_pairs(words_ref, bits, tab, ops, tile, u, d)
        steps = len(pairs[0]) // 2  # mma per half: 16 columns each
        # vt[h][k]: column 128u + 8k + t / 4, tokens 8h + 2(t % 4) of the tile
        vt = [[ptx.transpose8(x) for x in pairs[h]] for h in range(2)]
        if u == 0:
          b = [ptx.transpose8(mgpu_utils.bitcast(pv.registers[tile, 0, 0, 0, h, 0, 0, 0, 0], i32)) for h in range(2)]
        a = [[vt[0][2 * i], vt[0][2 * i + 1], vt[1][2 * i], vt[1][2 * i + 1]] for i in range(steps)]
        out[steps * u:steps * u + steps] = [ptx.mma("bf16", a[i], b, out[steps * u + i]) for i in range(steps)]
    return ptx.fragment(lambda t, h: out[t][2 * h:2 * h + 2], (4 * d, MAX_ROWS))

  return dot


def _running_max(s, m, max_slack: float | None):
  """The warp's new running max: s [BK, 8] float32 (the block's logits), m [BK, 8] (the running max,
  equal in a warp's rows; −inf before the first token), both WGMMA layout → [BK, 8]. m itself
  while no logit of the warp exceeds it by more than max_slack (one vote; NaN counts as
  exceeding), else max(m, the warp's column max): the thread's maximum over its tiles, then three
  rounds of butterfly shuffles over the lanes of a column pair (NaN propagates). Not always the
  exact max, which the online softmax does not need: exp(s − m) ≤ e^max_slack, and the merge of
  warps and splits weighs each partial by its own m. Most blocks skip the shuffles and the
  accumulator's rescale (corr = 1). max_slack = None: the exact max every block."""

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA),
      return_type=plgpu.ShapeDtypeStruct(s.shape, jnp.float32, layout=plgpu.Layout.WGMMA),
  )
  def running_max(ctx, s, m):
    del ctx
    ir, arith, *_, mgpu_utils, _ = ptx.modules()
    from jax._src.lib.mlir.dialects import scf  # noqa: PLC0415

    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    regs = [ptx.elems(s, t, h) for t in range(s.shape[0] // 64) for h in range(2)]
    x = [functools.reduce(arith.maximumf, [r[e] for r in regs]) for e in range(2)]
    old = ptx.elems(m, 0, 0)
    if max_slack is None:
      need = arith.constant(ir.IntegerType.get_signless(1), 1)
    else:
      slack = arith.constant(f32, float(max_slack))
      over = [arith.cmpf(arith.CmpFPredicate.UGT, x[e], arith.addf(old[e], slack)) for e in range(2)]
      need = ptx.warp_any(arith.ori(*over))
    branch = scf.IfOp(need, [f32, f32], has_else=True)
    with ir.InsertionPoint(branch.then_block):
      ops = ptx.MlirOps()  # its constants stay in this region
      y = list(x)
      for lanes in (4, 8, 16):
        for e in range(2):
          z = ptx.butterfly(arith.bitcast(i32, y[e]), lanes, ops)
          y[e] = arith.maximumf(y[e], arith.bitcast(f32, z))
      scf.yield_([arith.maximumf(old[e], y[e]) for e in range(2)])
    with ir.InsertionPoint(branch.else_block):
      scf.yield_(old)
    new = list(branch.results)
    return ptx.fragment(lambda t, h: new, s.shape)

  return running_max(s, m)


def _warp_sum(d: int):
  """inline_mgpu function: (acc [4·d, 8] (`_value_dot`), w [BK, 8] per-warp weights (equal in a
  warp's rows), scratch [4, d, 8] float32 SMEM) → Σ over warps of acc·w [d, 8] (WGMMA layout),
  through shared memory."""

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((d, MAX_ROWS), jnp.float32, layout=plgpu.Layout.WGMMA),
  )
  def warp_sum(ctx, acc, w, scratch):
    del ctx
    ir, arith, _, vector, mgpu_utils, _ = ptx.modules()
    ops = ptx.MlirOps()
    index, f32 = ir.IndexType.get(), ir.F32Type.get()
    c, row0 = ptx.thread_coords(ops)
    warp = arith.divui(row0, ops.const(16))
    g = arith.remui(row0, ops.const(16))
    ix = lambda v: arith.index_cast(index, v)
    col = ix(arith.muli(c, ops.const(2)))
    wr = ptx.elems(w, 0, 0)
    for i in range(d // 16):
      for h in range(2):
        vals = [arith.mulf(x, wr[e]) for e, x in enumerate(ptx.elems(acc, i, h))]
        vec = vector.from_elements(ir.VectorType.get((2,), f32), vals)
        vector.store(vec, scratch, [ix(warp), ix(arith.addi(g, ops.const(16 * i + 8 * h))), col])
    mgpu_utils.warpgroup_barrier()
    out = {}
    for t in range(d // 64):
      for h in range(2):
        r = ix(arith.addi(row0, ops.const(64 * t + 8 * h)))
        vals = [vector.load(ir.VectorType.get((2,), f32), scratch, [arith.constant(index, v), r, col]) for v in range(4)]
        tot = functools.reduce(arith.addf, vals)
        out[t, h] = [vector.extract(tot, [], [e]) for e in range(2)]
    mgpu_utils.warpgroup_barrier()  # every thread is done with the scratch before it is reused
    return ptx.fragment(lambda t, h: out[t, h], (d, MAX_ROWS))

  return warp_sum


def _prepare_query(parts):
  """inline_mgpu function: (q refs [R, D] float32 (one per part), qf ref [P, D/32, 32, 4] uint32,
  par ref [8, 8] int32, all SMEM) → None. parts: (bits, coef) per part, P of them (the query; for
  prod keys also S·q with coef 1/(κ·m)). Warp p turns part p·coef (natural coordinate order, rows ≥
  R zero) into float16 rows at a power-of-two scale per row (`float16_rows`, its reference) in
  kernel order (`kernel_perm(bits, D)`) and stores them as the B fragments that `q_fragments` lays
  out, qf[p]; the scales go to par row `_PAR.index("qscale")` (part 0) or "sqscale" (part 1). Lane
  4g + c gathers the coordinates `kernel_perm` gives its fragment words (kernel columns
  128u + 8k + 2c + e) of row g; the row max is a maximum over the 4 lanes of a row. Ends with a
  warpgroup barrier."""

  @plgpu.inline_mgpu(arg_types=(tuple(plgpu.RefType() for _ in parts), plgpu.RefType(), plgpu.RefType()))
  def prepare(ctx, q_refs, qf_ref, par_ref):
    del ctx
    ir, arith, memref, vector, mgpu_utils, _ = ptx.modules()
    from jax._src.lib.mlir.dialects import scf  # noqa: PLC0415

    ops = ptx.MlirOps()
    index, i32, f32 = ir.IndexType.get(), ir.IntegerType.get_signless(32), ir.F32Type.get()
    ix = lambda v: arith.index_cast(index, v)
    tid = arith.remui(mgpu_utils.thread_idx(), ops.const(128))
    warp, lane = arith.divui(tid, ops.const(32)), arith.remui(tid, ops.const(32))
    g, c = arith.divui(lane, ops.const(4)), arith.remui(lane, ops.const(QUAD))
    mine = [arith.cmpi(arith.CmpIPredicate.eq, warp, ops.const(p)) for p in range(len(parts))]
    for p, ((bits, coef), q_ref) in enumerate(zip(parts, q_refs)):
      branch = scf.IfOp(mine[p])
      with ir.InsertionPoint(branch.then_block):
        ops = ptx.MlirOps()  # constants made in this region stay in it (the scale's store index is
        # made in the nested block below and used only there)
        rows, d = ir.MemRefType(q_ref.type).shape
        w = d // packing.WORD_BITS
        real = arith.cmpi(arith.CmpIPredicate.ult, g, ops.const(rows))
        row = ix(arith.minui(g, ops.const(rows - 1)))
        # The thread's coordinates are `kernel_perm` at its columns 128u + 8k + 2c + e: those of
        # thread 0 (columns 128u + 8k + e) plus the thread's base, c (d = 64: 16W·(c // 2) + c % 2).
        base = c
        if w < QUAD:
          base = arith.addi(arith.andi(c, ops.const(1)), arith.muli(arith.shrui(c, ops.const(1)), ops.const(16 * w)))
        perm = kernel_perm(bits, d)
        x = []
        for u in range(_halves(d)):
          for k in range(min(d, 128) // 8):
            for e in range(2):
              v = memref.load(q_ref, [row, ix(arith.addi(base, ops.const(int(perm[128 * u + 8 * k + e]))))])
              if coef != 1.0:
                v = arith.mulf(v, arith.constant(f32, coef))
              x.append(arith.select(real, arith.bitcast(i32, v), ops.const(0)))
        # max |x| on the bit patterns: with the sign bit cleared integer order is float order,
        # and NaN sorts above +inf, so a row holding NaN or ±inf gets exponent field 255.
        amax = functools.reduce(arith.maxui, [ops.band(e, ops.const(0x7FFFFFFF)) for e in x])
        for lanes in (1, 2):
          y = ptx.butterfly(amax, lanes, ops)
          amax = arith.maxui(amax, y)
        expo = ops.shr(amax, 23)  # max |x| ∈ [2^(E−127), 2^(E−126)): scale 2^(E−135), |x / scale| < 512
        ok = arith.andi(arith.cmpi(arith.CmpIPredicate.uge, expo, ops.const(_MIN_EXPONENT)),
                        arith.cmpi(arith.CmpIPredicate.ule, expo, ops.const(254)))
        one = ops.const(0x3F800000)
        scale = arith.select(ok, ops.shl(arith.subi(expo, ops.const(8)), 23), one)
        inv = arith.bitcast(f32, arith.select(ok, ops.shl(arith.subi(ops.const(262), expo), 23), one))
        y = [arith.mulf(arith.bitcast(f32, e), inv) for e in x]  # exact: a power of two, no overflow
        words = [mgpu_utils.inline_ptx("cvt.rn.f16x2.f32 $0, $1, $2;", y[2 * k + 1], y[2 * k], result_types=i32)
                 for k in range(d // 8)]  # word k = 2j + e: kernel columns 16j + 8e + 2c + (0, 1)
        for v in range(d // 32):
          vec = vector.from_elements(ir.VectorType.get((4,), i32), words[4 * v:4 * v + 4])
          vector.store(vec, qf_ref, [ix(ops.const(p)), ix(ops.const(v)), ix(lane), ix(ops.const(0))])
        first = scf.IfOp(arith.cmpi(arith.CmpIPredicate.eq, c, ops.const(0)))
        with ir.InsertionPoint(first.then_block):
          memref.store(scale, par_ref, [ix(ops.const(_PAR.index(("qscale", "sqscale")[p]))), ix(g)])
          scf.yield_([])
        scf.yield_([])
    mgpu_utils.warpgroup_barrier()

  return prepare


# ----------------------------------------------------------------------------- the kernel


def _decode_call(q, par, kc, kn, vc, vn, ks=None, kr=None, sq=None, *, k_bits, v_bits, qjl_coef, soft_cap,
                 num_splits, tuning):
  """q [N, R, D] float32: the query rows (natural order; R ≤ 8), par [N, 8, 8] int32 (`_PAR`):
  per row offset (float32 bits), lo, hi; the byte tables (`par_tables`); the rest zero (the kernel
  writes the scales: `_prepare_query`); kc [N, S, k_bits·W] u32, kn [N, S'], vc [N, S, v_bits·W]
  u32, vn [N, S'], and for prod keys the QJL signs ks [N, S, W] u32, residual norms kr [N, S']
  and projections sq [N, R, D] float32 (S·q, × qjl_coef in the kernel) (N = B·K, S ≥ BK and a
  multiple of the code arrays' `_min_tokens_per_row`, S' ≥ S: padded norms)
  → acc [N, D, 8] f32 (value kernel order), ml [N, 4, 8] f32 (m, l, and two unused rows: a TMA
  copy moves a multiple of 128 bytes), the splits merged (num_splits of them at most)."""
  n, seq = kc.shape[:2]
  d = q.shape[2]
  bk = tuning.block_tokens(d)
  stages = tuning.stages
  nblocks = pl.cdiv(seq, bk)
  per_split = pl.cdiv(nblocks, num_splits)
  splits = pl.cdiv(nblocks, per_split)
  prod = ks is not None
  key_dot = _key_dot(k_bits, ("tables", 0), 0, d, tuning)
  sign_dot = _key_dot(1, ("signs", 0), 1, d, tuning)
  value_dot = _value_dot(v_bits, ("tables", 4), d, tuning)
  streams = 6 if prod else 4  # per stage: kc, kn, vc, vn (, ks, kr), all on one barrier
  parts = ((k_bits, 1.0),) + (((1, qjl_coef),) if prod else ())
  as_rows = lambda x, b: x.reshape(n, seq // _tokens_per_row(b, d, seq), -1)  # free
  kc, vc = as_rows(kc, k_bits), as_rows(vc, v_bits)
  ks = as_rows(ks, 1) if prod else None
  inputs = (q, par, kc, kn, vc, vn) + ((ks, kr, sq) if prod else ())
  block_rows = [bk * x.shape[1] // seq if x.ndim == 3 else bk for x in inputs[2:2 + streams]]  # per stream
  prepare_query = _prepare_query(parts)
  L = plgpu.Layout
  R = MAX_ROWS

  def tq_decode_mgpu(*refs):
    n_in = len(inputs)
    q_gmem, par_gmem, *stage_gmem = refs[:streams + 2]
    query_gmem = (q_gmem, *refs[streams + 2:n_in])  # q (, sq)
    acc_gmem, ml_gmem = refs[n_in:n_in + 2]
    scratch = refs[n_in + (2 if splits == 1 else 4):]
    query_smem, (qf_smem, par_smem, q_bar), stage_smem, bars = (
        scratch[:len(parts)], scratch[len(parts):len(parts) + 3], scratch[len(parts) + 3:-1], scratch[-1])
    kc_smem, kn_smem, vc_smem, vn_smem = stage_smem[:4]
    bh = lax.axis_index("bh")
    split = lax.axis_index("split")
    first = split * per_split
    steps = jnp.minimum(first + per_split, nblocks) - first
    for src, dst in zip(query_gmem + (par_gmem,), (*query_smem, par_smem)):
      plgpu.copy_gmem_to_smem(src.at[bh], dst, q_bar.at[0])

    def fetch(i, slot):
      rows = {r: pl.ds((first + i) * r, r) for r in sorted(set(block_rows))}  # past the end TMA reads zeros
      for src, dst, r in zip(stage_gmem, stage_smem, block_rows):  # (masked below)
        plgpu.copy_gmem_to_smem(src.at[bh, rows[r]], dst.at[slot], bars.at[slot])

    for i in range(stages):
      pl.when(i < steps)(functools.partial(fetch, i, i))
    plgpu.barrier_wait(q_bar.at[0])
    prepare_query(tuple(query_smem), qf_smem, par_smem)
    par = {name: plgpu.load(par_smem.at[_PAR.index(name)], layout=L.WGMMA.reduce(0))
           for name in ("offset", "qscale", "lo", "hi", "sqscale")}
    f32 = lambda x: lax.bitcast_convert_type(x, jnp.float32)
    offset, qscale, lo, hi, sqscale = (f32(par["offset"]), f32(par["qscale"]), par["lo"], par["hi"],
                                       f32(par["sqscale"]))
    span_lo, span_hi = par_smem[_PAR.index("span"), 0], par_smem[_PAR.index("span"), 1]
    shape = (bk, R)
    col = lambda x: lax.broadcast_in_dim(x, shape, [1])
    row = lambda x: lax.broadcast_in_dim(x, shape, [0])
    iota = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=L.WGMMA)
    norm = lambda ref, slot: plgpu.load(ref.at[slot], layout=L.WGMMA.reduce(1)).astype(jnp.float32)

    def logits(slot):
      """[BK, R] float32 q·k̂ (+ the QJL estimate of q·r for prod keys), before the key norms."""
      s = key_dot(kc_smem.at[slot], qf_smem, par_smem) * col(qscale)
      if not prod:
        return s
      return s + sign_dot(stage_smem[4].at[slot], qf_smem, par_smem) * col(sqscale) * row(norm(stage_smem[5], slot))

    def step(i, carry):
      """One block: each warp runs its own online softmax over its tokens (m [BK, R] is the
      warp's running max in each of its rows, lpart per thread)."""
      acc, m, lpart = carry
      slot = lax.rem(i, stages)
      start = (first + i) * bk
      plgpu.barrier_wait(bars.at[slot])
      s = logits(slot) * row(norm(kn_smem, slot)) + col(offset)
      if soft_cap is not None:
        s = jnp.float32(soft_cap) * jnp.tanh(s * jnp.float32(1.0 / soft_cap))
      inside = (start >= span_lo) & (start + bk <= span_hi) if tuning.edge_masks_only else jnp.bool_(False)

      def masked(x, fill):
        """x with fill in the slots outside their row's [lo, hi) (hi ≤ S: the zeros past the end
        never count); x itself in a block inside every real row's range."""
        def mask(x):
          slots = iota + start
          return jnp.where((slots >= col(lo)) & (slots < col(hi)), x, fill)

        return lax.cond(inside, lambda x: x, mask, x) if tuning.edge_masks_only else mask(x)

      s = masked(s, -jnp.inf)
      m_new = _running_max(s, m, tuning.max_slack)
      m_safe = _zero_if_empty(m_new)
      p = jnp.exp(s - m_safe)
      corr = jnp.exp(jnp.where(m == -jnp.inf, m_safe, m) - m_safe)
      lpart = lpart * corr + p
      pv = masked(p * row(norm(vn_smem, slot)), 0.0)  # a masked slot's norm may be NaN
      acc = value_dot(vc_smem.at[slot], pv.astype(jnp.bfloat16), corr, acc, par_smem)
      plgpu.commit_smem()  # every thread is done with this slot's codes and norms: refill it
      pl.when(i + stages < steps)(functools.partial(fetch, i + stages, slot))
      return acc, m_new, lpart

    acc0 = plgpu.layout_cast(jnp.zeros((4 * d, R), jnp.float32), L.WGMMA)
    m0 = plgpu.layout_cast(jnp.full(shape, -jnp.inf, jnp.float32), L.WGMMA)
    l0 = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), L.WGMMA)
    acc, m_warp, lpart = lax.fori_loop(0, steps, step, (acc0, m0, l0))
    # The warps' partials, merged: weights exp(m_warp − m), m the max over warps.
    m = jnp.max(m_warp, axis=0)
    w = jnp.exp(m_warp - col(_zero_if_empty(m)))  # a warp with m_warp = −inf: 0
    l = jnp.sum(lpart * w, axis=0)
    acc = pl.run_scoped(functools.partial(_warp_sum(d), acc, w), plgpu.SMEM((4, d, R), jnp.float32))

    def store(acc, m, l):
      """acc [D, R], m, l [R] (this head's result) → acc_gmem, ml_gmem, through shared memory."""
      def run(out_smem, ml_smem):
        out_smem[...] = acc
        ml_smem[0] = m
        ml_smem[1] = l
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, acc_gmem.at[bh])
        plgpu.copy_smem_to_gmem(ml_smem, ml_gmem.at[bh])
        plgpu.wait_smem_to_gmem(0)

      pl.run_scoped(run, plgpu.SMEM((d, R), jnp.float32), plgpu.SMEM((4, R), jnp.float32))

    if splits == 1:
      store(acc, m, l)
      return
    # Flash-decoding merge in the kernel: splits 0 .. last − 1 publish their partials to global
    # memory and signal a semaphore of their (batch, kv head); the last split waits for all of
    # them and merges. Pallas launches the grid reversed (blockIdx.x = split): a head's splits
    # have consecutive linear block indices and its last split the highest. CTAs are dispatched
    # in linear order (not documented by CUDA; CUTLASS's serial split-K relies on it too), so
    # every CTA the last split waits for was started before it and never waits itself.
    part_acc, part_ml = refs[n_in + 2:n_in + 4]
    sem = pl.get_global(plgpu.SemaphoreType.REGULAR((n,)))  # zeroed by every call
    last = splits - 1

    @pl.when(split < last)
    def _publish():  # acc [D, R], m, l [R] → part_acc, part_ml[bh, split]; then signal
      part_acc.at[bh, split][...] = acc
      part_ml.at[bh, split, 0][...] = m
      part_ml.at[bh, split, 1][...] = l
      # Every thread's stores precede the barrier, which precedes one thread's cumulative
      # release (red.release.gpu); the last split acquires it (CAS, fence.acquire.gpu, barrier).
      plgpu.commit_smem()
      plgpu.semaphore_signal(sem.at[bh], memory_scope="gpu")

    @pl.when(split == last)
    def _merge():  # part_acc [N, last, D, R], part_ml [N, last, 2, R] + this split's → store
      plgpu.semaphore_wait(sem.at[bh], last, memory_scope="gpu")  # acquire; zero again after
      cols = lambda x: lax.broadcast_in_dim(x, (d, R), [1])

      def add(carry, first_split, count):
        """carry (acc [D, R], m, l [R]) with partials first_split .. + count − 1 merged in, all
        their loads issued first."""
        acc, m, l = carry
        parts = []
        for j in range(count):
          ml_s = part_ml.at[bh, first_split + j]
          parts.append((plgpu.load(part_acc.at[bh, first_split + j], layout=L.WGMMA, optimized=False),
                        plgpu.load(ml_s.at[0], layout=L.WGMMA.reduce(0), optimized=False),
                        plgpu.load(ml_s.at[1], layout=L.WGMMA.reduce(0), optimized=False)))
        m_new = functools.reduce(jnp.maximum, [m_s for _, m_s, _ in parts], m)
        m_safe = _zero_if_empty(m_new)  # all −inf: every weight exp(−inf) = 0
        w = jnp.exp(m - m_safe)
        acc, l = acc * cols(w), l * w
        for acc_s, m_s, l_s in parts:
          w_s = jnp.exp(m_s - m_safe)
          acc, l = acc + acc_s * cols(w_s), l + l_s * w_s
        return acc, m_new, l

      # `merge_unroll` partials per step: one memory latency per step, not per partial.
      unroll = tuning.merge_unroll
      carry = lax.fori_loop(0, last // unroll, lambda c, x: add(x, c * unroll, unroll), (acc, m, l))
      if last % unroll:
        carry = add(carry, last - last % unroll, last % unroll)
      store(*carry)

  stage_types = [plgpu.SMEM((stages, r, x.shape[2]), x.dtype) if x.ndim == 3 else plgpu.SMEM((stages, r), x.dtype)
                 for x, r in zip(inputs[2:2 + streams], block_rows)]
  run = plgpu.kernel(
      tq_decode_mgpu,
      out_type=(jax.ShapeDtypeStruct((n, d, R), jnp.float32), jax.ShapeDtypeStruct((n, 4, R), jnp.float32))
      + ((jax.ShapeDtypeStruct((n, splits - 1, d, R), jnp.float32),  # partials of the splits
          jax.ShapeDtypeStruct((n, splits - 1, 2, R), jnp.float32)) if splits > 1 else ()),  # before the last
      grid=(n, splits),
      grid_names=("bh", "split"),
      # Approximate math (ex2.approx, ~2^-22 relative) only without a soft cap: it would also
      # approximate tanh (~2^-11 absolute, × the cap on a logit). 2-5 % faster at S = 32k.
      # No automatic barriers around shared-memory stores and TMA issues: the only shared-memory
      # hazard in the loop is a stage slot's refill, ordered by `commit_smem`'s barrier; the
      # scratch after it (`_warp_sum`, `store`) orders itself.
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                           approx_math=soft_cap is None, unsafe_no_auto_barriers=True),
      scratch_types=[
          *(plgpu.SMEM(q.shape[1:], jnp.float32) for _ in parts),
          plgpu.SMEM((len(parts), d // 32, 32, 4), jnp.uint32),  # the B fragments of the query rows
          plgpu.SMEM(par.shape[1:], jnp.int32),
          plgpu.Barrier(num_barriers=1, num_arrivals=len(parts) + 1),
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
  if cfg.head_dim not in HEAD_DIMS:
    return False, f"head_dim={cfg.head_dim} (the Mosaic GPU decode kernel does {HEAD_DIMS})"
  for name, tq in (("keys", cache.k.quantizer), ("values", cache.v.quantizer)):
    if tq.config.mse_bits not in BITS:
      return False, f"{name} use {tq.config.mse_bits} codebook bits, not in {BITS}"
    if tq.config.variant == "prod" and tq.config.sketch_dim != cfg.head_dim:
      return False, f"{name} use a QJL sketch of {tq.config.sketch_dim} rows, not head_dim={cfg.head_dim}"
  return True, ""


def default_num_splits(heads: int, seq: int, bk: int, ctas: int = 132 * 8) -> int:
  """A power of two near ctas / (B·K), so B·K·splits CTAs fill 132 SMs several deep in even
  splits, each ≥ 4 blocks of bk tokens (16 at B·K = 64: 32 and 64 splits were 2 % and 10 % slower at
  S = 32k on an H200, 2026-11-29, with the merge in the kernel and 64-token blocks; at B·K = 8
  and S = 128k, 32 or 64 splits instead of 128 moved by −5 to +13 % depending on the config,
  within the noise of such calls).
  With 128-token blocks "≥ 4 blocks" halves the splits of short caches (8 at S = 4k, B·K = 64;
  not re-measured there)."""
  nblocks = pl.cdiv(seq, bk)
  want = 1 << (max(1, ctas // heads).bit_length() - 1)
  return max(1, min(want, nblocks // 4 if nblocks >= 4 else 1))


@functools.partial(jax.jit, static_argnames=("soft_cap", "tuning"))
def decode_partial(
    cache,  # tqjax.cache.KVCache that `supported` accepts
    pq,  # tqjax.partials.PreparedQuery: q [B, K, G, T, D], sq [B, K, G, T, D] (prod keys), offset [B, K, G, T]
    lo,  # [B, T] int32: first attended slot per query token
    hi,  # [B, T] int32: one past the last attended slot
    soft_cap: float | None = None,
    *,
    tuning: DecodeTuning = DecodeTuning(),
):
  """The kernel under the contract of `decode_partial_reference`.

  Returns (accs, m, l): accs = (acc [B, K, G, T, D],) unnormalized in the value rotated space,
  m, l [B, K, G, T]; an empty range gives m = −inf, l = 0, acc = 0. m is a running max that may
  lag the largest logit by up to `tuning.max_slack` (`_running_max`); acc and l are relative to it.
  Raises ValueError for a cache `supported` refuses or more than `MAX_ROWS` query rows per kv head.
  """
  if not isinstance(tuning, DecodeTuning):
    raise ValueError(f"tuning={tuning!r} must be a DecodeTuning")
  ok, why = supported(cache)
  if not ok:
    raise ValueError(f"the Mosaic GPU decode kernel does not support this cache: {why}")
  b, kh, g, t, d = pq.q[0].shape
  rows = g * t
  if rows > MAX_ROWS:
    raise ValueError(f"G·T = {g}·{t} = {rows} query rows per kv head exceed {MAX_ROWS=}")
  kq = cache.k.quantizer
  k_bits, v_bits = kq.config.mse_bits, cache.v.quantizer.config.mse_bits
  kc, kn = cache.k.main.codes, cache.k.main.norms
  vc, vn = cache.v.main.codes, cache.v.main.norms
  ks, kr = cache.k.main.qjl_signs, cache.k.main.residual_norms  # prod keys, else None
  prod = kq.qjl is not None
  seq = cache.capacity
  bk = tuning.block_tokens(d)
  # Tiny caches are padded to one block, and a capacity to a multiple of the tokens per TMA row of
  # the code arrays (two for 1- and 3-bit rows at D = 64: `_min_tokens_per_row`); padding slots are
  # never attended. Both copy the cache on every call.
  f = max(_min_tokens_per_row(b, d) for b in (k_bits, v_bits) + ((1,) if prod else ()))
  padded = max(bk, int(pl.cdiv(seq, f)) * f)
  if padded > seq:
    pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 3))
    kc, kn, vc, vn, ks, kr = map(pad, (kc, kn, vc, vn, ks, kr))
    seq = padded
  n = b * kh
  flat = lambda x: x.reshape(n, seq, *x.shape[3:])
  # TMA needs 16-byte row strides: norms of a capacity that is not a multiple of 8 are padded.
  norms = lambda x: jnp.pad(flat(x), [(0, 0), (0, -seq % 8)])
  num_splits = tuning.num_splits or default_num_splits(n, seq, bk)

  def rows_of(x, fill=0):  # [B, K, G, T, ...] → [N, 8, ...]: rows padded to 8
    x = x.reshape(n, rows, *x.shape[4:])
    return jnp.pad(x, [(0, 0), (0, MAX_ROWS - rows)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

  flat_q = lambda x: x.astype(jnp.float32).reshape(n, rows, d)  # free: the rotation's output
  f32_bits = lambda x: lax.bitcast_convert_type(x, jnp.int32)
  rng = lambda x, fill: rows_of(jnp.broadcast_to(x.astype(jnp.int32)[:, None, None, :], (b, kh, g, t)), fill)
  table_rows = {name: jnp.broadcast_to(x, (n, MAX_ROWS)) for name, x in zip(("tables", "signs"),
                                                                             par_tables(k_bits, v_bits, d))}
  span = jnp.stack([jnp.max(lo, axis=1), jnp.min(hi, axis=1)], axis=1).astype(jnp.int32)  # [B, 2]: over T
  span = jnp.pad(jnp.broadcast_to(span[:, None], (b, kh, 2)).reshape(n, 2), [(0, 0), (0, MAX_ROWS - 2)])
  par = {"offset": f32_bits(rows_of(pq.offset.astype(jnp.float32))), "lo": rng(lo, seq), "hi": rng(hi, 0),
         "span": span, **table_rows}
  zeros = jnp.zeros((n, MAX_ROWS), jnp.int32)  # padded rows attend nothing
  par = jnp.stack([par.get(name, zeros) for name in _PAR], axis=1)  # [N, 8, 8]: a TMA copy of 256 bytes
  qjl = (flat(ks), norms(kr), flat_q(pq.sq[0])) if prod else ()
  coef = 1.0 / (kq.qjl.kappa * kq.qjl.sketch_dim) if prod else None  # the QJL term: ‖r‖·(S·q)·signs / (κ·m)
  acc, ml = _decode_call(flat_q(pq.q[0]), par, flat(kc), norms(kn), flat(vc), norms(vn), *qjl, k_bits=k_bits,
                         v_bits=v_bits, qjl_coef=coef, soft_cap=None if soft_cap is None else float(soft_cap),
                         num_splits=num_splits, tuning=tuning)
  m, l = ml[:, 0, :rows], ml[:, 1, :rows]  # [N, R]
  acc = jnp.swapaxes(acc[..., :rows], -1, -2)[..., np.argsort(kernel_perm(v_bits, d))]  # [N, R, D] natural order
  return (acc.reshape(b, kh, g, t, d),), m.reshape(b, kh, g, t), l.reshape(b, kh, g, t)


def q_fragments(q):
  """q [N, P·8, D] float16 (kernel order) → [N, P, D/32, 32, 4] uint32: for each group of 8 rows,
  the B fragments of `mma.sync` m16n8k16 for k-steps j = 0 .. D/16 − 1 (columns 16j .. 16j + 15),
  lane t = 4g + c holding words 2j + e = (q[g, 16j + 8e + 2c], q[g, 16j + 8e + 2c + 1]) (low half
  first), stored as [D/32 vectors, 32 lanes, 4 words] so that a warp's 16-byte loads are
  contiguous. The reference of the layout `_prepare_query` writes in the kernel."""
  n, rows, d = q.shape
  x = q.reshape(n, rows // 8, 8, d // 16, 2, 4, 2)  # (part, g, j, e, c, pair)
  x = lax.bitcast_convert_type(x.transpose(0, 1, 2, 5, 3, 4, 6), jnp.uint32)  # [n, P, g, c, j, e]
  return x.reshape(n, rows // 8, 32, d // 32, 4).transpose(0, 1, 3, 2, 4)


def _zero_if_empty(m):
  """A running max with −inf (nothing attended yet) replaced by 0: the shift of exp(s − ·)."""
  return jnp.where(m == -jnp.inf, 0.0, m)


def float16_rows(q):
  """q [..., D] float32 → (q / scale as float16, scale [...] float32): per row a power of two that
  puts max |q| in [256, 512) (`numerics.float16_row_scales`), so float16 keeps q's relative
  precision (2^-11) at any magnitude; scale 1 for a row whose max |q| is below 2^-118 (zero
  included; it rounds to zero in float16) and for a row holding NaN or ±inf, which stay NaN / ±inf.
  The reference of `_prepare_query`."""
  amax = jnp.max(jnp.abs(q), axis=-1)
  smallest = jnp.float32(2.0 ** (_MIN_EXPONENT - 127))
  ok = jnp.isfinite(amax) & (amax >= smallest)
  up, down = float16_row_scales(amax, smallest)
  up, scale = jnp.where(ok, up, 1.0), jnp.where(ok, down, 1.0)
  return (q * up[..., None]).astype(jnp.float16), scale


def decode_partial_reference(cache, pq, lo, hi, soft_cap=None):
  """Plain-jnp reference of `decode_partial` (same arguments and results, the exact running max):
  the tqjax oracle itself (float32, HIGHEST dots)."""
  return compressed_partial_reference(cache, pq, lo, hi, soft_cap)
