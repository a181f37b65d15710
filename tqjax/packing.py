"""Bit packing of b-bit codes (1 ≤ b ≤ 8) into uint32 words, b bits per coordinate.

Layout (kernels read it; keep it in sync with `pallas_kernels`):

* A vector of n codes is padded with zero codes to 32·W coordinates, W = ceil(n/32), and
  coordinate i is given the *slot* s = i // W and *column* w = i % W (i = s·W + w).
* b is split into its binary digits, largest first: b = 7 → parts (4, 2, 1), 3 → (2, 1),
  4 → (4,). The part of width p holds code bits [o, o+p), where o is the sum of the wider
  parts (the widest part holds the low bits).
* A part of width p is stored as p *rows* of W words. Row r, word w holds the p-bit fields of
  slots s = r·(32/p) + m for m = 0 .. 32/p − 1, field m at bit offset m·p.
* Rows are stacked part after part (widest first) into [b, W] and flattened to [b·W] words.

So a vector takes b·W words: exactly b bits per coordinate when n is a multiple of 32 (head
dims 32, 64, 128, 256), with the padding counted honestly otherwise. A kernel unpacks without
any gather or reshape: for a block of slots [s0, s0 + 32/p_max) every part's field sits in one
row at a static shift, so `(row >> shift) & mask` over a broadcast axis gives [slots, W] codes,
and the query is reshaped once to [32, W] to match.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tqjax.codebook import check_bits

__all__ = ["WORD_BITS", "num_columns", "pack", "packed_words", "parts", "unpack"]

WORD_BITS = 32


def parts(bits: int) -> tuple[tuple[int, int, int], ...]:
  """(width p, code-bit offset o, first row) of each part of a `bits`-wide code, widest first."""
  out, offset = [], 0
  for p in (8, 4, 2, 1):
    if bits & p:
      out.append((p, offset, offset))
      offset += p
  return tuple(out)


def num_columns(n: int) -> int:
  """W = ceil(n / 32): words per row for n coordinates."""
  return -(-n // WORD_BITS)


def packed_words(n: int, bits: int) -> int:
  """Number of uint32 words that hold n codes of `bits` bits."""
  return bits * num_columns(n)


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs codes [..., n] (integers in [0, 2^bits), array-like) into uint32 words
  [..., bits·ceil(n/32)]."""
  bits = check_bits(bits)
  codes = jnp.asarray(codes)
  if codes.ndim < 1:
    raise ValueError(f"pack needs codes with a last axis to pack, got codes.shape={codes.shape}")
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise TypeError(f"pack needs integer codes, got {codes.dtype=}")
  n = codes.shape[-1]
  w = num_columns(n)
  lead = codes.shape[:-1]
  c = codes.astype(jnp.uint32)
  c = jnp.pad(c, [(0, 0)] * len(lead) + [(0, WORD_BITS * w - n)]).reshape(*lead, WORD_BITS, w)
  rows = []
  for p, offset, _ in parts(bits):
    per_word = WORD_BITS // p
    field = (c >> offset) & jnp.uint32(2**p - 1)
    field = field.reshape(*lead, p, per_word, w)
    shifts = jnp.asarray(np.arange(per_word, dtype=np.uint32) * p)[:, None]
    # Fields occupy disjoint bits, so the sum is a bitwise OR.
    rows.append(jnp.sum(field << shifts, axis=-2, dtype=jnp.uint32))
  return jnp.concatenate(rows, axis=-2).reshape(*lead, bits * w)


def unpack(words: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of `pack`: words [..., bits·ceil(n/32)] uint32 → codes [..., n] uint8."""
  bits = check_bits(bits)
  w = num_columns(n)
  words = jnp.asarray(words)
  if words.ndim < 1 or words.dtype != jnp.uint32 or words.shape[-1] != bits * w:
    raise ValueError(
        f"unpack expects uint32 words [..., {bits * w}] for {n=} at {bits=}, "
        f"got {words.dtype} {words.shape}"
    )
  lead = words.shape[:-1]
  rows = words.reshape(*lead, bits, w)
  code = jnp.zeros((*lead, WORD_BITS, w), jnp.uint32)
  for p, offset, row0 in parts(bits):
    per_word = WORD_BITS // p
    shifts = jnp.asarray(np.arange(per_word, dtype=np.uint32) * p)[:, None]
    field = (rows[..., row0 : row0 + p, None, :] >> shifts) & jnp.uint32(2**p - 1)
    code = code | (field.reshape(*lead, WORD_BITS, w) << offset)
  return code.reshape(*lead, WORD_BITS * w)[..., :n].astype(jnp.uint8)
