"""Dequantization of packed TurboQuant codes by byte permutes, as the Mosaic GPU decode kernel
(`pallas_kernels.decode_mgpu`) runs it, written once against an `ops` object: `NumpyOps` runs it
on NumPy uint32 arrays (the CPU tests), `pallas_kernels.ptx.MlirOps` emits it as MLIR (arith +
PTX `prmt`) inside the kernel.

After the random rotation any coordinate order is as good as any other, so the kernel picks the
one in which a thread's 32 coordinates of a token in a 128-coordinate half (the columns
8k + 2c + e it holds of an mma A fragment, c = lane % 4) are exactly packed column c
(`tqjax.packing`; at D = 64 16 coordinates, half of one): the thread reads its b words of the
token and no data moves between threads (`kernel_perm` maps this kernel order to the natural
one). From the words it builds selector words holding four codes as nibbles (for 3 bits: the
2-bit fields at nibble positions come from one shift and mask; the 1-bit row is spread to even
bits once per token), and each PTX `prmt` looks up four codes at once in a byte table held in
registers: one for the low and one for the high bytes of the 16-bit centroids (float16 for keys,
bfloat16 for values), two more interleave them into pairs (≈ 1.8 instructions per coordinate at
3 bits). 4-bit codes use the codebook's symmetry: the magnitude (8 entries) is looked up and the
sign is flipped by a third `prmt` + XOR. 1-bit codes (QJL signs, 1-bit codebooks: symmetric too)
need no lookup: one shift brings the bits of two slots to the pair's sign bits, one LOP3 sets
±entry 1 (`_sign_pairs`, ≈ 1 instruction per coordinate).

Letters: D head dim (64, 128 or 256), W = D/32 packed columns, b bits per code.
"""

from __future__ import annotations

import numpy as np

from tqjax import packing
from tqjax.codebook import lloyd_max

__all__ = ["BITS", "HEAD_DIMS", "QUAD", "SIGN_TABLE", "NumpyOps", "byte_tables", "expand", "half_words",
           "kernel_perm", "kernel_slots", "selectors", "table_words"]

HEAD_DIMS = (64, 128, 256)  # a thread's packed columns: c + 4u of every 128-coordinate half u (64: half of c % 2)
BITS = (1, 2, 3, 4)  # code widths `expand` handles
QUAD = 4  # lanes of an mma fragment's column quad: the packed columns of a 128-coordinate half


class NumpyOps:
  """uint32 bit operations on NumPy arrays, with PTX `prmt.b32` semantics (default mode)."""

  @staticmethod
  def const(v):
    return np.uint32(v)

  shr = staticmethod(lambda x, n: np.uint32(x) >> np.uint32(n))
  shr_by = shr
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


def selectors(words, bits: int, ops, slots: int = 32):
  """Selector words of a token's packed column (2-4 bits; 1 bit: `_sign_pairs`): list of (word,
  slots), each word holding the codes of 8 slots as nibbles (`slots`, nibble order); for 4 bits,
  (magnitude index, negative flags) pairs instead of codes. words: this column's b packed words,
  `tqjax.packing` rows; or, with slots = 16, the words of one half of it (slots 16h .. 16h + 15,
  numbered from 0 here) as `half_words` gives them."""
  halves = slots // 16
  m2, m3 = ops.const(0x33333333), ops.const(0xCCCCCCCC)
  even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
  if bits == 4:
    out = []
    for r, x in enumerate(words):  # row r holds slots 8r + m at nibble m
      neg = ops.band(ops.bxor(ops.shr(x, 3), ops.const(0xFFFFFFFF)), ops.const(0x11111111))
      idx = ops.band(ops.bxor(x, ops.mul(neg, 7)), ops.const(0x77777777))
      out.append(((idx, neg), [8 * r + m for m in range(8)]))
    return out
  low = words[:halves]  # 2-bit rows: slots 16h + m at bits 2m
  tops = None
  if bits == 3:  # the 1-bit row holds code bit 2
    c = words[halves]
    tops = [_spread_even(c, ops)] + ([_spread_even(ops.shr(c, 16), ops)] if halves == 2 else [])
  out = []
  for h, a in enumerate(low):
    x0, x1 = ops.band(a, m2), ops.band(ops.shr(a, 2), m2)  # nibble i: slot 2i / 2i + 1, low bits
    if tops is not None:  # top bit of slot s sits at bit 2s of tops[h]; nibble bit 2 wanted
      x0 = ops.bor(x0, ops.band(ops.shl(tops[h], 2), m3))
      x1 = ops.bor(x1, ops.band(tops[h], m3))
    out += [(x0, [16 * h + s for s in even]), (x1, [16 * h + s for s in odd])]
  return out


