"""MLIR and inline-PTX building blocks of the Mosaic GPU decode kernel (`pallas_kernels.decode_mgpu`):
the `ops` of `pallas_kernels.dequant` as MLIR (`MlirOps`), warp-level `mma.sync` m16n8k16 and
`movmatrix`, warp votes and butterfly shuffles, and the WGMMA register layout of Pallas arrays
inside `plgpu.inline_mgpu` bodies. MLIR modules are imported when a kernel is traced, so this
module imports without a GPU.

A WGMMA-layout array [M, N] (M a multiple of 64) gives thread t of warp w (lane l) the rows
64i + 16w + l / 4 + 8h and columns 8j + 2(l % 4) + e of every 64-row tile i: per warp, the rows
and columns of an `mma.sync` m16n8 fragment (PTX ISA, "Matrix Fragments for mma.m16n8k16").
"""

from __future__ import annotations

import functools

import numpy as np

from pallas_kernels.dequant import QUAD

__all__ = ["MlirOps", "butterfly", "elems", "fragment", "mma", "modules", "thread_coords", "transpose8",
           "warp_all", "warp_any"]


class MlirOps:
  """The `ops` of `pallas_kernels.dequant.expand` as MLIR (arith + PTX prmt), on i32 values."""

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

  def shr_by(self, x, y):
    return self._arith.shrui(x, y)

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


def modules():
  """(ir, arith, memref, vector, mgpu utils, fragmented_array) for the inline_mgpu bodies."""
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.lib.mlir.dialects import arith, memref, vector  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import utils as mgpu_utils  # noqa: PLC0415

  return ir, arith, memref, vector, mgpu_utils, fa


def mma(kind: str, a, b, c):
  """One warp's `mma.sync` m16n8k16 (row.col, float32 accumulator) on `kind` (f16 or bf16)
  operands: a 4 and b 2 i32 registers, c 4 float32 → d 4 float32 (fragments: PTX ISA,
  "Matrix Fragments for mma.m16n8k16")."""
  ir, *_, mgpu_utils, _ = modules()
  f32 = ir.F32Type.get()
  return mgpu_utils.inline_ptx(
      f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
      "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};",
      *a, *b, *c, result_types=[f32] * 4, convergent=True)


def transpose8(x):
  """movmatrix: the warp's 8×8 16-bit matrix (thread t: row t / 4, columns 2(t % 4) + 0, 1 as
  one i32) → its transpose in the same form."""
  ir, *_, mgpu_utils, _ = modules()
  return mgpu_utils.inline_ptx("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", x,
                               result_types=ir.IntegerType.get_signless(32), convergent=True)


def fragment(regs_of, shape):
  """A float32 WGMMA-layout array of `shape` whose register [t, h] is regs_of(t, h) (two f32)."""
  ir, _, _, vector, _, fa = modules()
  f32 = ir.F32Type.get()
  regs = np.empty(fa.WGMMA_LAYOUT.registers_shape(shape), dtype=object)
  for t in range(regs.shape[0]):
    for h in range(2):
      regs[t, 0, 0, 0, h, 0, 0, 0, 0] = vector.from_elements(ir.VectorType.get((2,), f32), list(regs_of(t, h)))
  return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def elems(x, t, h):
  """The two values of register [t, h] of a WGMMA-layout array."""
  *_, vector, _, _ = modules()
  reg = x.registers[t, 0, 0, 0, h, 0, 0, 0, 0]
  return [vector.extract(reg, [], [e]) for e in range(2)]


def _warp_vote(mode: str, pred):
  """i1 → i1: whether pred holds in every (mode "all") or some ("any") lane of the warp (`vote.sync`)."""
  ir, arith, *_, mgpu_utils, _ = modules()
  i32 = ir.IntegerType.get_signless(32)
  out = mgpu_utils.inline_ptx(
      f"{{ .reg .pred p, q; setp.ne.b32 p, $1, 0; vote.sync.{mode}.pred q, p, 0xffffffff; selp.b32 $0, 1, 0, q; }}",
      arith.extui(i32, pred), result_types=i32, convergent=True)
  return arith.cmpi(arith.CmpIPredicate.ne, out, arith.constant(i32, 0))


warp_all = functools.partial(_warp_vote, "all")
warp_any = functools.partial(_warp_vote, "any")


def thread_coords(ops):
  """(column quad c = lane % 4, first row 16·warp + lane / 4) of this thread in a WGMMA-layout
  tile (per warp: the rows and columns of an mma.sync m16n8 fragment)."""
  _, arith, *_, mgpu_utils, _ = modules()
  tid = arith.remui(mgpu_utils.thread_idx(), ops.const(128))
  lane = arith.remui(tid, ops.const(32))
  row0 = arith.addi(arith.muli(arith.divui(tid, ops.const(32)), ops.const(16)), arith.divui(lane, ops.const(4)))
  return arith.remui(lane, ops.const(QUAD)), row0


def butterfly(x, lanes: int, ops):
  """`shfl.sync.bfly` of an i32 value: the value of lane (this lane XOR lanes)."""
  *_, mgpu_utils, _ = modules()
  return mgpu_utils.inline_ptx("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;", x, ops.const(lanes),
                               result_types=x.type, convergent=True)
