"""Baseline KV-cache quantizers that TurboQuant is measured against (bf16, int8, int4, KIVI, Hadamard).

Every public function takes K or V as x [..., S, H] (tokens on axis -2, head dim on axis -1, any
leading batch/head dims) and returns

  (x_hat, bits_per_coordinate)                          or, with return_storage=True,
  (x_hat, bits_per_coordinate, storage)

x_hat is float32 [..., S, H], decoded from exactly the arrays in `storage` (a dict of the arrays a
cache would hold, in their storage dtypes). bits_per_coordinate counts everything in `storage`:
codes, scales and zero points, so sum(a.nbytes for a in storage.values()) * 8 == bits * x.size.
Sub-byte codes are packed with `tqjax.packing` (uint32 words, padding to 32 codes counted).

Conventions shared by all integer baselines:
* Round to nearest with ties to even (jnp.round), then clamp to the code range.
* Scales and zero points are stored as float16 and quantization uses the *stored* (fp16-rounded)
  values, so the encoder and the decoder agree. Asymmetric: x ≈ code·scale + zero with
  zero = min and scale = (max − min)/(2^b − 1). Symmetric: x ≈ code·scale, scale = absmax/(2^(b−1) − 1).
* A constant group (max == min, or absmax == 0 for symmetric) gets scale 0 and codes 0 and decodes
  to the stored zero point: exact whenever the constant is representable in fp16 (all-zero
  tokens are always exact). No division by zero, no NaN. A group whose range is positive but so
  small that fp16(range/(2^b−1)) underflows to 0 is treated the same way (error ≤ its range).
* Error per coordinate of a non-constant asymmetric group: ≤ scale/2 plus the fp16 rounding of
  the zero point (half an fp16 ulp of min), so groups far from 0 with a tiny range (e.g. values
  1000.3..1000.4, fp16 ulp 0.5) are dominated by the zero point, not by the codes.
* Non-finite input is detected explicitly: a NaN or ±inf anywhere in a group sets that group's
  scale (and zero point) to NaN and its codes to 0, so the whole group decodes to NaN; other
  groups are unaffected. Inputs are assumed to lie in the fp16 range: a group whose fp16 zero
  point overflows (|min| > 65504) decodes to ±inf, one whose fp16 scale overflows decodes to NaN.
  For the Hadamard baseline the rotation first spreads a non-finite entry over the whole token.
* Every function can be called under jax.jit (validation and bits use static shapes only); the
  array work is jitted internally.
"""

from __future__ import annotations

__all__ = ["bf16", "hadamard_int4", "hadamard_signs", "int4_per_token_group", "int8_per_token", "kivi"]

import functools

import jax
import jax.numpy as jnp

from tqjax import packing
from tqjax.rotation import hadamard_transform

_F16_BITS = 16  # storage of one scale or one zero point


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _check_x(x, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"{name}: x must be [..., T, D], got {x.shape=}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name}: x must be floating point, got {x.dtype=}")
  return x.astype(jnp.float32)


def _check_group(n: int, group: int, what: str, name: str) -> None:
  if not isinstance(group, int) or group < 1:
    raise ValueError(f"{name}: group must be a positive int, got {group=}")
  if n % group:
    raise ValueError(f"{name}: {what}={n} must be divisible by {group=}")


def _check_bits(bits, name: str) -> int:
  # Powers of two that divide 8; KIVI itself uses 2 and 4.
  if isinstance(bits, bool) or bits not in (1, 2, 4, 8):
    raise ValueError(f"{name}: bits must be one of 1, 2, 4, 8, got {bits=}")
  return int(bits)


def _code_bits_per_coord(d: int, bits: int) -> float:
  """Bits per coordinate of `bits`-bit codes packed along a last axis of length d."""
  return packing.packed_words(d, bits) * packing.WORD_BITS / d


def _nonfinite(g: jax.Array) -> jax.Array:
  """[..., n] → [...] bool: the group holds a NaN or ±inf.

  Checked explicitly because reductions do not reliably propagate NaN: with jax 0.11.2 on CPU,
  jnp.max(x, axis=-1) over a [>=64, 64] float32 array (lowered to a YNNPACK fusion) skips NaN, and
  returns -inf for a row whose last entry is NaN; [37, 64] propagates it.
  """
  return jnp.any(~jnp.isfinite(g), axis=-1)


def _asym_encode(g: jax.Array, bits: int):
  """Asymmetric min/max quantization of groups laid out on the last axis.

  g: [..., n] float32 (one group per leading index). Returns
  codes [..., n] uint8 in [0, 2^bits − 1], scale [...] float16, zero [...] float16.
  """
  levels = 2**bits - 1
  bad = _nonfinite(g)
  lo = jnp.where(bad, jnp.nan, jnp.min(g, axis=-1))
  hi = jnp.max(g, axis=-1)
  scale = jnp.where(bad, jnp.nan, (hi - lo) / levels).astype(jnp.float16)
  zero = lo.astype(jnp.float16)
  s = scale.astype(jnp.float32)[..., None]
  z = zero.astype(jnp.float32)[..., None]
  live = s > 0  # False for constant groups and for NaN scales
  q = jnp.round((g - z) / jnp.where(live, s, 1.0))
  q = jnp.where(live & ~jnp.isnan(q), jnp.clip(q, 0, levels), 0)
  return q.astype(jnp.uint8), scale, zero


