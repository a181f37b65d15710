"""TurboQuant mse / prod end to end: transformations (jit, vmap, batch dims), dtypes, zero and
non-finite inputs, estimate_ip vs decode, norm correction, byte accounting, errors, measured
distortion against the Lloyd–Max optimum and the paper's bounds, unbiasedness of prod over many
quantizer seeds, and real MiniLM keys."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax

pytestmark = pytest.mark.math

VARIANTS = [  # (variant, norm_correction)
    ("mse", False),
    ("mse", True),
    ("prod", False),
]


def assert_close(actual, desired, **tol):
  """assert_allclose that never lets NaN through (by default NaN == NaN passes there)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert np.all(np.isfinite(actual)), "actual has non-finite entries"
  assert np.all(np.isfinite(desired)), "desired has non-finite entries"
  np.testing.assert_allclose(actual, desired, **tol)


def assert_codes_identical(a: tqjax.Code, b: tqjax.Code):
  """Bit-identical codes; floating leaves must also be finite."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    if np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16":
      assert np.all(np.isfinite(x.astype(np.float32)))
    np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


def unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _quantizer(variant, nc, bits=3, dim=64, **kw):
  return tqjax.make_quantizer(dim, bits, variant, norm_correction=nc, seed=7, **kw)


# Compile time dominates these tests on CPU (eager mode compiles every primitive per shape), so
# tests that sweep configs run one jit over a tuple of quantizers: one compile per sweep.
@jax.jit
def _round_trips(tqs, x, q):
  """For each quantizer: (code, decode(code), estimate_ip(q, code))."""
  out = []
  for tq in tqs:
    code = tqjax.encode(tq, x)
    out.append((code, tqjax.decode(tq, code), tqjax.estimate_ip(tq, q, code)))
  return out


# ----------------------------------------------------------------------------- transformations


def assert_codes_close(a: tqjax.Code, b: tqjax.Code, rtol=1e-6):
  """Integer leaves (codes, signs) identical; float leaves (norms) equal to `rtol` and finite."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jnp.issubdtype(x.dtype, jnp.integer):
      np.testing.assert_array_equal(x, y)
    else:
      assert_close(x, y, rtol=rtol, atol=0)


@pytest.mark.parametrize("variant,nc", VARIANTS)
def test_jit_vmap_and_batch_dims_match_flat_call(variant, nc):
  tq = _quantizer(variant, nc)
  x = jax.random.normal(jax.random.key(0), (30, 64))
  flatten = lambda c: jax.tree.map(lambda a: a.reshape(30, *a.shape[3:]), c)  # noqa: E731
  encode = jax.jit(tqjax.encode)
  # Under one compilation mode, vmap and any batch shape give bit-identical codes.
  flat = encode(tq, x)
  assert flat.shape == (30,)
  assert_codes_identical(jax.jit(jax.vmap(lambda v: tqjax.encode(tq, v)))(x), flat)
  batched = encode(tq, x.reshape(2, 3, 5, 64))
  assert batched.shape == (2, 3, 5)
  assert_codes_identical(flatten(batched), flat)
  eager = tqjax.encode(tq, x)
  # jit vs eager: same codes; with norm correction the stored scale ‖x‖/‖ŷ‖ is fused differently
  # by XLA under jit and may move by an ulp.
  assert_codes_close(flat, eager, rtol=2.5e-7)
  # decode / estimate_ip of the batched code equal the flat ones.
  dec = jax.jit(tqjax.decode)(tq, flat)
  assert_close(jax.jit(tqjax.decode)(tq, batched).reshape(30, 64), dec, rtol=0, atol=0)
  q = jax.random.normal(jax.random.key(1), (64,))
  ip = jax.jit(tqjax.estimate_ip)(tq, q, flat)
  assert_close(jax.jit(tqjax.estimate_ip)(tq, q, batched).reshape(30), ip, rtol=0, atol=0)
  # vmap turns the per-vector dot into a differently ordered float32 reduction: ~1 ulp·√d.
  assert_close(jax.jit(jax.vmap(lambda c: tqjax.estimate_ip(tq, q, c)))(flat), ip, rtol=1e-5)


