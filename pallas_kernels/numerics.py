"""Power-of-two row scales that carry float32 rows into float16 tensor-core operands.

float16 has 11 significant bits but a narrow exponent range (2^-24 .. 65504): a row scaled by a
power of two so that its largest entry lies in [256, 512) keeps float16's relative precision at
any magnitude, and scaling back is exact. The Mosaic GPU encode kernel scales x before its
rotation dot with these scales; the decode kernel's query rows are scaled the same way in PTX
(`decode_mgpu._prepare_query`), and `decode_mgpu.float16_rows`, its reference, uses them.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["float16_row_scales"]


def float16_row_scales(amax, smallest=2.0**-100):
  """amax [...] float32 (a row's max |x|) → (up, down) [...] float32, powers of two with up·down = 1:
  max |x·up| ∈ [256, 512), so x·up keeps 11 significant bits in float16 down to 2^-14 (bf16 x
  exactly). amax below `smallest` counts as `smallest` (a zero row gets finite scales); Inf or NaN
  give meaningless ones: callers mask such rows."""
  e = lax.bitcast_convert_type(jnp.maximum(amax, jnp.float32(smallest)), jnp.uint32) & jnp.uint32(0x7F800000)
  up = lax.bitcast_convert_type(jnp.uint32((127 + 127 + 8) << 23) - e, jnp.float32)  # 2^(8 − E), amax = 2^E·f
  return up, lax.bitcast_convert_type(e - jnp.uint32(8 << 23), jnp.float32)
