"""Two-term bfloat16 splits of float32 operands for tensor-core dots (x ≈ hi + lo to ~2^-16).

hi is x with the low 16 mantissa bits cleared (bitwise, so exactly representable in bfloat16),
lo the bfloat16 rounding of the exact remainder x − hi. The usual `x.astype(bf16)` round trip is
not used on purpose: XLA:GPU (`xla_allow_excess_precision`, on by default) may fold
`f32(bf16(x))` back to x inside a fusion, which makes the remainder 0 and silently turns a
~2^-16 split into a plain bfloat16 operand (seen on an H200, 2026-11-27: codes at bf16 accuracy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["split"]


def split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 x → (hi, lo) bfloat16, same shape, with hi + lo = x to ~2^-16 relative."""
  hi = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
  return hi.astype(jnp.bfloat16), (x - hi).astype(jnp.bfloat16)