def test_code_passes_through_scan():
  tq = _quantizer("prod", False)
  x = jax.random.normal(jax.random.key(2), (6, 64))

  def step(carry, v):
    return carry, tqjax.encode(tq, v)

  _, codes = jax.lax.scan(step, 0, x)
  # Per-step matvecs vs one matmul accumulate in another order: norms may move by an ulp.
  assert_codes_close(codes, tqjax.encode(tq, x), rtol=2.5e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_in_same_dtype_out(dtype):
  tqs = tuple(_quantizer(variant, nc) for variant, nc in VARIANTS)
  x = jax.random.normal(jax.random.key(3), (9, 64)).astype(dtype)

  @jax.jit
  def run(tqs, x):
    out = []
    for tq in tqs:
      code = tqjax.encode(tq, x)
      x32 = x.astype(jnp.float32)
      out.append((code, tqjax.encode(tq, x32), tqjax.decode(tq, code, x.dtype), tqjax.decode(tq, code),
                  tqjax.estimate_ip(tq, x[0], code)))
    return out

  for code, code32, out, out32, ip in run(tqs, x):
    # The math runs in float32, so a low-precision input encodes exactly like its float32 upcast.
    assert_codes_identical(code, code32)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out.astype(jnp.float32), out32.astype(dtype).astype(jnp.float32), rtol=0, atol=0)
    assert ip.dtype == dtype and ip.shape == (9,)


# ----------------------------------------------------------------------------- special inputs


def test_zero_vector_round_trips_to_exact_zero():
  configs = [(variant, nc, bits) for variant, nc in VARIANTS for bits in (1, 2, 4)]
  tqs = tuple(_quantizer(variant, nc, bits=bits) for variant, nc, bits in configs)
  x = jnp.zeros((3, 64)).at[1].set(jax.random.normal(jax.random.key(4), (64,)))
  for config, (_, out, ip) in zip(configs, _round_trips(tqs, x, jnp.ones(64)), strict=True):
    out, ip = np.asarray(out), np.asarray(ip)
    assert np.all(out[[0, 2]] == 0.0), (config, out[[0, 2]])
    assert np.all(np.isfinite(out)) and np.any(out[1] != 0), config
    assert ip[0] == 0.0 and ip[2] == 0.0 and np.isfinite(ip[1]), (config, ip)


@pytest.mark.parametrize("variant,nc", VARIANTS)
def test_non_finite_input_poisons_only_its_vector(variant, nc):
  tq = _quantizer(variant, nc)
  x = jax.random.normal(jax.random.key(5), (8, 64))
  bad = {2: jnp.nan, 5: jnp.inf, 6: -jnp.inf}
  xb = x
  for row, val in bad.items():
    xb = xb.at[row, 3 * row].set(val)
  code = tqjax.encode(tq, xb)
  out = np.asarray(tqjax.decode(tq, code))
  ip = np.asarray(tqjax.estimate_ip(tq, x[0], code))
  clean = tqjax.encode(tq, x)
  clean_out = np.asarray(tqjax.decode(tq, clean))
  clean_ip = np.asarray(tqjax.estimate_ip(tq, x[0], clean))
  for row in range(8):
    if row in bad:
      assert np.all(np.isnan(out[row])), (row, out[row])
      assert np.isnan(ip[row])
      assert np.isnan(np.asarray(code.norms[row], np.float32))
    else:
      # Neighbours are as if the bad vectors were not there: bit-identical to the clean batch...
      row_code = jax.tree.map(lambda a: a[row], code)
      assert_codes_identical(row_code, jax.tree.map(lambda a: a[row], clean))
      assert_close(out[row], clean_out[row], rtol=0, atol=0)
      assert_close(ip[row], clean_ip[row], rtol=0, atol=0)
      # ...and equal to encoding the vector alone: identical codes, signs and norms. prod's residual
      # norm ‖Π·u − ŷ‖ comes from a matvec instead of a matmul there, so it may move by an ulp.
      assert_codes_close(row_code, tqjax.encode(tq, x[row]), rtol=2.5e-7)
      np.testing.assert_array_equal(row_code.norms, tqjax.encode(tq, x[row]).norms)


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
@pytest.mark.parametrize("variant,nc", VARIANTS)
def test_estimate_ip_is_inner_product_with_decode(variant, nc, rotation):
  tq = _quantizer(variant, nc, bits=2, rotation=rotation)
  kx, kq = jax.random.split(jax.random.key(6))
  x = 3.0 * jax.random.normal(kx, (11, 64))
  q = jax.random.normal(kq, (4, 1, 64))  # broadcasts against the code's [11]
  code = tqjax.encode(tq, x)
  ip = tqjax.estimate_ip(tq, q, code)
  assert ip.shape == (4, 11)
  want = np.einsum("mxd,nd->mn", np.asarray(q, np.float64), np.asarray(tqjax.decode(tq, code), np.float64))
  # Both sides are float32 sums of 64 products of size ~|q|·|x̂|/√64 → rounding ~1e-6 · ‖q‖‖x‖ ≈ 2e-5.
  assert_close(ip, want, rtol=1e-4, atol=1e-4)


