"""Tests for tqjax.baselines (the integer KV-cache baselines) and tqjax.synthetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tqjax import baselines as B
from tqjax import packing
from tqjax.rotation import hadamard_transform
from tqjax.synthetic import decoder_like_kv

pytestmark = pytest.mark.math



def _kivi_k(bits):
  return lambda x, **kw: B.kivi(x, bits, "key", **kw)


def _kivi_v(bits):
  return lambda x, **kw: B.kivi(x, bits, "value", **kw)


ALL = {
    "bf16": B.bf16,
    "int8_per_token": B.int8_per_token,
    "int4_per_token_group": B.int4_per_token_group,
    "hadamard_int4": B.hadamard_int4,
    "kivi2_key": _kivi_k(2),
    "kivi4_key": _kivi_k(4),
    "kivi2_value": _kivi_v(2),
    "kivi4_value": _kivi_v(4),
}

X_SHAPE = (3, 37, 64)  # T = 32 + 5: one full and one partial 32-token key block
SYNTH_SHAPE = (1, 4, 128, 64)  # one shape everywhere: each new shape costs a ~2 s compile
GROUPED = ("int4_per_token_group", "hadamard_int4", "kivi2_value", "kivi4_value")


def _gauss(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rel_mse(x, x_hat):
  return float(np.sum((np.asarray(x_hat) - x) ** 2) / np.sum(np.asarray(x) ** 2))


# ---------------------------------------------------------------------------- hand cases


def test_int8_hand_case():
  x = np.array(
      [
          [63.5, -10.2, 0.25, 3.0],
          [0.0, 0.0, 0.0, 0.0],
          [-1.0, 0.0, 0.75, 0.0],
      ],
      np.float32,
  )
  # token 0: absmax 63.5 → scale 63.5/127 = 0.5 (exact in fp16);
  #   x/0.5 = [127, -20.4, 0.5, 6] → round (ties to even) [127, -20, 0, 6] → [63.5, -10, 0, 3].
  # token 1: absmax 0 → scale 0, codes 0 → exactly 0, no NaN.
  # token 2: scale = fp16(1/127) = 2064·2^-18 = 0.00787353515625 (fp16 step in [2^-8, 2^-7) is
  #   2^-18; 1/127 = 2064.25 steps). -1/s = -127.008 → -127 → -127·2064/2^18 = -0.99993896484375;
  #   0.75/s = 95.256 → 95 → 95·2064/2^18 = 0.74798583984375.
  x_hat, bits, st = B.int8_per_token(x, return_storage=True)
  np.testing.assert_array_equal(
      x_hat,
      [
          [63.5, -10.0, 0.0, 3.0],
          [0.0, 0.0, 0.0, 0.0],
          [-0.99993896484375, 0.0, 0.74798583984375, 0.0],
      ],
  )
  np.testing.assert_array_equal(st["codes"], [[127, -20, 0, 6], [0, 0, 0, 0], [-127, 0, 95, 0]])
  assert st["codes"].dtype == jnp.int8 and st["scale"].dtype == jnp.float16
  np.testing.assert_array_equal(st["scale"][:, 0], np.float16([0.5, 0.0, 2064 * 2.0**-18]))
  assert bits == 8 + 16 / 4


def test_int4_group_hand_case():
  x = np.array(
      [
          [0.0, 0.3, 1.0, 7.5, -3.0, -1.2, 1.25, 4.5],
          [2.5, 2.5, 2.5, 2.5, -1.0, 0.0, 0.0, 0.875],
      ],
      np.float32,
  )
  # group=4, codes in [0, 15], x ≈ code·scale + zero with zero = min, scale = range/15.
  # t0 g0: range 7.5 → scale 0.5, zero 0: x/0.5 = [0, 0.6, 2, 15] → [0, 1, 2, 15]
  #        → [0, 0.5, 1.0, 7.5].
  # t0 g1: range 7.5 → scale 0.5, zero -3: (x+3)/0.5 = [0, 3.6, 8.5, 15] → [0, 4, 8, 15]
  #        (8.5 ties to even 8) → [-3, -1, 1, 4.5].
  # t1 g0: constant → scale 0, codes 0, decodes to zero = 2.5 exactly.
  # t1 g1: range 1.875 → scale 0.125, zero -1: (x+1)/0.125 = [0, 8, 8, 15] → exact.
  x_hat, bits, st = B.int4_per_token_group(x, group=4, return_storage=True)
  np.testing.assert_array_equal(
      x_hat,
      [
          [0.0, 0.5, 1.0, 7.5, -3.0, -1.0, 1.0, 4.5],
          [2.5, 2.5, 2.5, 2.5, -1.0, 0.0, 0.0, 0.875],
      ],
  )
  codes = packing.unpack(st["codes"], 4, 8)
  np.testing.assert_array_equal(codes, [[0, 1, 2, 15, 0, 4, 8, 15], [0, 0, 0, 0, 0, 8, 8, 15]])
  np.testing.assert_array_equal(st["scale"], np.float16([[0.5, 0.5], [0.0, 0.125]]))
  np.testing.assert_array_equal(st["zero"], np.float16([[0.0, -3.0], [2.5, -1.0]]))
  # 8 codes pad to one 32-code row: 4 words·32 bits / 8 coords = 16, plus 2·16/4 = 8.
  assert bits == 16 + 8


def test_kivi_key_hand_case():
  # T=6 tokens, D=2 channels, 2 bits (codes 0..3), blocks of group=4 tokens: [0:4], [4:6].
  x = np.array([[0, 100], [1, -2], [2, 4], [3, 10], [5, 7], [8, 7]], np.float32)
  # block 0, ch 0: [0,1,2,3] range 3 → scale 1, zero 0 → exact.
  # block 0, ch 1: [100,-2,4,10] range 102 → scale 34, zero -2: (x+2)/34 = [3, 0, .18, .35]
  #   → [3, 0, 0, 0] → [100, -2, -2, -2]. Channel 0 is untouched by channel 1's outlier.
  # block 1 (partial), ch 0: [5, 8] → scale 1, zero 5 → codes [0, 3] → exact.
  # block 1, ch 1: [7, 7] constant → 7 exactly.
  x_hat, bits, st = B.kivi(x, 2, "key", group=4, return_storage=True)
  np.testing.assert_array_equal(x_hat, [[0, 100], [1, -2], [2, -2], [3, -2], [5, 7], [8, 7]])
  np.testing.assert_array_equal(st["scale"], np.float16([[1, 34], [1, 0]]))
  np.testing.assert_array_equal(st["zero"], np.float16([[0, -2], [5, 7]]))
  # codes: 2 words per token for 2 channels (padded to 32) = 2·32/2 = 32 bits per coordinate;
  # stats: 2 blocks · 2 fp16 · 16 bits / 6 tokens per coordinate.
  assert bits == pytest.approx(32 + 2 * 2 * 16 / 6)


def test_kivi_value_is_int4_group_at_4_bits():
  x = _gauss(0, X_SHAPE)
  a, _ = B.kivi(x, 4, "value")
  b, _ = B.int4_per_token_group(x)
  np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- properties


def test_error_decreases_with_bits():
  x = _gauss(1, (2, 64, 128))
  e = {name: _rel_mse(x, f(x)[0]) for name, f in ALL.items()}
  assert e["bf16"] < e["int8_per_token"] < e["int4_per_token_group"]
  assert e["kivi4_key"] < e["kivi2_key"] and e["kivi4_value"] < e["kivi2_value"]
  # Each extra bit should roughly quarter the MSE; 2 → 4 bits is ~16x, demand 8x.
  assert e["kivi2_key"] > 8 * e["kivi4_key"] and e["kivi2_value"] > 8 * e["kivi4_value"]
  assert e["int8_per_token"] < 0.01 * e["int4_per_token_group"]


@pytest.mark.parametrize("name", list(ALL))
def test_zero_tokens_exact(name):
  x = _gauss(2, X_SHAPE)
  x[:, 7] = 0.0
  x[:, 32:] = 0.0  # a whole partial key block
  x_hat = np.asarray(ALL[name](x)[0])
  assert np.isfinite(x_hat).all()
  if not name.endswith("_key"):  # per-channel keys: a zero token is not a group of its own
    np.testing.assert_array_equal(x_hat[:, 7], 0.0)
  np.testing.assert_array_equal(x_hat[:, 32:], 0.0)


def test_constant_groups_exact():
  x = _gauss(3, X_SHAPE)
  x[1, 5, 32:64] = -1.375  # one per-token group of 32 channels
  np.testing.assert_array_equal(B.int4_per_token_group(x)[0][1, 5, 32:], -1.375)
  np.testing.assert_array_equal(B.kivi(x, 2, "value")[0][1, 5, 32:], -1.375)
  y = _gauss(4, X_SHAPE)
  y[0, 32:, 3] = 6.25  # one channel over the partial block of tokens 32..36
  y[2, :32, 9] = -0.5  # one channel over a full block
  for bits in (2, 4):
    y_hat = np.asarray(B.kivi(y, bits, "key")[0])
    np.testing.assert_array_equal(y_hat[0, 32:, 3], 6.25)
    np.testing.assert_array_equal(y_hat[2, :32, 9], -0.5)
    assert np.isfinite(y_hat).all()


def test_asym_error_bound():
  # Offsets far from zero stress the fp16 zero point: error ≤ scale/2 + |fp16(min) − min|.
  rng = np.random.default_rng(5)
  x = rng.standard_normal(X_SHAPE) * 0.01 + rng.uniform(-300, 300, (*X_SHAPE[:-1], 1))
  x = x.astype(np.float32)
  x_hat, _, st = B.int4_per_token_group(x, return_storage=True)
  g = x.reshape(*X_SHAPE[:-1], 2, 32)
  lo = g.min(-1)
  s = np.asarray(st["scale"], np.float32)
  z = np.asarray(st["zero"], np.float32)
  bound = s / 2 + np.abs(z - lo) + 15 * np.abs(s - (g.max(-1) - lo) / 15) + 1e-6
  err = np.abs(np.asarray(x_hat).reshape(g.shape) - g).max(-1)
  assert (err <= bound).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_poisons_only_its_group(bad):
  # X_SHAPE has 111 rows: enough to hit XLA:CPU's NaN-dropping max reduction (see _nonfinite).
  x = _gauss(6, X_SHAPE)
  x[2, 1, 5] = bad
  expect = {  # which entries decode to NaN
      "int8_per_token": (2, 1, slice(None)),
      "int4_per_token_group": (2, 1, slice(0, 32)),
      "kivi4_value": (2, 1, slice(0, 32)),
      "kivi2_key": (2, slice(0, 32), 5),  # its channel in its 32-token block
      "hadamard_int4": (2, 1, slice(None)),  # the rotation spreads it over the token
  }
  for name, where in expect.items():
    x_hat, _, st = ALL[name](x, return_storage=True)
    mask = np.zeros(x.shape, bool)
    mask[where] = True
    x_hat = np.asarray(x_hat)
    assert np.isnan(x_hat[mask]).all(), name
    assert np.isfinite(x_hat[~mask]).all(), name
  _, _, st = B.int8_per_token(x, return_storage=True)
  np.testing.assert_array_equal(st["codes"][2, 1], 0)  # stored codes are defined, not garbage
  x_hat = np.array(B.bf16(x)[0])
  np.testing.assert_array_equal(x_hat[2, 1, 5], x[2, 1, 5])  # NaN == NaN here
  x_hat[2, 1, 5] = 0.0
  assert np.isfinite(x_hat).all()


# ---------------------------------------------------------------------------- accounting


def test_bits_table():
  # bits per coordinate at D=32 and D=128, T a multiple of 32.
  for shape, int8_bits in (((1, 2, 64, 32), 8.5), ((2, 64, 128), 8.125)):
    x = jnp.zeros(shape, jnp.float32)
    assert B.bf16(x)[1] == 16.0
    assert B.int8_per_token(x)[1] == int8_bits
    assert B.int4_per_token_group(x)[1] == 5.0
    assert B.hadamard_int4(x)[1] == 5.0
    for kind in ("key", "value"):
      assert B.kivi(x, 2, kind)[1] == 3.0
      assert B.kivi(x, 4, kind)[1] == 5.0


@pytest.mark.parametrize(
    "shape", [(1, 2, 64, 32), (2, 64, 128), X_SHAPE, (5, 16)]
)
@pytest.mark.parametrize("name", list(ALL))
def test_bits_match_storage_nbytes(name, shape):
  x = _gauss(7, shape)
  kw = {"group": 16} if shape[-1] % 32 and name in GROUPED else {}
  x_hat, bits, st = ALL[name](x, return_storage=True, **kw)
  assert x_hat.shape == x.shape and x_hat.dtype == jnp.float32
  stored_bits = 8 * sum(a.nbytes for a in jax.tree.leaves(st))
  assert stored_bits == pytest.approx(bits * x.size, rel=1e-12)
  if name != "bf16":
    assert {a.dtype for a in st.values()} <= {
        jnp.dtype(jnp.int8), jnp.dtype(jnp.uint32), jnp.dtype(jnp.float16)
    }


def test_errors():
  x = _gauss(8, (4, 48))
  with pytest.raises(ValueError, match="power of two"):
    B.hadamard_int4(x, group=16)
  with pytest.raises(ValueError, match="divisible"):
    B.int4_per_token_group(x)
  with pytest.raises(ValueError, match="divisible"):
    B.kivi(x, 2, "value")
  with pytest.raises(ValueError, match="kind"):
    B.kivi(x, 2, "query")
  with pytest.raises(ValueError, match="bits"):
    B.kivi(x, 3, "key")
  with pytest.raises(ValueError, match="power of two"):
    B.hadamard_int4(_gauss(8, (4, 96)))
  with pytest.raises(ValueError, match="divisible"):
    B.hadamard_int4(_gauss(8, (4, 16)))


def test_jit_matches_eager():
  x = jnp.asarray(_gauss(9, X_SHAPE))
  for name, f in ALL.items():
    eager = f(x)[0]
    jitted = jax.jit(lambda a, f=f: f(a)[0])(x)
    np.testing.assert_array_equal(eager, jitted, err_msg=name)


# ---------------------------------------------------------------------------- Hadamard


def test_hadamard_error_is_int4_error_of_rotated_tokens():
  # The rotation is orthonormal, so the error norm equals int4's error on the rotated tokens.
  x = _gauss(10, X_SHAPE)
  signs = B.hadamard_signs(64, seed=3)
  y = hadamard_transform(jnp.asarray(x) * signs)
  y_hat, _ = B.int4_per_token_group(y)
  x_hat, _ = B.hadamard_int4(x, seed=3)
  np.testing.assert_allclose(
      np.sum((np.asarray(x_hat) - x) ** 2), np.sum((np.asarray(y_hat) - y) ** 2), rtol=1e-4
  )
  assert not np.array_equal(x_hat, B.hadamard_int4(x, seed=4)[0])


def test_hadamard_beats_int4_on_outlier_keys():
  # Four 20x outlier channels per head: a plain per-token group containing one spends its whole
  # range on it. Measured ratio is ~0.3; demand < 0.5 on every (seed, head).
  for seed in range(3):
    _, k, v = decoder_like_kv(jax.random.key(seed), *SYNTH_SHAPE)
    err = lambda f, a: np.sum((np.asarray(f(a)[0]) - np.asarray(a)) ** 2, axis=(0, 2, 3))
    ratio = err(B.hadamard_int4, k) / err(B.int4_per_token_group, k)
    assert (ratio < 0.5).all(), (seed, ratio)
    # Gaussian values have no outliers, so rotating them buys nothing (nor costs much).
    ratio_v = err(B.hadamard_int4, v).sum() / err(B.int4_per_token_group, v).sum()
    assert 0.8 < ratio_v < 1.25


# ---------------------------------------------------------------------------- synthetic


def test_decoder_like_kv():
  q, k, v = decoder_like_kv(jax.random.key(0), *SYNTH_SHAPE)
  for a in (q, k, v):
    assert a.shape == SYNTH_SHAPE and a.dtype == jnp.float32
  q2, k2, v2 = decoder_like_kv(jax.random.key(0), *SYNTH_SHAPE)
  np.testing.assert_array_equal(k, k2)
  np.testing.assert_array_equal(q, q2)
  assert not np.array_equal(k, decoder_like_kv(jax.random.key(1), *SYNTH_SHAPE)[1])

  logits = np.einsum("bhtd,bhsd->bhts", q, k) / 8.0
  rms_std = np.sqrt(np.mean(np.var(logits, axis=-1), axis=(0, 2)))
  np.testing.assert_allclose(rms_std, 3.0, rtol=1e-3)
  p = jax.nn.softmax(logits, axis=-1)
  entropy = float(np.mean(-np.sum(p * np.log(p + 1e-30), axis=-1)))
  assert entropy < 0.6 * np.log(SYNTH_SHAPE[2])  # peaky, far from uniform

  chan_rms = np.sqrt(np.mean(np.asarray(k) ** 2, axis=(0, 2)))  # [heads, D]
  top = np.sort(chan_rms, axis=-1)[:, ::-1]
  med = np.median(chan_rms, axis=-1)
  assert (top[:, 3] > 10 * med).all() and (top[:, 4] < 3 * med).all()  # exactly 4 outliers
  v_rms = np.sqrt(np.mean(np.asarray(v) ** 2, axis=(0, 2)))
  assert v_rms.max() < 2 * np.median(v_rms)

  _, k0, _ = decoder_like_kv(jax.random.key(0), 1, 2, 64, 32, n_outlier_channels=0)
  k0_rms = np.sqrt(np.mean(np.asarray(k0) ** 2, axis=(0, 2)))
  assert k0_rms.max() < 3 * np.median(k0_rms)
  with pytest.raises(ValueError):
    decoder_like_kv(jax.random.key(0), 1, 1, 8, 16, n_outlier_channels=17)