def _table_regs(tables, ops):
  """The four words of a byte table (`table_words`) as `ops` values: ints (NumPy tests) are made
  constants, values loaded in the kernel (`_load_table`) pass through."""
  return [ops.const(t) if isinstance(t, (int, np.integer)) else t for t in tables]


def _lookup(sel, tables, ops):
  """Two bf16 pairs (as uint32) of the 4 low nibbles of `sel` (see `selectors`)."""
  l0, l1, h0, h1 = _table_regs(tables, ops)
  if isinstance(sel, tuple):  # 4 bits: magnitude, then the sign by XOR on the high bytes
    idx, neg = sel
    lo, hi = ops.prmt(l0, l1, idx), ops.prmt(h0, h1, idx)
    hi = ops.bxor(hi, ops.prmt(ops.const(0x8000), ops.const(0), neg))
  else:
    lo, hi = ops.prmt(l0, l1, sel), ops.prmt(h0, h1, sel)
  return ops.prmt(lo, hi, ops.const(0x5140)), ops.prmt(lo, hi, ops.const(0x7362))


def _sign_pairs(word, tables, ops, slots: int = 32):
  """1-bit codes of a symmetric table (entry 0 = −entry 1: `SIGN_TABLE`, the 1-bit codebooks) →
  slots / 2 pairs: pair p holds slots p (low half) and p + slots / 2 (high half), ±entry 1 by the
  sign bit (bit clear: entry 0). One shift (word bits p and p + 16 to bits 15 and 31) and one
  LOP3 ((~x & 0x80008000) | entry 1 in both halves) per pair; at slots = 16 a `prmt` first moves
  slots 8-15 to bits 16-23."""
  l0, _, h0, _ = _table_regs(tables, ops)
  one = ops.bor(ops.band(ops.shr(l0, 8), ops.const(0xFF)), ops.band(h0, ops.const(0xFF00)))  # entry 1
  both = ops.bor(one, ops.shl(one, 16))
  if slots == 16:
    word = ops.prmt(word, ops.const(0), ops.const(0x4140))  # bytes [slots 0-7, 0, slots 8-15, 0]
  signs = ops.const(0x80008000)
  pairs = []
  for p in range(slots // 2):
    x = ops.shl(word, 15 - p) if p < 15 else word
    pairs.append(ops.bor(ops.band(ops.bxor(x, ops.const(0xFFFFFFFF)), signs), both))
  return pairs


def expand(words, bits: int, tables, ops, slots: int = 32):
  """A token's packed column (b words; or, slots = 16, half of one: `half_words`) → slots / 2
  bf16 pairs (uint32, low half first): the thread's mma-operand columns 8k + 2c + e in order
  k = 0, 1, .. (`kernel_slots` gives the slots)."""
  if bits == 1:
    return _sign_pairs(words[0], tables, ops, slots)
  pairs = []
  for sel, _ in selectors(words, bits, ops, slots):
    shift = (lambda s: (ops.shr(s[0], 16), ops.shr(s[1], 16))) if isinstance(sel, tuple) else (lambda s: ops.shr(s, 16))
    for part in (sel, shift(sel)):
      pairs += list(_lookup(part, tables, ops))
  return pairs


def kernel_slots(bits: int, slots: int = 32) -> np.ndarray:
  """[slots]: the thread's operand column 8k + 2c + e holds slot kernel_slots[2k + e] of its
  packed column (slots = 16: of its half of one, numbered from 0)."""
  if bits == 1:  # `_sign_pairs`
    return np.stack([np.arange(slots // 2), np.arange(slots // 2) + slots // 2], axis=1).reshape(-1)
  out = []
  words = [np.uint32(0)] * bits if slots == 32 else half_words(lambda a, b: np.uint32(0), bits, 0, NumpyOps)
  for _, got in selectors(words, bits, NumpyOps, slots):
    out += got
  return np.asarray(out)


def half_words(word, bits: int, shift, ops):
  """The words of slots 16h .. 16h + 15 of a packed column, as `selectors(..., slots=16)` takes
  them (D = 64: thread c takes half c // 2 of packed column c % 2). word(a, b): the column's packed
  row a·h + b; shift = 16h (`ops.shr_by`). A 2-bit row holds 16 slots (row h), a 4-bit row 8
  (rows 2h, 2h + 1), the 1-bit row 32 (moved down by 16h)."""
  if bits == 4:
    return [word(2, 0), word(2, 1)]
  if bits == 1:
    return [ops.shr_by(word(0, 0), shift)]
  return [word(1, 0)] + ([ops.shr_by(word(0, 2), shift)] if bits == 3 else [])


def kernel_perm(bits: int, d: int) -> np.ndarray:
  """perm [d]: kernel coordinate j → natural coordinate perm[j] = slot·W + column (W = d / 32).
  d ≥ 128: j = 128u + 8k + 2c + e (half u, thread column c) is slot `kernel_slots(bits)`[2k + e]
  of packed column 4u + c; d = 64: j = 8k + 2c + e is slot 16·(c // 2) + `kernel_slots(bits,
  16)`[2k + e] of packed column c % 2."""
  if d not in HEAD_DIMS:
    raise ValueError(f"head_dim={d} is not one of {HEAD_DIMS}")
  w = d // packing.WORD_BITS
  perm = np.empty(d, np.int64)
  if w < QUAD:
    slots = kernel_slots(bits, 16)
    for k in range(8):
      for c in range(QUAD):
        for e in range(2):
          perm[8 * k + 2 * c + e] = (16 * (c // 2) + slots[2 * k + e]) * w + c % 2
    return perm
  slots = kernel_slots(bits)
  for u in range(d // 128):
    for k in range(16):
      for c in range(QUAD):
        for e in range(2):
          perm[128 * u + 8 * k + 2 * c + e] = slots[2 * k + e] * w + QUAD * u + c
  return perm


def byte_tables(bits: int, dtype, dim: int) -> tuple[int, int, int, int]:
  """The lookup table of the `bits`-bit codebook in `dtype` (bfloat16 or float16): the codebook
  (b ≤ 3, zero-padded to 8 entries; b = 1 read by `_sign_pairs`) or its 8 non-negative magnitudes
  (b = 4; the sign is the top bit of the high byte in both dtypes). See `table_words`."""
  c = np.asarray(lloyd_max(bits, dim)[0], np.float64)
  if bits in (1, 4) and not np.allclose(c[2**bits // 2:], -c[2**bits // 2 - 1::-1], rtol=1e-12, atol=0):
    raise AssertionError(f"the {bits}-bit codebook is not symmetric (`_sign_pairs`, `_lookup` need it)")
  return table_words(c[8:] if bits == 4 else c, dtype)


def table_words(values, dtype) -> tuple[int, int, int, int]:
  """(lo bytes of entries 0-3, of 4-7, hi bytes of 0-3, of 4-7) of ≤ 8 `values` in the 16-bit
  `dtype`, zero-padded to 8 entries: the four registers `_lookup` permutes."""
  values = np.asarray(values, np.float64)
  u16 = np.zeros(8, np.uint16)
  u16[: values.size] = values.astype(np.float32).astype(dtype).view(np.uint16)
  lo, hi = (u16 & 0xFF).astype(np.uint32), (u16 >> 8).astype(np.uint32)
  word = lambda b: int(b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24))
  return word(lo[:4]), word(lo[4:]), word(hi[:4]), word(hi[4:])


SIGN_TABLE = table_words([-1.0, 1.0], np.float16)  # QJL sign bits 0 / 1 → −1 / +1 (`_sign_pairs`)