def test_norm_correction_gives_unit_reconstructions():
  bits = (1, 2, 3, 5)
  x = unit(jax.random.normal(jax.random.key(7), (50, 64)))
  q = jnp.ones(64)
  corrected = _round_trips(tuple(_quantizer("mse", True, bits=b) for b in bits), x, q)
  plain = _round_trips(tuple(_quantizer("mse", False, bits=b) for b in bits), x, q)
  scaled = _round_trips(tuple(_quantizer("mse", True, bits=b) for b in bits), 5.0 * x, q)
  for (_, c, _), (_, p, _), (_, s, _) in zip(corrected, plain, scaled, strict=True):
    assert_close(jnp.linalg.norm(c, axis=-1), np.ones(50), rtol=0, atol=1e-5)
    # Without it ‖x̂‖ scatters around √(1 − D_mse) (E‖x̂‖² = 1 − D_mse), so the check above can fail.
    assert np.max(np.abs(np.asarray(jnp.linalg.norm(p, axis=-1)) - 1)) > 1e-3
    # and the scale is applied to non-unit vectors: ‖x̂‖ = ‖x‖.
    assert_close(jnp.linalg.norm(s, axis=-1), 5.0 * np.ones(50), rtol=1e-5)


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("dim", [32, 100, 128])
def test_nbytes_matches_bits_per_coordinate(dim):
  n = 7
  configs = [(variant, nd) for variant in ("mse", "prod") for nd in ("float32", "float16", "bfloat16")]
  tqs = tuple(tqjax.make_quantizer(dim, 3, variant, norm_dtype=nd) for variant, nd in configs)
  x = jax.random.normal(jax.random.key(8), (n, dim))
  for tq, (code, _, _) in zip(tqs, _round_trips(tqs, x, x[0]), strict=True):
    norm_dtype = jnp.dtype(tq.config.norm_dtype)
    assert code.norms.dtype == norm_dtype
    if tq.config.variant == "prod":
      assert code.residual_norms.dtype == norm_dtype
    want = tqjax.bits_per_coordinate(tq.config) * dim * n / 8
    assert code.nbytes == round(want) and abs(want - round(want)) < 1e-9, (tq.config, code.nbytes, want)


def test_bits_per_coordinate_hand_cases():
  bpc = tqjax.bits_per_coordinate
  # mse, d = 128, 4 bits, fp32 norm: 4·128 code bits + 32 → 4 + 32/128 = 4.25 bits; bf16 ratio 16/4.25.
  cfg = tqjax.QuantizerConfig(dim=128, bits=4)
  assert bpc(cfg) == 4.25 and tqjax.compression_ratio(cfg) == 16 / 4.25
  assert tqjax.compression_ratio(cfg, baseline_bits=32) == 32 / 4.25
  # prod, d = 128, 4 bits: 3-bit codes 3·4 words = 384 bits, norm 32, signs 128/32 = 4 words = 128,
  # residual norm 32 → 576/128 = 4.5.
  assert bpc(tqjax.QuantizerConfig(dim=128, bits=4, variant="prod")) == 4.5
  # mse, d = 100, 3 bits: W = ceil(100/32) = 4 → 3·4 words = 384 bits (28 padding coordinates
  # counted), + 32 → 416/100 = 4.16.
  assert bpc(tqjax.QuantizerConfig(dim=100, bits=3)) == pytest.approx(4.16, rel=1e-12)
  # prod at 1 bit has no codebook words: d = 64, fp16 norms: 2 sign words = 64 bits + 16 + 16 → 1.5.
  assert bpc(tqjax.QuantizerConfig(dim=64, bits=1, variant="prod", norm_dtype="float16")) == 1.5


# ----------------------------------------------------------------------------- errors


