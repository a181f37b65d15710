"""b-bit packing: hand-computed word layouts, round trips for every width, word counts, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from tqjax import packing

pytestmark = pytest.mark.math

_pack = jax.jit(tqjax.pack, static_argnums=1)
_unpack = jax.jit(tqjax.unpack, static_argnums=(1, 2))


@jax.jit(static_argnums=1)
def _round_trip(codes, bits):
  words = tqjax.pack(codes, bits)
  return words, tqjax.unpack(words, bits, codes.shape[-1])


# One draw for every round trip (compiling a sampler per shape would dominate the runtime).
_RANDOM_BYTES = np.asarray(jax.random.bits(jax.random.key(0), (2, 3, 130), jnp.uint8))


def test_layout_3_bits_32_coordinates():
  # b = 3 = parts (2, 1): the 2-bit part holds code bits 0–1 in rows 0–1, the 1-bit part holds
  # code bit 2 in row 2. n = 32 → W = 1 column, so coordinate i is slot i.
  # Codes: c0 = 1, c1 = 2, c5 = 4, c17 = 3, c31 = 7, all others 0.
  # word 0 (2-bit row 0, slots 0..15, field m at bit 2m): c0&3 = 1 → 1<<0 = 0x1;
  #         c1&3 = 2 → 2<<2 = 0x8; c5&3 = 0.                              → 0x00000009
  # word 1 (2-bit row 1, slots 16..31, field m = s − 16): c17&3 = 3 → 3<<2 = 0xC;
  #         c31&3 = 3 → 3<<30 = 0xC0000000.                               → 0xC000000C
  # word 2 (1-bit row, slots 0..31, bit s): bit 2 of c5 = 1 → 1<<5 = 0x20;
  #         bit 2 of c31 = 1 → 1<<31 = 0x80000000; c0, c1, c17 have bit 2 clear. → 0x80000020
  c = np.zeros(32, np.uint8)
  c[[0, 1, 5, 17, 31]] = [1, 2, 4, 3, 7]
  words = _pack(c, 3)
  assert words.dtype == jnp.uint32
  np.testing.assert_array_equal(words, np.array([0x00000009, 0xC000000C, 0x80000020], np.uint32))
  np.testing.assert_array_equal(_unpack(words, 3, 32), c)


def test_layout_1_bit_two_columns():
  # b = 1, n = 40 → W = ceil(40/32) = 2 columns; coordinate i is slot i // 2, column i % 2,
  # and word w holds the bits of the slots of column w (bit s), padding coordinates 40..63 = 0.
  # c0 = 1 → slot 0, column 0 → word 0 bit 0                     → word 0 = 0x00000001
  # c3 = 1 → slot 1, column 1 → word 1 bit 1 = 0x2;
  # c39 = 1 → slot 19, column 1 → word 1 bit 19 = 0x80000          → word 1 = 0x00080002
  c = np.zeros(40, np.uint8)
  c[[0, 3, 39]] = 1
  words = _pack(c, 1)
  np.testing.assert_array_equal(words, np.array([0x00000001, 0x00080002], np.uint32))
  np.testing.assert_array_equal(_unpack(words, 1, 40), c)


def test_layout_8_bits_is_little_endian_bytes():
  # b = 8: one part of 8 rows, 4 fields per word at bits 0, 8, 16, 24. n = 4 (W = 1) fills slots
  # 0..3 of row 0: codes 0x12, 0x34, 0x56, 0x78 → 0x78563412; rows 1..7 hold padding zeros.
  words = _pack(np.array([0x12, 0x34, 0x56, 0x78], np.uint8), 8)
  np.testing.assert_array_equal(words, np.array([0x78563412, 0, 0, 0, 0, 0, 0, 0], np.uint32))


def test_layout_7_bits_parts():
  # b = 7 = parts (4, 2, 1) at code-bit offsets 0, 4, 6; rows 0..3, 4..5, 6. n = 1, code 0b1011001
  # (= 89): low nibble 0b1001 = 9 → row 0 bit 0 → 9; bits 4–5 = 0b01 → row 4 = 1; bit 6 = 1 → row 6 = 1.
  words = _pack(np.array([89], np.uint8), 7)
  np.testing.assert_array_equal(words, np.array([9, 0, 0, 0, 1, 0, 1], np.uint32))
  assert packing.parts(7) == ((4, 0, 0), (2, 4, 4), (1, 6, 6))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 5, 32, 33, 100, 128, 130])
def test_round_trip(bits, n):
  codes = _RANDOM_BYTES[..., :n] >> (8 - bits)  # uniform in [0, 2^bits)
  words, out = _round_trip(codes, bits)
  assert words.dtype == jnp.uint32
  assert words.shape == (2, 3, bits * math.ceil(n / 32)) == (2, 3, tqjax.packed_words(n, bits))
  assert out.dtype == jnp.uint8
  np.testing.assert_array_equal(out, codes)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint32, np.int8])
def test_integer_dtypes_accepted(dtype):
  codes = np.arange(32, dtype=dtype) % 8
  np.testing.assert_array_equal(_unpack(_pack(codes, 3), 3, 32), np.arange(32) % 8)


def test_all_ones_fill_every_bit():
  # Max codes at n = 64 fill all b·W words completely: every word is 0xFFFFFFFF.
  for bits in range(1, 9):
    words = _pack(jnp.full((64,), 2**bits - 1, jnp.uint8), bits)
    np.testing.assert_array_equal(words, np.full(2 * bits, 0xFFFFFFFF, np.uint32))


@pytest.mark.parametrize("n,bits,want", [(32, 4, 4), (33, 4, 8), (1, 1, 1), (128, 3, 12), (100, 8, 32), (0, 2, 0)])
def test_packed_words(n, bits, want):
  assert tqjax.packed_words(n, bits) == want


def test_vmap_matches_batched():
  codes = _RANDOM_BYTES.reshape(6, 130)[:, :40] >> 3
  np.testing.assert_array_equal(jax.jit(jax.vmap(lambda c: tqjax.pack(c, 5)))(codes), _pack(codes, 5))


def test_errors():
  with pytest.raises(TypeError, match="float32"):
    tqjax.pack(jnp.zeros(32, jnp.float32), 2)
  with pytest.raises(ValueError, match="bits=9"):
    tqjax.pack(jnp.zeros(32, jnp.uint8), 9)
  with pytest.raises(ValueError, match="bits=0"):
    tqjax.unpack(jnp.zeros(0, jnp.uint32), 0, 32)
  # 3 bits × W = 1 needs 3 words; 4 is the wrong shape, and the message says what it expected.
  with pytest.raises(ValueError, match=r"\[\.\.\., 3\].*\(4,\)"):
    tqjax.unpack(jnp.zeros(4, jnp.uint32), 3, 32)
  with pytest.raises(ValueError, match="int32"):
    tqjax.unpack(jnp.zeros(3, jnp.int32), 3, 32)
  with pytest.raises(ValueError, match=r"codes.shape=\(\)"):
    tqjax.pack(jnp.uint8(3), 2)


def test_array_likes_accepted():
  codes = [[3, 0, 1, 2] * 10]
  words = tqjax.pack(codes, 2)
  np.testing.assert_array_equal(words, tqjax.pack(jnp.asarray(codes, jnp.uint8), 2))
  np.testing.assert_array_equal(tqjax.unpack(np.asarray(words), 2, 40), np.asarray(codes, np.uint8))