def _asym_decode(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """codes [..., n] uint8, scale/zero [...] float16 → [..., n] float32."""
  s = scale.astype(jnp.float32)[..., None]
  z = zero.astype(jnp.float32)[..., None]
  return codes.astype(jnp.float32) * s + z


def _finish(x_hat, bits, storage, return_storage):
  return (x_hat, float(bits), storage) if return_storage else (x_hat, float(bits))


# --------------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------------


@jax.jit
def _bf16_core(x):
  stored = x.astype(jnp.bfloat16)
  return stored.astype(jnp.float32), {"x": stored}


def bf16(x, *, return_storage: bool = False):
  """bfloat16 cast round trip: 16 bits per coordinate, nothing else stored.

  x: [..., T, D] float. Storage: x [..., T, D] bfloat16. NaN/inf pass through unchanged.
  """
  x = _check_x(x, "bf16")
  x_hat, storage = _bf16_core(x)
  return _finish(x_hat, 16.0, storage, return_storage)


# --------------------------------------------------------------------------------------------
# int8, symmetric, per token
# --------------------------------------------------------------------------------------------


@jax.jit
def _int8_core(x):
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  absmax = jnp.where(_nonfinite(x)[..., None], jnp.nan, absmax)
  scale = (absmax / 127.0).astype(jnp.float16)
  s = scale.astype(jnp.float32)
  live = s > 0
  q = jnp.round(x / jnp.where(live, s, 1.0))
  q = jnp.where(live & ~jnp.isnan(q), jnp.clip(q, -127, 127), 0)
  codes = q.astype(jnp.int8)
  x_hat = codes.astype(jnp.float32) * s
  return x_hat, {"codes": codes, "scale": scale}


def int8_per_token(x, *, return_storage: bool = False):
  """Symmetric absmax int8, one fp16 scale per token: 8 + 16/D bits per coordinate.

  x: [..., T, D] float. code = clip(round(x / s), −127, 127), s = fp16(max|x| / 127) over D;
  −128 is unused so the grid is symmetric. Storage: codes [..., T, D] int8, scale [..., T, 1]
  float16. An all-zero token decodes to exactly 0.
  """
  x = _check_x(x, "int8_per_token")
  d = x.shape[-1]
  x_hat, storage = _int8_core(x)
  return _finish(x_hat, 8 + _F16_BITS / d, storage, return_storage)


# --------------------------------------------------------------------------------------------
# Asymmetric per token, groups of channels (int4 baseline, KIVI values, Hadamard baseline)
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "group"))
def _token_group_core(x, bits: int, group: int):
  *lead, t, d = x.shape
  g = x.reshape(*lead, t, d // group, group)
  codes, scale, zero = _asym_encode(g, bits)  # codes [..., T, D/G, G]; scale/zero [..., T, D/G]
  words = packing.pack(codes.reshape(*lead, t, d), bits)
  codes = packing.unpack(words, bits, d).reshape(*lead, t, d // group, group)
  x_hat = _asym_decode(codes, scale, zero).reshape(*lead, t, d)
  return x_hat, {"codes": words, "scale": scale, "zero": zero}


def _token_group_bits(d: int, bits: int, group: int) -> float:
  return _code_bits_per_coord(d, bits) + 2 * _F16_BITS / group


def int4_per_token_group(x, group: int = 32, *, return_storage: bool = False):
  """Asymmetric min/max int4 per token per group of `group` channels.

  x: [..., T, D] float, D divisible by group. Bits per coordinate: 4 + 32/group (5.0 at
  group=32; fp16 scale + fp16 zero per group). Storage: codes [..., T, 4·ceil(D/32)] uint32
  (tqjax.packing layout), scale [..., T, D/group] float16, zero [..., T, D/group] float16.
  """
  x = _check_x(x, "int4_per_token_group")
  d = x.shape[-1]
  _check_group(d, group, "D", "int4_per_token_group")
  x_hat, storage = _token_group_core(x, 4, group)
  return _finish(x_hat, _token_group_bits(d, 4, group), storage, return_storage)


# --------------------------------------------------------------------------------------------
# KIVI
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "group"))
def _channel_core(x, bits: int, group: int):
  """Per-channel quantization with statistics over blocks of `group` tokens (KIVI keys)."""
  *lead, t, d = x.shape
  nt = -(-t // group)
  # Edge padding repeats the last token, so a partial last block keeps its own min/max.
  pad = [(0, 0)] * len(lead) + [(0, nt * group - t), (0, 0)]
  xp = jnp.pad(x, pad, mode="edge").reshape(*lead, nt, group, d)
  g = jnp.swapaxes(xp, -1, -2)  # [..., nT, D, G]: one group per (block, channel)
  codes, scale, zero = _asym_encode(g, bits)  # codes [..., nT, D, G]; scale/zero [..., nT, D]
  codes = jnp.swapaxes(codes, -1, -2).reshape(*lead, nt * group, d)[..., :t, :]
  words = packing.pack(codes, bits)  # packed along D, per token
  codes = packing.unpack(words, bits, d)
  s = jnp.repeat(scale.astype(jnp.float32), group, axis=-2)[..., :t, :]
  z = jnp.repeat(zero.astype(jnp.float32), group, axis=-2)[..., :t, :]
  x_hat = codes.astype(jnp.float32) * s + z
  return x_hat, {"codes": words, "scale": scale, "zero": zero}


def kivi(x, bits: int, kind: str, group: int = 32, *, return_storage: bool = False):
  """KIVI-style asymmetric quantization (Liu et al. 2024), without its residual window.

  x: [..., T, D] float.
  kind="key": per-channel. Each channel gets an fp16 scale and zero per block of `group`
    tokens (stats over the block's tokens). A trailing partial block (T % group != 0) gets its
    own stats. Bits per coordinate: bits + 32·ceil(T/group)/T, i.e. bits + 1 when T is a
    multiple of 32 (codes are padded to 32 per token when D % 32 != 0, and counted). Storage: codes [..., T, bits·ceil(D/32)] uint32, scale/zero
    [..., ceil(T/group), D] float16.
  kind="value": per-token, groups of `group` channels (D divisible by group); identical to
    int4_per_token_group at bits=4. Bits: bits + 32/group. Storage: codes
    [..., T, bits·ceil(D/32)] uint32, scale/zero [..., T, D/group] float16.
  bits: 2 or 4 in the paper (1 and 8 also accepted).

  Real KIVI keeps the most recent tokens (a residual window of up to R = 32..128, plus the
  not-yet-full key block) in full precision; that is omitted here: every token is quantized,
  which makes this baseline slightly pessimistic for short contexts and its bit count exact.
  """
  x = _check_x(x, "kivi")
  bits = _check_bits(bits, "kivi")
  t, d = x.shape[-2:]
  if kind == "key":
    if not isinstance(group, int) or group < 1:
      raise ValueError(f"kivi: group must be a positive int, got {group=}")
    x_hat, storage = _channel_core(x, bits, group)
    nbits = _code_bits_per_coord(d, bits) + 2 * _F16_BITS * (-(-t // group)) / t
  elif kind == "value":
    _check_group(d, group, "D", "kivi")
    x_hat, storage = _token_group_core(x, bits, group)
    nbits = _token_group_bits(d, bits, group)
  else:
    raise ValueError(f"kivi: {kind=} must be 'key' or 'value'")
  return _finish(x_hat, nbits, storage, return_storage)


# --------------------------------------------------------------------------------------------
# Randomized Hadamard rotation + int4 (QuaRot / SpinQuant-style KV quantization)
# --------------------------------------------------------------------------------------------


def hadamard_signs(d: int, seed: int = 0) -> jax.Array:
  """Random ±1 signs [d] float32, deterministic in `seed`."""
  return jax.random.rademacher(jax.random.key(seed), (d,), dtype=jnp.float32)


@functools.partial(jax.jit, static_argnames=("group",))
def _hadamard_core(x, signs, group: int):
  y = hadamard_transform(x * signs)  # orthonormal: y = H·diag(signs)·x / √D
  y_hat, storage = _token_group_core(y, 4, group)
  return hadamard_transform(y_hat) * signs, storage  # H is self-inverse


def hadamard_int4(x, group: int = 32, seed: int = 0, *, return_storage: bool = False):
  """Randomized Hadamard rotation over D, int4 per-token group quantization, inverse rotation.

  x: [..., T, D] float, D a power of two and divisible by group. Bits per coordinate: 4 + 32/group
  (5.0 at group=32), the same storage as int4_per_token_group but of the rotated vectors.
  The D sign bits come from `seed` and are shared by the whole cache, so they cost nothing per
  vector and are not counted. Storage: codes [..., T, 4·ceil(D/32)] uint32, scale/zero
  [..., T, D/group] float16 (of the rotated tokens).
  """
  x = _check_x(x, "hadamard_int4")
  d = x.shape[-1]
  if d & (d - 1) or d < 1:
    raise ValueError(f"hadamard_int4: D={d} must be a power of two")
  _check_group(d, group, "D", "hadamard_int4")
  x_hat, storage = _hadamard_core(x, hadamard_signs(d, seed), group)
  return _finish(x_hat, _token_group_bits(d, 4, group), storage, return_storage)