def test_input_errors_name_the_offending_value():
  tq = tqjax.make_quantizer(32, 4)
  with pytest.raises(ValueError, match=r"dim=32.*\(4, 31\)"):
    tqjax.encode(tq, jnp.zeros((4, 31)))
  with pytest.raises(ValueError, match=r"\(33,\)"):
    tqjax.estimate_ip(tq, jnp.zeros(33), tqjax.encode(tq, jnp.zeros((2, 32))))
  with pytest.raises(TypeError, match="int32"):
    tqjax.encode(tq, jnp.zeros((4, 32), jnp.int32))
  with pytest.raises(TypeError, match="int32"):
    tqjax.estimate_ip(tq, jnp.zeros(32, jnp.int32), tqjax.encode(tq, jnp.zeros((2, 32))))
  with pytest.raises(TypeError, match="Quantizer"):
    tqjax.encode(tq.config, jnp.zeros(32))
  with pytest.raises(TypeError, match="Code"):
    tqjax.decode(tq, (jnp.zeros(4, jnp.uint32), jnp.zeros(())))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(dim=32, bits=0), "bits=0"),
        (dict(dim=32, bits=9), "bits=9"),
        (dict(dim=32, bits=2.0), "bits=2.0"),
        (dict(dim=1, bits=2), "dim=1"),
        (dict(dim=32, bits=2, variant="prod", qjl_dim=0), "qjl_dim=0"),
        (dict(dim=32, bits=2, variant="prod", qjl_dim=-4), "qjl_dim=-4"),
        (dict(dim=32, bits=2, variant="sum"), "variant='sum'"),
        (dict(dim=32, bits=2, norm_dtype="float64"), "norm_dtype='float64'"),
        (dict(dim=32, bits=2, rotation="dct"), "rotation='dct'"),
        (dict(dim=32, bits=2, variant="prod", qjl_kind="srht"), "qjl_kind='srht'"),
        (dict(dim=32, bits=2, variant="prod", norm_correction=True), "norm_correction"),
    ],
)
def test_config_errors_name_the_offending_value(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    tqjax.QuantizerConfig(**kwargs)


def test_hadamard_rotation_needs_power_of_two_dim():
  with pytest.raises(ValueError, match="dim=100"):
    tqjax.make_quantizer(100, 2, rotation="hadamard")


def test_mismatched_code_and_quantizer():
  x = jax.random.normal(jax.random.key(9), (5, 32))
  q4 = tqjax.make_quantizer(32, 4)
  code3 = tqjax.encode(tqjax.make_quantizer(32, 3), x)
  for fn in (lambda: tqjax.decode(q4, code3), lambda: tqjax.estimate_ip(q4, x[0], code3)):
    with pytest.raises(ValueError, match=r"another quantizer.*bits=3 vs 4"):
      fn()
  # prod at 4 bits stores 3-bit codes, so its words fit a 3-bit mse quantizer.
  prod_code = tqjax.encode(tqjax.make_quantizer(32, 4, "prod"), x)
  with pytest.raises(ValueError, match=r"bits=4 vs 3, variant='prod' vs 'mse'"):
    tqjax.decode(tqjax.make_quantizer(32, 3), prod_code)
  wide = tqjax.encode(tqjax.make_quantizer(32, 4, "prod", qjl_dim=64), x)
  with pytest.raises(ValueError, match=r"qjl_dim=64 vs None"):
    tqjax.decode(tqjax.make_quantizer(32, 4, "prod"), wide)


# Pairs of quantizers whose codes have identical shapes and dtypes: only the identity that the
# code carries tells them apart, and decoding with the wrong one returned garbage silently.
LOOKALIKES = [
    (dict(dim=32, bits=3), dict(dim=32, bits=3, seed=1), "seed=0 vs 1"),
    (dict(dim=30, bits=3), dict(dim=32, bits=3), "dim=30 vs 32"),  # both ceil(dim/32) = 1 word per bit
    (dict(dim=32, bits=3, rotation="hadamard"), dict(dim=32, bits=3), "rotation='hadamard' vs 'haar'"),
    (dict(dim=32, bits=3, variant="prod", qjl_kind="gaussian"), dict(dim=32, bits=3, variant="prod"), "qjl_kind"),
    (dict(dim=32, bits=3, norm_correction=True), dict(dim=32, bits=3), "norm_correction=True vs False"),
]


@pytest.mark.parametrize("made,used,pattern", LOOKALIKES)
def test_code_of_a_lookalike_quantizer_raises(made, used, pattern):
  maker, user = tqjax.make_quantizer(**made), tqjax.make_quantizer(**used)
  x = jnp.ones((2, made["dim"]))
  code = tqjax.encode(maker, x)
  # The arrays alone cannot tell: the code has exactly the shapes and dtypes `user` makes.
  shapes = lambda c: [(a.shape, a.dtype) for a in jax.tree.leaves(c)]  # noqa: E731
  assert shapes(code) == shapes(tqjax.encode(user, jnp.ones((2, used["dim"]))))
  q = jnp.ones(used["dim"])
  for fn in (tqjax.check_code, tqjax.decode, tqjax.decode_rotated):
    with pytest.raises(ValueError, match=pattern):
      fn(user, code)
  with pytest.raises(ValueError, match=pattern):
    tqjax.estimate_ip(user, q, code)
  # At trace time, under jit, and for codes that went through eval_shape / tree_map / scan.
  with pytest.raises(ValueError, match=pattern):
    jax.jit(tqjax.decode)(user, code)
  spec = jax.eval_shape(tqjax.encode, maker, x)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), spec)
  _, scanned = jax.lax.scan(lambda c, v: (c, tqjax.encode(maker, v)), 0, x)
  for c in (spec, zeros, scanned):
    assert c.config == maker.config
    with pytest.raises(ValueError, match=pattern):
      jax.eval_shape(tqjax.decode, user, c)
  assert tqjax.decode(maker, zeros).shape == x.shape  # the maker still decodes them


