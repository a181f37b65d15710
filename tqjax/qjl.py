"""QJL: a 1-bit sign sketch of a residual and the unbiased inner-product estimator.

With a sketch matrix S [m, d] whose rows s_j are isotropic, E[sign(s_j·r)·(s_j·q)] = κ·⟨q, r⟩/‖r‖
where κ = E|s_j·e| for a unit e. Storing sign(S·r) (m bits) and ‖r‖ therefore gives the unbiased
estimate ⟨q, r⟩ ≈ ‖r‖/(κ·m) · ⟨S·q, sign(S·r)⟩.

* "gaussian":   S has i.i.d. N(0, 1) entries (the paper's proof); κ = √(2/π).
* "orthogonal": blocks of d orthonormal rows (QR of a Gaussian, sign-fixed) scaled by √d, so each
  row is uniform on the sphere of radius √d; κ = √d·Γ(d/2)/(√π·Γ((d+1)/2)), exactly. The rows of a
  block are exchangeable but not independent, which lowers the variance (measured: ~3x less error).

Shapes: `...` is any leading batch dims, `dim` the vector length, m = sketch_dim the sketch rows,
W = ceil(m/32) the packed sign words.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from tqjax import packing
from tqjax.rotation import check_seed, constants_rng, haar_matrix

__all__ = ["QJL_KINDS", "Qjl", "make_qjl", "project", "qjl_decode", "qjl_encode", "qjl_ip", "signs"]

QJL_KINDS = ("orthogonal", "gaussian")
_HIGHEST = jax.lax.Precision.HIGHEST
_STREAM = 1  # the rotation uses stream 0 of the same seed: S must be independent of Π


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("matrix",), meta_fields=("kind", "dim", "kappa")
)
@dataclasses.dataclass(frozen=True)
class Qjl:
  """QJL sketch constants. matrix: S [m, dim] float32; kappa = E|s_j·e| (a Python float)."""

  kind: str
  dim: int
  kappa: float
  matrix: jax.Array

  @property
  def sketch_dim(self) -> int:
    """m, the number of sketch rows."""
    return self.matrix.shape[0]


def _kappa(kind: str, dim: int) -> float:
  if kind == "gaussian":
    return math.sqrt(2.0 / math.pi)
  # √d·E|u_1| for u uniform on S^{d−1}.
  return math.sqrt(dim) * math.exp(special.gammaln(dim / 2) - special.gammaln((dim + 1) / 2)) / math.sqrt(math.pi)


@functools.lru_cache(maxsize=64)
def _sketch_matrix(kind: str, dim: int, m: int, seed: int) -> np.ndarray:
  if kind == "gaussian":
    return constants_rng(seed, _STREAM).standard_normal((m, dim)).astype(np.float32)
  blocks = [haar_matrix(dim, constants_rng(seed, _STREAM, i))[: min(dim, m - i * dim)] for i in range(-(-m // dim))]
  return (np.concatenate(blocks, axis=0) * math.sqrt(dim)).astype(np.float32)


def make_qjl(dim: int, sketch_dim: int | None = None, kind: str = "orthogonal", *, seed: int = 0) -> Qjl:
  """Builds the QJL sketch S [m, dim] for R^dim with m = sketch_dim rows (default m = dim).

  The argument order is the one of `make_rotation` and `make_quantizer`: sizes, then the kind,
  then the keyword-only seed (an integer >= 0). S draws from a stream of the seed that the
  rotation of the same seed does not use.
  """
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
    raise ValueError(f"qjl needs an integer dim >= 2, got {dim=}")
  if kind not in QJL_KINDS:
    raise ValueError(f"qjl {kind=} must be one of {QJL_KINDS}")
  m = dim if sketch_dim is None else sketch_dim
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
    raise ValueError(f"sketch_dim must be an integer >= 1 or None, got sketch_dim={sketch_dim!r}")
  seed = check_seed(seed)
  return Qjl(kind, int(dim), _kappa(kind, dim), jnp.asarray(_sketch_matrix(kind, int(dim), int(m), seed)))


def project(qjl: Qjl, x: jax.Array) -> jax.Array:
  """S·x along the last axis: x [..., dim] float (array-like) → [..., m] in x's dtype."""
  x = jnp.asarray(x)
  return jnp.einsum("...d,md->...m", x, qjl.matrix.astype(x.dtype), precision=_HIGHEST)


def qjl_encode(qjl: Qjl, r: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sign sketch of residuals r [..., dim] → (packed signs uint32 [..., W], ‖r‖ [...]).

  Bit j is 1 where s_j·r ≥ 0 (sign +1), 0 where negative (sign −1).
  """
  r = jnp.asarray(r)
  bits = (project(qjl, r) >= 0).astype(jnp.uint8)
  return packing.pack(bits, 1), jnp.linalg.norm(r, axis=-1)


def signs(qjl: Qjl, packed: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Unpacks sign words uint32 [..., W] into ±1 values [..., m] of `dtype`."""
  bits = packing.unpack(jnp.asarray(packed), 1, qjl.sketch_dim)
  return bits.astype(dtype) * 2 - 1


def qjl_ip(qjl: Qjl, q: jax.Array, packed: jax.Array, rnorm: jax.Array) -> jax.Array:
  """Unbiased estimate of ⟨q, r⟩ from r's sketch: q [..., dim] float, packed uint32 [..., W],
  rnorm [...] = ‖r‖ (batch dims broadcast). Returns [...] in q's dtype."""
  sq = project(qjl, q)
  s = signs(qjl, packed, sq.dtype)
  return jnp.asarray(rnorm).astype(sq.dtype) * jnp.sum(sq * s, axis=-1) / (qjl.kappa * qjl.sketch_dim)


def qjl_decode(qjl: Qjl, packed: jax.Array, rnorm: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Unbiased reconstruction of r: ‖r‖/(κ·m)·Sᵀ·sign(S·r) from packed uint32 [..., W] and
  rnorm [...]. Returns [..., dim] of `dtype`."""
  s = signs(qjl, packed, dtype)
  back = jnp.einsum("...m,md->...d", s, qjl.matrix.astype(dtype), precision=_HIGHEST)
  return jnp.asarray(rnorm).astype(dtype)[..., None] * back / (qjl.kappa * qjl.sketch_dim)
