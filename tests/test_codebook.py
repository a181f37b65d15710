"""Lloyd–Max codebooks for sphere coordinates: optimality on a Monte-Carlo sample, the exact
d = 3 (uniform) and b = 1 cases, the Gaussian limit, structure for every bit width, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import tqjax

pytestmark = pytest.mark.math

# Gaussian Lloyd–Max quantizer (J. Max, 1960), positive half of the centroids for N(0, 1), and its
# MSE; b = 1 is exact: centroid E|g| = √(2/π), MSE 1 − 2/π.
GAUSSIAN_CENTROIDS = {1: [0.7979], 2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3440, 2.1520]}
GAUSSIAN_MSE = {1: 1 - 2 / math.pi, 2: 0.1175, 3: 0.03455, 4: 0.009497}

N_SAMPLES = 1_000_000


def sphere_first_coordinate(dim: int, n: int, seed: int) -> np.ndarray:
  """n draws of x_1 for x uniform on S^{dim−1}, float64.

  x = g/‖g‖ with g ~ N(0, I_dim), so x_1 = g_1/√(g_1² + V) with V = Σ_{i≥2} g_i² ~ χ²_{dim−1}
  independent of g_1: the same random variable without materializing n·dim normals for large
  dim (for small dim the sum of squares is cheaper than JAX's χ² sampler at small df).
  """
  kg, kv = jax.random.split(jax.random.key(seed))
  g = np.asarray(jax.random.normal(kg, (n,)), np.float64)
  if dim - 1 <= 16:
    v = np.sum(np.square(np.asarray(jax.random.normal(kv, (n, dim - 1)), np.float64)), axis=-1)
  else:
    v = np.asarray(jax.random.chisquare(kv, dim - 1, (n,)), np.float64)
  return g / np.sqrt(g * g + v)


@pytest.fixture(scope="module")
def samples():
  cache = {}

  def get(dim):
    if dim not in cache:
      cache[dim] = sphere_first_coordinate(dim, N_SAMPLES, seed=dim)
    return cache[dim]

  return get


def _cell_stats(x, boundaries, n_cells):
  cell = np.searchsorted(boundaries, x)
  count = np.bincount(cell, minlength=n_cells)
  mean = np.bincount(cell, weights=x, minlength=n_cells) / count
  var = np.bincount(cell, weights=x * x, minlength=n_cells) / count - mean**2
  return cell, count, mean, var


@pytest.mark.parametrize("dim", [2, 3, 8, 32, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_conditions_hold_on_sphere_sample(samples, bits, dim):
  x = samples(dim)
  c, b, mse = tqjax.lloyd_max(bits, dim)
  # Condition 1 (nearest neighbour): boundaries are the midpoints of adjacent centroids.
  np.testing.assert_allclose(b, (c[1:] + c[:-1]) / 2, rtol=0, atol=1e-15, equal_nan=False)
  # Condition 2 (centroid): each centroid is the mean of its cell. The cell's sample mean has
  # standard error sd_k/√n_k (i.i.d. draws); 4 SE bounds a two-sided miss at p ≈ 6e-5 per cell.
  _, count, mean, var = _cell_stats(x, b, 2**bits)
  assert np.all(count > 100), count
  se = np.sqrt(var / count)
  z = (mean - c) / se
  assert np.all(np.abs(z) < 4), f"centroid condition off by {z} SE at {bits=} {dim=}"
  # The MSE reported by lloyd_max is the sample's mean squared error: per-draw errors e_i are
  # i.i.d., so the sample mean has SE sd(e)/√N.
  q = c[np.searchsorted(b, x)]
  e = (x - q) ** 2
  se_mse = e.std(ddof=1) / math.sqrt(e.size)
  assert abs(e.mean() - mse) < 4 * se_mse, (e.mean(), mse, se_mse)


def test_monte_carlo_check_rejects_the_seed_codebook(samples):
  """The check above has power: the seed's Beta(d/2, d/2) codebook (= the exact codebook of
  dimension d+1, since the exact density is Beta((d−1)/2, (d−1)/2)) fails it at d = 8."""
  dim, bits = 8, 2
  x = samples(dim)
  c, b, _ = tqjax.lloyd_max(bits, dim + 1)
  _, count, mean, var = _cell_stats(x, b, 2**bits)
  z = (mean - c) / np.sqrt(var / count)
  assert np.max(np.abs(z)) > 10, z


@pytest.mark.parametrize("dim", [2, 3, 8, 128, 1000])
def test_one_bit_is_the_half_mean(dim):
  # For b = 1 the symmetric Lloyd–Max quantizer splits at 0 and its centroid is E[X | X > 0] = E|X|,
  # which for a sphere coordinate is Γ(d/2)/(√π·Γ((d+1)/2)); the MSE is E[X²] − c² = 1/d − c².
  c, b, mse = tqjax.lloyd_max(1, dim)
  half_mean = math.exp(special.gammaln(dim / 2) - special.gammaln((dim + 1) / 2)) / math.sqrt(math.pi)
  np.testing.assert_allclose(c, [-half_mean, half_mean], rtol=1e-10, equal_nan=False)
  np.testing.assert_allclose(b, [0.0], atol=1e-15, equal_nan=False)
  np.testing.assert_allclose(mse, 1 / dim - half_mean**2, rtol=1e-9, equal_nan=False)


def test_dim_2_one_bit_arcsine():
  # d = 2: x_1 = cos θ, θ uniform. E[cos θ | cos θ > 0] = (1/π)∫_{−π/2}^{π/2} cos θ dθ = 2/π,
  # and E[cos² θ] = 1/2, so the MSE is 1/2 − 4/π².
  c, _, mse = tqjax.lloyd_max(1, 2)
  np.testing.assert_allclose(c, [-2 / math.pi, 2 / math.pi], rtol=1e-10, equal_nan=False)
  np.testing.assert_allclose(mse, 0.5 - 4 / math.pi**2, rtol=1e-9, equal_nan=False)


def test_dim_3_is_the_uniform_quantizer():
  # d = 3: x_1 is uniform on [−1, 1] (Archimedes). The Lloyd–Max quantizer of a uniform density
  # has equal cells. b = 2: cells of width 2/4 = 0.5 → centroids at the midpoints
  # −0.75, −0.25, 0.25, 0.75; boundaries −0.5, 0, 0.5; MSE = width²/12 = 0.25/12 = 1/48.
  c, b, mse = tqjax.lloyd_max(2, 3)
  np.testing.assert_allclose(c, [-0.75, -0.25, 0.25, 0.75], atol=1e-12, equal_nan=False)
  np.testing.assert_allclose(b, [-0.5, 0.0, 0.5], atol=1e-12, equal_nan=False)
  np.testing.assert_allclose(mse, 1 / 48, rtol=1e-9, equal_nan=False)


@pytest.mark.parametrize("bits", range(1, 9))
def test_dim_3_uniform_every_bit_width(bits):
  # Same arithmetic for 2^b cells of width w = 2/2^b: c_k = −1 + (k + ½)·w, MSE = w²/12.
  n = 2**bits
  w = 2.0 / n
  c, b, mse = tqjax.lloyd_max(bits, 3)
  np.testing.assert_allclose(c, -1 + (np.arange(n) + 0.5) * w, atol=1e-12, equal_nan=False)
  np.testing.assert_allclose(b, -1 + np.arange(1, n) * w, atol=1e-12, equal_nan=False)
  np.testing.assert_allclose(mse, w * w / 12, rtol=1e-9, equal_nan=False)
  assert tqjax.distortion(bits, 3) == pytest.approx(3 * w * w / 12, rel=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_large_dim_matches_gaussian_lloyd_max(bits):
  # √d·x_1 → N(0, 1) as d → ∞ (deviation O(1/d) = 1e-5 here, below the table's 4-decimal rounding).
  dim = 100_000
  c, _, _ = tqjax.lloyd_max(bits, dim)
  half = c[2 ** (bits - 1) :] * math.sqrt(dim)
  np.testing.assert_allclose(half, GAUSSIAN_CENTROIDS[bits], atol=1e-3, equal_nan=False)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_approaches_gaussian_from_below(bits):
  gauss = GAUSSIAN_MSE[bits]
  d = [tqjax.distortion(bits, dim) for dim in (8, 64, 128, 1024, 100_000)]
  # Finite-d coordinates have lighter tails than the Gaussian, so D_mse(b, d) increases with d.
  assert all(lo < hi for lo, hi in zip(d, d[1:])), d
  assert d[-1] == pytest.approx(gauss, rel=1e-3)
  assert d[-2] < gauss
  # The paper's bounds: 4^−b ≤ D_mse ≤ (√3·π/2)·4^−b.
  assert all(4.0**-bits <= x <= math.sqrt(3) * math.pi / 2 * 4.0**-bits for x in d[1:]), d


@pytest.mark.parametrize("dim", [3, 128])
@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_structure(bits, dim):
  cb = tqjax.make_codebook(bits, dim)
  c, b = np.asarray(cb.centroids), np.asarray(cb.boundaries)
  assert (cb.bits, cb.dim) == (bits, dim)
  assert c.shape == (2**bits,) and b.shape == (2**bits - 1,)
  assert c.dtype == np.float32 and b.dtype == np.float32
  assert np.all(np.isfinite(c)) and np.all(np.isfinite(b))
  assert np.all(np.diff(c) > 0), "centroids must increase strictly"
  np.testing.assert_array_equal(c, -c[::-1])  # exact symmetry, also after the float32 cast
  assert -1 < c[0] and c[-1] < 1
  assert np.all((c[:-1] < b) & (b < c[1:])), "boundaries must interleave the centroids"
  mse = [tqjax.lloyd_max(k, dim)[2] for k in range(1, bits + 1)]
  assert all(x > y > 0 for x, y in zip(mse, mse[1:])), mse


def test_codebook_is_a_pytree_with_static_metadata():
  cb = tqjax.make_codebook(3, 64)
  leaves, treedef = jax.tree.flatten(cb)
  assert len(leaves) == 2
  again = jax.tree.unflatten(treedef, leaves)
  assert (again.bits, again.dim) == (3, 64)
  out = jax.jit(lambda cb, y: tqjax.dequantize(cb, tqjax.quantize(cb, y)))(cb, jnp.zeros(4))
  assert out.shape == (4,)


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_quantize_is_nearest_centroid(bits):
  cb = tqjax.make_codebook(bits, 64)
  y = jax.random.normal(jax.random.key(bits), (4, 1000)) * 0.2
  idx = tqjax.quantize(cb, y)
  assert idx.dtype == jnp.uint8 and idx.shape == y.shape
  c = np.asarray(cb.centroids, np.float64)
  assert np.all(np.isfinite(c))
  nearest = np.argmin(np.abs(np.asarray(y, np.float64)[..., None] - c), axis=-1)
  np.testing.assert_array_equal(np.asarray(idx), nearest)
  np.testing.assert_array_equal(tqjax.dequantize(cb, idx), c.astype(np.float32)[nearest])
  assert tqjax.dequantize(cb, idx, jnp.bfloat16).dtype == jnp.bfloat16


def test_quantize_accepts_array_likes():
  cb = tqjax.make_codebook(2, 32)
  y = [-0.5, -0.01, 0.01, 0.5]
  np.testing.assert_array_equal(tqjax.quantize(cb, y), [0, 1, 2, 3])
  np.testing.assert_array_equal(tqjax.quantize(cb, y), tqjax.quantize(cb, jnp.asarray(y)))


def test_quantize_nan_maps_to_last_code():
  cb = tqjax.make_codebook(3, 32)
  idx = tqjax.quantize(cb, jnp.array([jnp.nan, 0.0]))
  assert int(idx[0]) == 7


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, "3", None])
def test_bad_bits_raise(bits):
  with pytest.raises(ValueError, match=r"bits=") as e:
    tqjax.make_codebook(bits, 64)
  assert repr(bits) in str(e.value)
  with pytest.raises(ValueError, match=r"bits="):
    tqjax.lloyd_max(bits, 64)
  with pytest.raises(ValueError, match=r"bits="):
    tqjax.distortion(bits, 64)


@pytest.mark.parametrize("dim", [1, 0, -5, 2.5, True])
def test_bad_dim_raises(dim):
  with pytest.raises(ValueError, match=r"dim=") as e:
    tqjax.make_codebook(2, dim)
  assert repr(dim) in str(e.value)