def test_code_identity_is_static_metadata():
  tq = tqjax.make_quantizer(32, 2, "prod", seed=3)
  code = tqjax.encode(tq, jnp.ones((4, 32)))
  leaves, treedef = jax.tree.flatten(code)
  assert len(leaves) == 4  # codes, norms, signs, residual norms: the config is not a leaf
  assert jax.tree.unflatten(treedef, leaves).config == tq.config
  # Codes of two quantizers have different tree structures, so they cannot be mixed in one tree op.
  other = tqjax.encode(tqjax.make_quantizer(32, 2, "prod", seed=4), jnp.ones((4, 32)))
  assert jax.tree.structure(other) != treedef
  with pytest.raises(TypeError):
    tqjax.Code(code.codes, code.norms)  # a Code says which quantizer made it


def _hand_code(tq, lead, *, words=None, norms=None, signs=None, rnorms=None, sign_words=None):
  """A Code with tq's identity and arrays of the given (possibly inconsistent) shapes."""
  cfg = tq.config
  words = cfg.mse_bits * (-(-cfg.dim // 32)) if words is None else words
  z = lambda shape, dt=jnp.uint32: jnp.zeros(shape, dt)  # noqa: E731
  prod = cfg.variant == "prod"
  return tqjax.Code(
      z((*lead, words)),
      z(lead if norms is None else norms, jnp.float32),
      z((*lead, sign_words if sign_words is not None else -(-cfg.sketch_dim // 32))) if prod or signs else None,
      z(lead if rnorms is None else rnorms, jnp.float32) if prod else None,
      config=cfg,
  )


def test_check_code_names_the_inconsistent_array():
  mse, prod = tqjax.make_quantizer(32, 4), tqjax.make_quantizer(32, 4, "prod", qjl_dim=64)
  tqjax.check_code(mse, _hand_code(mse, (5,)))
  tqjax.check_code(prod, _hand_code(prod, (5,)))
  # norms [4] against codes [5, 4]: the norms and codes disagree; the codes' width is right.
  with pytest.raises(ValueError, match=r"norms.shape=\(4,\) but codes.shape=\(5, 4\)"):
    tqjax.check_code(mse, _hand_code(mse, (5,), norms=(4,)))
  with pytest.raises(ValueError, match=r"bits=4.*\[\.\.\., 4\].*\(5, 3\)"):
    tqjax.check_code(mse, _hand_code(mse, (5,), words=3))
  with pytest.raises(ValueError, match=r"norms.shape=\(5,\) but residual_norms.shape=\(6,\)"):
    tqjax.check_code(prod, _hand_code(prod, (5,), rnorms=(6,)))
  with pytest.raises(ValueError, match=r"\(5, 1\).*qjl_dim=64.*\[\.\.\., 2\]"):
    tqjax.check_code(prod, _hand_code(prod, (5,), sign_words=1))
  with pytest.raises(ValueError, match=r"has QJL signs.*'mse'"):
    tqjax.check_code(mse, _hand_code(mse, (5,), signs=True))


@pytest.mark.parametrize("seed", [-1, 2.5, "7", True, None])
def test_bad_seed_raises_naming_seed(seed):
  with pytest.raises(ValueError, match="seed=") as e:
    tqjax.QuantizerConfig(dim=32, bits=2, seed=seed)
  assert repr(seed) in str(e.value)
  with pytest.raises(ValueError, match="seed="):
    tqjax.make_quantizer(32, 2, "prod", seed=seed)


def test_array_likes_accepted():
  tq = tqjax.make_quantizer(4, 2, "prod", seed=1)
  x = [[1.0, -2.0, 0.5, 0.25], [0.0, 1.0, 1.0, -1.0]]
  code = tqjax.encode(tq, x)
  assert_codes_identical(code, tqjax.encode(tq, jnp.asarray(x)))
  assert_close(tqjax.estimate_ip(tq, x[0], code), tqjax.estimate_ip(tq, jnp.asarray(x[0]), code), rtol=0, atol=0)
  for bad in ({"not": "an array"}, "abcd"):
    with pytest.raises(TypeError, match="x must be an array of vectors"):
      tqjax.encode(tq, bad)
  with pytest.raises(TypeError, match="x.dtype=int32"):
    tqjax.encode(tq, [[1, 2, 3, 4]])


# ----------------------------------------------------------------------------- distortion

# Per-vector squared errors of independent unit vectors are i.i.d.; their per-vector relative SD
# is ≈ 0.25–0.4 at d = 64–128 and ≈ 0.1 at d = 1024 (sum of d weakly dependent per-coordinate
# errors, each with CV ≈ 1.5–3), so these counts give a mean with relative SE ≤ 0.3%:
# the 2% band is ≥ 6 SE wide, and the 4 SE check below is the sharper one.
DISTORTION_SAMPLES = {64: 16384, 128: 8192, 1024: 1024}


@pytest.mark.parametrize("dim,rotation", [(64, "haar"), (128, "haar"), (128, "hadamard"), (1024, "haar")])
def test_mse_distortion_matches_lloyd_max(dim, rotation):
  n = DISTORTION_SAMPLES[dim]
  x = unit(jax.random.normal(jax.random.key(dim), (n, dim)))

  # A fixed Π is enough: x uniform on the sphere makes Π·x uniform for any orthogonal Π.
  tqs = tuple(tqjax.make_quantizer(dim, bits, seed=1, rotation=rotation) for bits in (1, 2, 3, 4))
  for bits, (_, x_hat, _) in zip((1, 2, 3, 4), _round_trips(tqs, x, x[0]), strict=True):
    e = np.sum((np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)) ** 2, axis=-1)
    mean, se = e.mean(), e.std(ddof=1) / math.sqrt(n)
    optimum = tqjax.distortion(bits, dim)
    assert 4 * se < 0.02 * optimum, "not enough samples for the 2% check to mean anything"
    assert abs(mean - optimum) < 0.02 * optimum, (bits, mean, optimum)
    # E‖x − x̂‖² = d·mse exactly (each coordinate has the sphere density): 4 SE.
    assert abs(mean - optimum) < 4 * se, (bits, mean, optimum, se)
    # The paper's bounds: 4^−b ≤ D_mse ≤ (√3·π/2)·4^−b.
    assert 4.0**-bits < mean < math.sqrt(3) * math.pi / 2 * 4.0**-bits


# ----------------------------------------------------------------------------- prod: unbiased

PROD_DIM = 64
# 4000 seeds: with 1000, the seeds 0..999 of the current constants drew a 4.1 SE fluctuation in
# the mse power check below (blocks 1000..7999 of 1000 seeds each: |z| ≤ 1.3).
PROD_SEEDS = 4000


def _stack(trees):
  """Stacks pytrees of one structure along a new leading axis (as NumPy-built jnp arrays)."""
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *trees)


@pytest.fixture(scope="module")
def seed_constants():
  """Π and S of seeds 0..PROD_SEEDS−1 for both QJL kinds, stacked along a leading axis.

  Built once through `make_quantizer` (prod, 1 bit: no codebook) and shared by every bit width:
  Π and S depend on the seed only, the codebook on (bits, dim) only. The seed itself is static
  metadata of the config, so whole quantizers of different seeds cannot be stacked; the stacked
  rotation and sketch can, and `_quantizers` puts them back into a Quantizer.
  """
  out = {}
  for kind in ("gaussian", "orthogonal"):
    qs = [tqjax.make_quantizer(PROD_DIM, 1, "prod", seed=s, qjl_kind=kind) for s in range(PROD_SEEDS)]
    out[kind] = (qs[0].config, _stack([q.rotation for q in qs]), _stack([q.qjl for q in qs]))
  return out


def _quantizers(constants, bits, variant):
  """The stacked quantizers (vmap over axis 0) of `variant` at `bits` over the seeds of `constants`."""
  config, rotation, qjl = constants
  config = dataclasses.replace(config, bits=bits, variant=variant)
  n = rotation.matrix.shape[0]
  codebook = tqjax.make_codebook(config.mse_bits, PROD_DIM) if config.mse_bits else None
  codebook = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), codebook)
  return tqjax.Quantizer(config, rotation, codebook, qjl if variant == "prod" else None)


@jax.jit
def _ip_errors(stacked, x, q):
  est = jax.vmap(lambda tq: tqjax.estimate_ip(tq, q, tqjax.encode(tq, x)))(stacked)
  return est - jnp.dot(q, x)


@pytest.fixture(scope="module")
def x_and_q():
  kx, kw = jax.random.split(jax.random.key(11))
  x = unit(jax.random.normal(kx, (PROD_DIM,)))
  w = jax.random.normal(kw, (PROD_DIM,))
  w = unit(w - jnp.dot(w, x) * x)
  return x, 0.6 * x + 0.8 * w  # ‖q‖ = 1, ⟨q, x⟩ = 0.6


def _mean_var_se(e):
  """Mean, SE of the mean, variance and SE of the variance of i.i.d. draws e.

  SE(mean) = sd/√N; SE(var) = √((μ4 − σ⁴)/N), μ4 the fourth central moment.
  """
  n = e.size
  var = e.var()
  mu4 = np.mean((e - e.mean()) ** 4)
  return e.mean(), e.std(ddof=1) / math.sqrt(n), var, math.sqrt((mu4 - var**2) / n)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_is_unbiased_over_quantizer_seeds(x_and_q, seed_constants, bits):
  """The randomness of TurboQuant is in Π and S, both drawn from the seed: for one fixed pair
  (x, q), the error of estimate_ip over independent seeds must have mean 0."""
  x, q = x_and_q
  qx, qq = float(jnp.dot(q, x)), float(jnp.dot(q, q))
  var = {}
  for kind in ("gaussian", "orthogonal"):
    e = np.asarray(_ip_errors(_quantizers(seed_constants[kind], bits, "prod"), x, q), np.float64)
    mean, se, var[kind], se_var = _mean_var_se(e)
    assert abs(mean) < 3 * se, (kind, mean, se)
    # Conditioned on Π the error is the QJL error of ⟨q', r⟩ (q' = Π·q, r the residual), whose
    # variance is at most (π/(2m))·‖q‖²‖r‖² (Gaussian S; lower for orthogonal S, see below), and
    # E_Π‖r‖² = D_mse(b − 1) (D_mse(0) = 1: no codebook, r = Π·x). One-sided, 3 SE of the variance.
    d_prev = tqjax.distortion(bits - 1, PROD_DIM) if bits > 1 else 1.0
    bound = math.pi / (2 * PROD_DIM) * d_prev * qq
    assert var[kind] < bound + 3 * se_var, (kind, var[kind], bound, se_var)
  # Orthogonal S rows are negatively dependent within a block: lower error than Gaussian S
  # (measured ≈ 1/3 of it). Each sample variance has relative SE ≈ √((κ−1)/N) ≈ 3% over 4000
  # seeds (κ the error's kurtosis, ≈ 3–4), so the ratio's SE is ≈ 0.04 if S's kind made no
  # difference: a chance ratio below 0.75 would be a > 6 SE event; 1/3 is far below it.
  assert var["orthogonal"] < 0.75 * var["gaussian"], var
  # Power check: TurboQuant_mse at the same bits *is* biased, by exactly −D_mse(b)·⟨q, x⟩
  # (E_Π[x̂] = (1 − D_mse)·x by rotation invariance and the centroid condition), and the same
  # 3 SE test rejects it.
  e = np.asarray(_ip_errors(_quantizers(seed_constants["gaussian"], bits, "mse"), x, q), np.float64)
  mean, se, _, _ = _mean_var_se(e)
  assert abs(mean) > 3 * se, (mean, se)
  assert abs(mean + tqjax.distortion(bits, PROD_DIM) * qx) < 4 * se, (mean, se)


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal"])
def test_stacked_quantizers_match_make_quantizer(seed_constants, kind):
  """The vmapped quantizers of the test above hold exactly make_quantizer's constants per seed."""
  for bits in (1, 2, 3, 4):
    for variant in ("mse", "prod"):
      stacked = _quantizers(seed_constants[kind], bits, variant)
      for s in (0, 7, PROD_SEEDS - 1):
        tq = tqjax.make_quantizer(PROD_DIM, bits, variant, seed=s, qjl_kind=kind)
        assert dataclasses.replace(stacked.config, seed=s) == tq.config
        one = jax.tree.map(lambda a: a[s], stacked)
        for got, want in zip(jax.tree.leaves(one), jax.tree.leaves(tq), strict=True):
          np.testing.assert_array_equal(got, want)


def test_default_quantizer_is_independent_of_numpy_seed_0_data():
  """NumPy drops trailing zero seed words: the constants' seeds end in a nonzero tag so that the
  default rotation is not np.random.default_rng(0), which user data often comes from."""
  d = 128
  x = np.random.default_rng(0).standard_normal((d, d)).astype(np.float32)
  tq = tqjax.make_quantizer(d, 4)  # seed=0, the default
  out = np.asarray(tqjax.decode(tq, tqjax.encode(tq, jnp.asarray(x))))
  rel = np.mean(np.sum((out - x) ** 2, axis=-1) / np.sum(x * x, axis=-1))
  # Any data independent of Π has E[rel] = D_mse. Per-vector sd ≈ 0.33·D at d = 128, so the mean
  # of 128 vectors has SE ≈ 0.03·D: 20% is > 6 SE. (Measured with the bug: 21·D.)
  assert abs(rel / tqjax.distortion(4, d) - 1) < 0.2, rel / tqjax.distortion(4, d)


# ----------------------------------------------------------------------------- real data


def test_real_minilm_keys_match_sphere_distortion(minilm_qkv_path):
  """4-bit mse on the 73,728 real MiniLM keys (d = 32): relative error ≈ D_mse(4, 32).

  For any fixed vector u, E_Π‖u − Q(u)‖²/‖u‖² = D_mse exactly (Π·u/‖u‖ is uniform on the sphere),
  so the per-vector mean relative error, averaged over seeds, estimates D_mse without bias. The keys
  are not independent (they share per-head mean directions), so the SE of one seed's mean is not
  sd/√73728; we measure it instead from the spread over independent seeds: SE = sd_seeds/√n_seeds.
  4 SE with 7 degrees of freedom is a two-sided p ≈ 0.005. Each seed alone must also be within 5%
  (seed-to-seed sd is ≈ 0.7% of D).
  """
  with np.load(minilm_qkv_path) as data:
    keys = data["keys"]
  assert keys.shape == (2, 6, 12, 512, 32) and keys.dtype == np.float16
  k = jnp.asarray(keys).reshape(-1, 32)

  @jax.jit
  def rel_err(tq, k):  # k is an argument: closing over it would make XLA constant-fold 2.4 MB
    k32 = k.astype(jnp.float32)
    err = jnp.sum((tqjax.decode(tq, tqjax.encode(tq, k)) - k32) ** 2, axis=-1)
    return jnp.mean(err / jnp.sum(k32 * k32, axis=-1))

  optimum = tqjax.distortion(4, 32)
  per_seed = np.array([float(rel_err(tqjax.make_quantizer(32, 4, seed=s), k)) for s in range(8)])
  assert np.all(np.abs(per_seed / optimum - 1) < 0.05), per_seed / optimum
  se = per_seed.std(ddof=1) / math.sqrt(per_seed.size)
  assert abs(per_seed.mean() - optimum) < 4 * se, (per_seed.mean(), optimum, se)


def test_quantizer_is_a_pytree_with_static_config():
  tq = tqjax.make_quantizer(32, 2, "prod", seed=3)
  leaves, treedef = jax.tree.flatten(tq)
  assert len(leaves) == 4  # Π, centroids, boundaries, S
  again = jax.tree.unflatten(treedef, leaves)
  assert again.config == tq.config and again.dim == 32
  assert dataclasses.replace(tq.config, bits=3).mse_bits == 2
