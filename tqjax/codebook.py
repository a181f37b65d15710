"""Lloyd–Max codebooks for one coordinate of a uniformly random unit vector in R^d.

Such a coordinate X has density f(x) = (1−x²)^α / B(½, α+1) on [−1, 1] with α = (d−3)/2, i.e.
(X+1)/2 ~ Beta((d−1)/2, (d−1)/2). Both pieces the Lloyd iteration needs are closed-form:
the cell mass is a regularized incomplete Beta function and the first moment is
∫ x f = [(1−l²)^(α+1) − (1−u²)^(α+1)] / (2(α+1)·B(½, α+1)). d = 2 (arcsine density, singular at
±1) and d = 3 (uniform) are covered by the same formulas. Results are cached per (bits, dim).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "Codebook",
    "check_bits",
    "dequantize",
    "distortion",
    "lloyd_max",
    "make_codebook",
    "quantize",
]

MIN_BITS, MAX_BITS = 1, 8


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("centroids", "boundaries"),
    meta_fields=("bits", "dim"),
)
@dataclasses.dataclass(frozen=True)
class Codebook:
  """Scalar quantizer for sphere coordinates in R^dim.

  centroids:  [2^bits] float32, increasing, symmetric (c[k] = −c[2^bits−1−k]).
  boundaries: [2^bits − 1] float32, the interior decision thresholds (midpoints of centroids).
  """

  bits: int
  dim: int
  centroids: jax.Array
  boundaries: jax.Array


def check_bits(bits, lo: int = MIN_BITS, hi: int = MAX_BITS, name: str = "bits") -> int:
  """Validates an integer bit width in [lo, hi] and returns it."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lo <= bits <= hi:
    raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {name}={bits!r}")
  return int(bits)


def _cdf(x: np.ndarray, a: float) -> np.ndarray:
  return special.betainc(a, a, (np.clip(x, -1.0, 1.0) + 1.0) / 2.0)


def _first_moment_primitive(x: np.ndarray, a: float) -> np.ndarray:
  """−(1−x²)^a / (2a·B(½, a)): an antiderivative of x·f(x), with a = α+1 = (d−1)/2."""
  one_minus = np.clip(1.0 - np.square(np.clip(x, -1.0, 1.0)), 0.0, 1.0)
  log_term = a * np.log(np.maximum(one_minus, 1e-300)) - special.betaln(0.5, a)
  return -np.where(one_minus > 0, np.exp(log_term), 0.0) / (2.0 * a)


@functools.lru_cache(maxsize=None, typed=True)  # typed: 2.0 must not hit the cache of 2 and skip validation
def lloyd_max(bits: int, dim: int, tol: float = 1e-12, max_iter: int = 20000):
  """Lloyd–Max centroids and boundaries (float64 NumPy) for the sphere-coordinate density.

  Returns (centroids [2^bits], boundaries [2^bits − 1], mse) where mse = E[(X − Q(X))²] per
  coordinate, so a unit vector's total squared error is dim·mse.
  """
  check_bits(bits)
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
    raise ValueError(f"codebook needs an integer dim >= 2, got {dim=}")
  a = (dim - 1) / 2.0
  n = 2**bits
  # Start from the high-rate optimum: cells equal in mass under f^(1/3) ∝ (1−x²)^(α/3).
  a3 = (a - 1.0) / 3.0 + 1.0
  c = 2.0 * special.betaincinv(a3, a3, (np.arange(n) + 0.5) / n) - 1.0
  for _ in range(max_iter):
    b = (c[1:] + c[:-1]) / 2.0
    edges = np.concatenate([[-1.0], b, [1.0]])
    mass = np.diff(_cdf(edges, a))
    moment = np.diff(_first_moment_primitive(edges, a))
    new_c = np.where(mass > 0, moment / np.maximum(mass, 1e-300), (edges[1:] + edges[:-1]) / 2)
    new_c = (new_c - new_c[::-1]) / 2.0  # the density is even: keep the codebook exactly symmetric
    done = np.max(np.abs(new_c - c)) < tol * np.max(np.abs(new_c))
    c = new_c
    if done:
      break
  b = (c[1:] + c[:-1]) / 2.0
  edges = np.concatenate([[-1.0], b, [1.0]])
  mass = np.diff(_cdf(edges, a))
  # Centroids are conditional means, so E[(X−Q)²] = E[X²] − Σ p_k c_k², with E[X²] = 1/dim.
  mse = max(1.0 / dim - float(np.sum(mass * c**2)), 0.0)
  return c, b, mse


def make_codebook(bits: int, dim: int) -> Codebook:
  """The cached Lloyd–Max codebook for (bits, dim) as a float32 pytree: centroids [2^bits],
  boundaries [2^bits − 1]."""
  c, b, _ = lloyd_max(check_bits(bits), dim)
  return Codebook(bits, dim, jnp.asarray(c, jnp.float32), jnp.asarray(b, jnp.float32))


def distortion(bits: int, dim: int) -> float:
  """Optimal total squared error D_mse(bits) of a unit vector in R^dim (the paper's D_mse)."""
  return dim * lloyd_max(check_bits(bits), dim)[2]


def quantize(cb: Codebook, y: jax.Array) -> jax.Array:
  """Nearest-centroid index per coordinate, by binary search over the boundaries.

  y: [...] float (array-like). Returns [...] uint8 codes in [0, 2^bits). NaN maps to code
  2^bits − 1.
  """
  y = jnp.asarray(y)
  # Up to 4 bits, comparing against all 2^b − 1 boundaries is one fused elementwise pass; wider
  # codebooks use an unrolled binary search (b steps). Both count the boundaries below y.
  method = "compare_all" if cb.bits <= 4 else "scan_unrolled"
  idx = jnp.searchsorted(cb.boundaries.astype(y.dtype), y, side="left", method=method)
  return idx.astype(jnp.uint8)


def dequantize(cb: Codebook, idx: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Centroid values for codes. idx: [...] integer codes; returns [...] of `dtype`, sharded as idx
  (the codebook is replicated; with explicit mesh axes jax asks the gather for its sharding)."""
  idx = jnp.asarray(idx).astype(jnp.int32)
  return cb.centroids.astype(dtype).at[idx].get(out_sharding=jax.typeof(idx).sharding)
