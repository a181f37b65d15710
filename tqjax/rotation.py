"""Random rotations Π: Haar-orthogonal matrices and randomized Hadamard transforms.

A `Rotation` is a small pytree made once from (dim, kind, seed). Its constants are drawn with
NumPy on the host in float64, so the same seed gives bit-identical rotations on every host and
backend. Vectors are rows: `rotate(rot, x)` computes Π·x for every x along the last axis.
Shapes: `...` is any leading batch dims, `dim` the vector length.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ROTATION_KINDS",
    "Rotation",
    "check_seed",
    "constants_rng",
    "dense_matrix",
    "haar_matrix",
    "hadamard_transform",
    "make_rotation",
    "rotate",
    "unrotate",
]

ROTATION_KINDS = ("haar", "hadamard")
# Rotations run at Precision.HIGH, not HIGHEST: rotating 2M 128-d f32 vectors on an H200 took
# 0.84 ms at HIGH, 0.89 at DEFAULT and 2.01 at HIGHEST (experiments/bench_encode.py, jax 0.11.2,
# 2026-11-27), so XLA:GPU runs HIGH at tf32-class speed. Its ~1e-3 relative rounding is two orders below the
# quantization error (≥ 0.1 relative at ≤ 4 bits). CPU computes f32 exactly at any precision.
_PRECISION = jax.lax.Precision.HIGH
_STREAM = 0  # random stream of the rotation; QJL draws from stream 1 of the same seed
# Last word of every seed: NumPy's SeedSequence drops trailing zero words, so without it the
# seed-0 rotation would draw exactly the numbers of np.random.default_rng(0), which users'
# data may come from too (a 21x error blow-up was seen on such data).
_TAG = 0x54514A58  # "TQJX"


def check_seed(seed) -> int:
  """Validates a quantizer seed (an integer >= 0, not a bool) and returns it as an int."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an integer >= 0, got seed={seed!r}")
  return int(seed)


def constants_rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
  """The NumPy generator of one quantizer constant: (seed, stream, *extra) never collide."""
  return np.random.default_rng((check_seed(seed), *extra, stream, _TAG))


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("matrix", "signs"), meta_fields=("kind", "dim")
)
@dataclasses.dataclass(frozen=True)
class Rotation:
  """A fixed random orthogonal transform Π of R^dim.

  kind == "haar":     matrix [dim, dim] float32 (Π itself), signs None.
  kind == "hadamard": signs [dim] float32 (±1), matrix None; Π = H·diag(signs)/√dim.
  """

  kind: str
  dim: int
  matrix: jax.Array | None
  signs: jax.Array | None


def haar_matrix(dim: int, rng: np.random.Generator) -> np.ndarray:
  """Haar-distributed orthogonal matrix [dim, dim] (float64): QR of a Gaussian with sign fix."""
  g = rng.standard_normal((dim, dim))
  q, r = np.linalg.qr(g)
  # Without the sign fix QR's output is not Haar-distributed (Mezzadri 2007).
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


@functools.lru_cache(maxsize=64)
def _haar_cached(dim: int, seed: int) -> np.ndarray:
  return haar_matrix(dim, constants_rng(seed, _STREAM)).astype(np.float32)


def make_rotation(dim: int, kind: str = "haar", *, seed: int = 0) -> Rotation:
  """Builds the rotation of `kind` for R^dim, deterministic in `seed` (an integer >= 0).

  The argument order is the one of `make_qjl` and `make_quantizer`: sizes, then the kind, then
  the keyword-only seed.
  """
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
    raise ValueError(f"rotation needs an integer dim >= 2, got {dim=}")
  seed = check_seed(seed)
  if kind == "haar":
    return Rotation(kind, dim, jnp.asarray(_haar_cached(dim, seed)), None)
  if kind == "hadamard":
    if not _is_power_of_two(dim):
      raise ValueError(f"kind='hadamard' needs a power-of-2 dim, got {dim=}; use kind='haar'")
    signs = constants_rng(seed, _STREAM).choice(np.array([-1.0, 1.0], np.float32), size=dim)
    return Rotation(kind, dim, None, jnp.asarray(signs))
  raise ValueError(f"rotation {kind=} must be one of {ROTATION_KINDS}")


def hadamard_transform(x: jax.Array) -> jax.Array:
  """Orthonormal fast Walsh–Hadamard transform over the last axis, O(d log d).

  x: [..., d] with d a power of 2. Returns H·x/√d, which is its own inverse.
  """
  x = jnp.asarray(x)
  d = x.shape[-1] if x.ndim else 0
  if not _is_power_of_two(d):
    raise ValueError(f"hadamard_transform needs a power-of-2 last dim, got {d=}")
  lead = x.shape[:-1]
  h = 1
  y = x
  while h < d:
    y = y.reshape(*lead, d // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  return y.reshape(*lead, d) * jnp.asarray(1.0 / np.sqrt(d), x.dtype)


def _check_last_dim(rot: Rotation, x, name: str) -> jax.Array:
  """x as a jax array whose last dim is the rotation's dim (array-likes are accepted)."""
  if not isinstance(rot, Rotation):
    raise TypeError(f"expected a tqjax Rotation, got {type(rot).__name__}")
  x = jnp.asarray(x)
  if x.shape[-1:] != (rot.dim,):
    raise ValueError(f"{name} last dim must equal the rotation dim {rot.dim}, got {name}.shape={x.shape}")
  return x


def rotate(rot: Rotation, x: jax.Array) -> jax.Array:
  """Π·x along the last axis. x: [..., dim] float; returns [..., dim] in x's dtype."""
  x = _check_last_dim(rot, x, "x")
  if rot.kind == "haar":
    return jnp.einsum("...j,ij->...i", x, rot.matrix.astype(x.dtype), precision=_PRECISION)
  return hadamard_transform(x * rot.signs.astype(x.dtype))


def unrotate(rot: Rotation, y: jax.Array) -> jax.Array:
  """Πᵀ·y (the inverse of `rotate`). y: [..., dim] float; returns [..., dim] in y's dtype."""
  y = _check_last_dim(rot, y, "y")
  if rot.kind == "haar":
    return jnp.einsum("...i,ij->...j", y, rot.matrix.astype(y.dtype), precision=_PRECISION)
  return hadamard_transform(y) * rot.signs.astype(y.dtype)


def dense_matrix(rot: Rotation) -> jax.Array:
  """Π as a dense [dim, dim] float32 matrix (for tests and for kernels that want a matmul)."""
  if rot.kind == "haar":
    return rot.matrix
  return rotate(rot, jnp.eye(rot.dim, dtype=jnp.float32)).T
