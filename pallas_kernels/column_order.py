"""The column-major coordinate order of the Triton and TPU kernels.

`tqjax.packing` puts coordinate i = s·W + w of a vector in slot s of packed column w (W columns,
32 slots each). Unpacking a packed row one slot at a time gives the coordinates in the order
j = w·32 + s, so these kernels work in that order: the query (and S·q, or the rotation matrix
for the encode) is permuted into it once outside the kernel and the value accumulator back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tqjax import packing

__all__ = ["from_column_major", "to_column_major"]


def to_column_major(x: jax.Array, cols: int | None = None) -> jax.Array:
  """x [..., n] in packing order (i = s·cols + w) → [..., 32·cols] in order j = w·32 + s, zero-padded
  when n < 32·cols. cols: packed columns (default n / 32)."""
  n = x.shape[-1]
  cols = n // packing.WORD_BITS if cols is None else cols
  if n < packing.WORD_BITS * cols:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, packing.WORD_BITS * cols - n)])
  x = x.reshape(*x.shape[:-1], packing.WORD_BITS, cols)
  return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], packing.WORD_BITS * cols)


def from_column_major(x: jax.Array, n: int | None = None) -> jax.Array:
  """Inverse of `to_column_major`: x [..., 32·cols] → [..., n] (default 32·cols)."""
  cols = x.shape[-1] // packing.WORD_BITS
  x = x.reshape(*x.shape[:-1], cols, packing.WORD_BITS)
  x = jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], packing.WORD_BITS * cols)
  return x if n is None else x[..., :n]
