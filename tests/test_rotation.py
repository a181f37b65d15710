"""Random rotations: Haar matrices (orthogonality, Haar statistics, determinism) and randomized
Hadamard transforms (self-inverse, Sylvester matrix, power-of-2 only); rotate/unrotate."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import tqjax
from tqjax import rotation

pytestmark = pytest.mark.math

N_SEEDS = 4000
# Eager mode compiles every primitive of the log2(d)-step butterfly separately (seconds on CPU);
# one jit per function keeps the tests fast and checks they trace.
_hadamard = jax.jit(tqjax.hadamard_transform)
_rotate = jax.jit(tqjax.rotate)
_unrotate = jax.jit(tqjax.unrotate)
_dense = jax.jit(rotation.dense_matrix)


@pytest.mark.parametrize("dim", [2, 3, 17, 64, 128])
def test_haar_matrix_is_orthogonal(dim):
  m = np.asarray(tqjax.make_rotation(dim, seed=3).matrix, np.float64)
  assert m.shape == (dim, dim)
  # float32 storage of a float64 orthogonal matrix: entries err by ≤ 2^−24 relative, so MᵀM
  # deviates from I by ~√dim·6e-8; 1e-5 is loose for that and tight against any real defect.
  np.testing.assert_allclose(m @ m.T, np.eye(dim), atol=1e-5, equal_nan=False)
  np.testing.assert_allclose(m.T @ m, np.eye(dim), atol=1e-5, equal_nan=False)


@pytest.fixture(scope="module")
def haar_sample():
  """Π for seeds 0..N_SEEDS−1 at dim 6 (float64 from the float32 constants)."""
  return np.stack([np.asarray(tqjax.make_rotation(6, seed=s).matrix, np.float64) for s in range(N_SEEDS)])


def test_haar_determinant_is_a_fair_sign(haar_sample):
  # Haar measure on O(d) gives det = +1 and −1 with probability ½ each. QR of a Gaussian
  # *without* the sign fix returns a Q whose det has a fixed sign (LAPACK's Householder product
  # always has the same parity), so this fails loudly if the fix is dropped.
  # SE of a fraction at p = ½ over N draws: 0.5/√N (≈ 0.008 here); 4 SE tolerance.
  det = np.linalg.det(haar_sample)
  np.testing.assert_allclose(np.abs(det), 1.0, atol=1e-5, equal_nan=False)
  frac = np.mean(det > 0)
  assert abs(frac - 0.5) < 4 * 0.5 / math.sqrt(N_SEEDS), frac


def test_haar_entry_statistics(haar_sample):
  n, d, _ = haar_sample.shape
  # Each column of a Haar matrix is uniform on the sphere: E[Π_ij] = 0, E[Π_ij²] = 1/d.
  # Without the sign fix Π_11 = g_11/r_11 with r_11 = −sign(g_11)‖g_1‖, so it is always negative
  # (mean −E|x_1| ≈ −0.38 at d = 6). Per-entry SE: √(1/d)/√N ≈ 0.0065; we test every entry at 4.5 SE
  # (36 entries: a false alarm needs a |z| > 4.5 somewhere, p ≈ 2.5e-4).
  mean = haar_sample.mean(axis=0)
  se = np.sqrt(haar_sample.var(axis=0, ddof=1) / n)
  assert np.all(np.abs(mean) < 4.5 * se), mean / se
  sq = haar_sample**2
  z2 = (sq.mean(axis=0) - 1 / d) / np.sqrt(sq.var(axis=0, ddof=1) / n)
  assert np.all(np.abs(z2) < 4.5), z2
  # Diaconis–Shahshahani: for Haar O(d), d ≥ 2, tr(Π) has mean 0 and second moment exactly 1.
  tr = np.trace(haar_sample, axis1=1, axis2=2)
  assert abs(tr.mean()) < 4 * tr.std(ddof=1) / math.sqrt(n)
  assert abs(np.mean(tr**2) - 1) < 4 * np.std(tr**2, ddof=1) / math.sqrt(n)


def test_haar_is_deterministic_in_seed():
  a = tqjax.make_rotation(48, seed=11)
  b = tqjax.make_rotation(48, seed=11)
  assert np.all(np.isfinite(a.matrix))
  np.testing.assert_array_equal(a.matrix, b.matrix)
  # Not only the cache: the NumPy draw itself is reproducible from the seed tuple.
  np.testing.assert_array_equal(
      rotation.haar_matrix(48, rotation.constants_rng(11, 0)), rotation.haar_matrix(48, rotation.constants_rng(11, 0))
  )
  c = tqjax.make_rotation(48, seed=12)
  assert not np.allclose(a.matrix, c.matrix)


def test_hadamard_signs_are_deterministic_in_seed():
  a = tqjax.make_rotation(64, seed=5, kind="hadamard")
  b = tqjax.make_rotation(64, seed=5, kind="hadamard")
  c = tqjax.make_rotation(64, seed=6, kind="hadamard")
  assert a.matrix is None and a.signs.shape == (64,)
  np.testing.assert_array_equal(a.signs, b.signs)
  assert set(np.unique(np.asarray(a.signs)).tolist()) == {-1.0, 1.0}
  assert not np.array_equal(a.signs, c.signs)


@pytest.mark.parametrize("dim", [1, 2, 4, 8, 64, 256])
def test_hadamard_transform_matches_sylvester_matrix(dim):
  x = jax.random.normal(jax.random.key(dim), (3, dim))
  want = np.asarray(x, np.float64) @ scipy.linalg.hadamard(dim).T / math.sqrt(dim)
  np.testing.assert_allclose(_hadamard(x), want, rtol=1e-5, atol=1e-5, equal_nan=False)


def test_hadamard_transform_tiny_case():
  # H_4 (Sylvester) rows: (1,1,1,1), (1,−1,1,−1), (1,1,−1,−1), (1,−1,−1,1). For x = (1, 2, 3, 4):
  # H·x = (10, −2, −4, 0), divided by √4 = 2 → (5, −1, −2, 0).
  got = tqjax.hadamard_transform(jnp.array([1.0, 2.0, 3.0, 4.0]))
  np.testing.assert_allclose(got, [5, -1, -2, 0], atol=1e-6, equal_nan=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hadamard_transform_is_self_inverse(dtype):
  x = jax.random.normal(jax.random.key(0), (2, 5, 128), dtype)
  y = _hadamard(x)
  assert y.dtype == dtype and y.shape == x.shape
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(
      np.asarray(_hadamard(y), np.float32), np.asarray(x, np.float32), atol=tol, rtol=tol, equal_nan=False
  )


@pytest.mark.parametrize("dim", [3, 6, 12, 100])
def test_hadamard_needs_power_of_two(dim):
  with pytest.raises(ValueError, match=f"d={dim}"):
    tqjax.hadamard_transform(jnp.zeros((2, dim)))
  with pytest.raises(ValueError, match=f"dim={dim}"):
    tqjax.make_rotation(dim, kind="hadamard")


@pytest.mark.parametrize("kind,dim", [("haar", 5), ("haar", 128), ("hadamard", 32), ("hadamard", 128)])
def test_rotate_unrotate_inverse(kind, dim):
  rot = tqjax.make_rotation(dim, seed=1, kind=kind)
  x = jax.random.normal(jax.random.key(dim), (2, 7, dim))
  y = _rotate(rot, x)
  assert y.shape == x.shape
  np.testing.assert_allclose(_unrotate(rot, y), x, atol=1e-5, equal_nan=False)
  np.testing.assert_allclose(_rotate(rot, _unrotate(rot, x)), x, atol=1e-5, equal_nan=False)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5, equal_nan=False)
  # rotate is Π·x for the dense Π, and Π is orthogonal.
  pi = np.asarray(_dense(rot), np.float64)
  np.testing.assert_allclose(pi @ pi.T, np.eye(dim), atol=1e-5, equal_nan=False)
  np.testing.assert_allclose(y, np.asarray(x, np.float64) @ pi.T, atol=1e-5, equal_nan=False)


def test_hadamard_rotation_is_sylvester_times_signs():
  rot = tqjax.make_rotation(16, seed=2, kind="hadamard")
  want = scipy.linalg.hadamard(16) * np.asarray(rot.signs)[None, :] / 4.0  # H·diag(s)/√16
  np.testing.assert_allclose(_dense(rot), want, atol=1e-6, equal_nan=False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_rotate_keeps_dtype(dtype):
  for kind in ("haar", "hadamard"):
    rot = tqjax.make_rotation(32, kind=kind)
    x = jnp.ones((4, 32), dtype)
    assert jax.eval_shape(tqjax.rotate, rot, x).dtype == dtype
    assert jax.eval_shape(tqjax.unrotate, rot, x).dtype == dtype


def test_rotation_is_a_pytree_through_jit():
  rot = tqjax.make_rotation(32, seed=4)
  x = jax.random.normal(jax.random.key(1), (3, 32))
  y = _rotate(rot, x)
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(y, tqjax.rotate(rot, x))


def test_rotation_errors():
  with pytest.raises(ValueError, match="kind='givens'"):
    tqjax.make_rotation(32, kind="givens")
  with pytest.raises(ValueError, match="dim=1"):
    tqjax.make_rotation(1)
  rot = tqjax.make_rotation(32)
  with pytest.raises(ValueError, match=r"\(4, 31\)"):
    tqjax.rotate(rot, jnp.zeros((4, 31)))
  with pytest.raises(ValueError, match=r"\(4, 33\)"):
    tqjax.unrotate(rot, jnp.zeros((4, 33)))
  with pytest.raises(TypeError, match="Rotation"):
    tqjax.rotate(tqjax.make_qjl(32), jnp.zeros(32))


@pytest.mark.parametrize("seed", [-1, 2.5, "7", True, None])
def test_bad_seed_raises_naming_seed(seed):
  for kind in ("haar", "hadamard"):
    with pytest.raises(ValueError, match="seed=") as e:
      tqjax.make_rotation(32, kind, seed=seed)
    assert repr(seed) in str(e.value)


def test_argument_order_and_keyword_only_seed():
  """make_rotation(dim, kind, *, seed), as make_qjl(dim, sketch_dim, kind, *, seed)."""
  np.testing.assert_array_equal(tqjax.make_rotation(64, "hadamard", seed=3).signs,
                                tqjax.make_rotation(64, kind="hadamard", seed=3).signs)
  with pytest.raises(ValueError, match="kind=3"):
    tqjax.make_rotation(64, 3)  # a positional seed lands in `kind` and is refused
  with pytest.raises(TypeError):
    tqjax.make_rotation(64, "haar", 3)
  # NumPy integer seeds are the same seed as Python ints.
  np.testing.assert_array_equal(tqjax.make_rotation(16, seed=np.int64(5)).matrix, tqjax.make_rotation(16, seed=5).matrix)


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
def test_array_likes_accepted(kind):
  rot = tqjax.make_rotation(4, kind, seed=1)
  x = [[1.0, 2.0, -0.5, 0.0]]
  np.testing.assert_array_equal(tqjax.rotate(rot, x), tqjax.rotate(rot, jnp.asarray(x)))
  np.testing.assert_array_equal(tqjax.unrotate(rot, x), tqjax.unrotate(rot, jnp.asarray(x)))
  np.testing.assert_array_equal(tqjax.hadamard_transform(x), tqjax.hadamard_transform(jnp.asarray(x)))


def test_numpy_integer_dim_accepted_bool_rejected():
  # QuantizerConfig accepts NumPy integer dims, so make_rotation must too.
  assert tqjax.make_rotation(np.int64(8)).matrix.shape == (8, 8)
  with pytest.raises(ValueError, match="dim=True"):
    tqjax.make_rotation(True)
