"""TurboQuant_mse and TurboQuant_prod: encode, decode and inner products over a code pytree.

A vector x is stored as its norm ‖x‖ and the codes of its rotated direction y = Π·x/‖x‖.
* "mse":  `bits` bits per coordinate through the Lloyd–Max codebook; optional norm correction
  rescales the dequantized direction ŷ to unit length before applying ‖x‖ (folded into the
  stored scale at encode time, so decoders and kernels never see it).
* "prod": (bits − 1)-bit mse codes plus a 1-bit QJL sketch of the residual r = y − ŷ and ‖r‖,
  which makes inner products (and the decoded vector) unbiased.

Every function takes any leading batch dims, works on one vector at a time (so jit, vmap and
shard_map compose), does its math in float32 (float64 inputs stay float64), and returns the
input's dtype. A vector with a NaN or ±Inf entry encodes to a NaN norm, so it decodes to NaN and
its inner products are NaN; its neighbours are untouched. A zero vector decodes to exact zeros.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tqjax import packing
from tqjax.codebook import Codebook, check_bits, dequantize, make_codebook, quantize
from tqjax.qjl import QJL_KINDS, Qjl, make_qjl, qjl_decode, qjl_encode, qjl_ip
from tqjax.rotation import ROTATION_KINDS, Rotation, make_rotation, rotate, unrotate

VARIANTS = ("mse", "prod")
NORM_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """Static description of a TurboQuant quantizer.

  dim: vector length d (≥ 2). bits: total bits per coordinate as in the paper (prod spends
  bits − 1 on the codebook and 1 on QJL). qjl_dim: QJL sketch rows m (default d).
  norm_dtype: storage dtype of norms (and residual norms), counted in the accounting.
  """

  dim: int
  bits: int
  variant: str = "mse"
  norm_correction: bool = False
  norm_dtype: str = "float32"
  rotation: str = "haar"
  qjl_kind: str = "orthogonal"
  qjl_dim: int | None = None
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 2:
      raise ValueError(f"dim must be an integer >= 2, got dim={self.dim!r}")
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
    check_bits(self.bits)
    if self.variant == "prod" and self.norm_correction:
      raise ValueError("norm_correction=True would bias the prod estimator; use it with variant='mse'")
    if self.norm_dtype not in NORM_DTYPES:
      raise ValueError(f"norm_dtype={self.norm_dtype!r} must be one of {NORM_DTYPES}")
    if self.rotation not in ROTATION_KINDS:
      raise ValueError(f"rotation={self.rotation!r} must be one of {ROTATION_KINDS}")
    if self.qjl_kind not in QJL_KINDS:
      raise ValueError(f"qjl_kind={self.qjl_kind!r} must be one of {QJL_KINDS}")
    if self.qjl_dim is not None and (
        isinstance(self.qjl_dim, bool) or not isinstance(self.qjl_dim, (int, np.integer)) or self.qjl_dim < 1
    ):
      raise ValueError(f"qjl_dim must be an integer >= 1 or None, got qjl_dim={self.qjl_dim!r}")

  @property
  def mse_bits(self) -> int:
    """Bits per coordinate spent on the codebook (bits − 1 for prod; 0 means no codebook)."""
    return self.bits - 1 if self.variant == "prod" else self.bits

  @property
  def sketch_dim(self) -> int:
    """QJL rows m (0 for mse)."""
    return (self.qjl_dim or self.dim) if self.variant == "prod" else 0


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("codes", "norms", "qjl_signs", "residual_norms"),
    meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class Code:
  """Encoded vectors with leading batch dims [...].

  codes:          uint32 [..., mse_bits·ceil(d/32)] packed codebook indices (`tqjax.packing`).
  norms:          [...] the scale of the unit reconstruction, in the config's norm_dtype: ‖x‖, or
                  ‖x‖/‖ŷ‖ with norm correction (so decoding is always norms·Πᵀŷ); NaN for
                  non-finite inputs.
  qjl_signs:      uint32 [..., ceil(m/32)] packed signs of S·r (prod only, else None).
  residual_norms: [...] ‖r‖ of the unit direction's residual (prod only, else None).
  """

  codes: jax.Array
  norms: jax.Array
  qjl_signs: jax.Array | None = None
  residual_norms: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    return self.norms.shape

  @property
  def nbytes(self) -> int:
    """Bytes actually held by the arrays of this code."""
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("rotation", "codebook", "qjl"), meta_fields=("config",)
)
@dataclasses.dataclass(frozen=True)
class Quantizer:
  """A TurboQuant quantizer: its static config and constants (Π, codebook, QJL sketch).

  A pytree whose leaves are the constant arrays, so it passes through jit/vmap/shard_map as an
  argument or may be closed over. Build it with `make_quantizer`.
  """

  config: QuantizerConfig
  rotation: Rotation
  codebook: Codebook | None
  qjl: Qjl | None

  @property
  def dim(self) -> int:
    return self.config.dim


def make_quantizer(dim: int, bits: int, variant: str = "mse", *, seed: int = 0, **options: Any) -> Quantizer:
  """Builds a quantizer; `options` are the other `QuantizerConfig` fields."""
  return quantizer_from_config(QuantizerConfig(dim=dim, bits=bits, variant=variant, seed=seed, **options))


def quantizer_from_config(config: QuantizerConfig) -> Quantizer:
  """Builds the constants of `config` (cached per (bits, dim) for codebooks)."""
  return Quantizer(
      config=config,
      rotation=make_rotation(config.dim, config.seed, config.rotation),
      codebook=make_codebook(config.mse_bits, config.dim) if config.mse_bits > 0 else None,
      qjl=make_qjl(config.dim, config.sketch_dim, config.seed, config.qjl_kind) if config.variant == "prod" else None,
  )


# ----------------------------------------------------------------------------- validation


def _math_dtype(dtype) -> jnp.dtype:
  return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _check_vectors(tq: Quantizer, x: jax.Array, name: str) -> None:
  if not isinstance(tq, Quantizer):
    raise TypeError(f"expected a tqjax Quantizer, got {type(tq).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point (float32, bfloat16, float16), got {x.dtype=}")
  if x.ndim < 1 or x.shape[-1] != tq.dim:
    raise ValueError(f"{name} last dim must be the quantizer's dim={tq.dim}, got {name}.shape={x.shape}")


def check_code(tq: Quantizer, code: Code) -> None:
  """Raises ValueError if `code` was not made by a quantizer with `tq`'s config."""
  if not isinstance(code, Code):
    raise TypeError(f"expected a tqjax Code, got {type(code).__name__}")
  cfg = tq.config
  want = packing.packed_words(cfg.dim, cfg.mse_bits) if cfg.mse_bits else 0
  if code.codes.dtype != jnp.uint32 or code.codes.shape != (*code.shape, want):
    raise ValueError(
        f"code does not match the quantizer ({cfg.variant}, bits={cfg.bits}, dim={cfg.dim}): expected "
        f"codes uint32 [..., {want}], got {code.codes.dtype} {code.codes.shape}"
    )
  is_prod = code.qjl_signs is not None
  if is_prod != (cfg.variant == "prod"):
    raise ValueError(f"code {'has' if is_prod else 'lacks'} QJL signs but the quantizer is {cfg.variant!r}")
  if is_prod and code.qjl_signs.shape != (*code.shape, packing.num_columns(cfg.sketch_dim)):
    raise ValueError(
        f"code's qjl_signs shape {code.qjl_signs.shape} does not match qjl_dim={cfg.sketch_dim} of the quantizer"
    )


# ----------------------------------------------------------------------------- core math


def _direction(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits x [..., d] into (unit direction [..., d], norm [...]); NaN norm if x is not finite."""
  norm = jnp.linalg.norm(x, axis=-1)
  finite = jnp.all(jnp.isfinite(x), axis=-1)
  safe = jnp.where(finite & (norm > 0), norm, 1)
  u = jnp.where(finite[..., None], x / safe[..., None], 0)
  return u, jnp.where(finite, norm, jnp.nan)


def codebook_direction(tq: Quantizer, codes: jax.Array, dtype=jnp.float32) -> jax.Array:
  """ŷ [..., d]: the centroids of the packed codes [..., words] (zeros without a codebook stage)."""
  cb = tq.codebook
  if cb is None:  # prod at 1 bit: no codebook stage
    return jnp.zeros((*codes.shape[:-1], tq.dim), dtype)
  return dequantize(cb, packing.unpack(codes, cb.bits, tq.dim), dtype)


def encode(tq: Quantizer, x: jax.Array) -> Code:
  """Encodes vectors x [..., d] (float32/bfloat16/float16) into a `Code` with batch dims [...]."""
  _check_vectors(tq, x, "x")
  cfg = tq.config
  u, norm = _direction(x.astype(_math_dtype(x.dtype)))
  y = rotate(tq.rotation, u)
  if tq.codebook is not None:
    codes = packing.pack(quantize(tq.codebook, y), tq.codebook.bits)
  else:
    codes = jnp.zeros((*y.shape[:-1], 0), jnp.uint32)
  norm_dtype = jnp.dtype(cfg.norm_dtype)
  y_hat = codebook_direction(tq, codes, y.dtype)
  if cfg.variant == "mse":
    if cfg.norm_correction:  # fold 1/‖ŷ‖ into the stored scale: decoding stays scale·ŷ
      norm = norm / jnp.linalg.norm(y_hat, axis=-1)
    return Code(codes, norm.astype(norm_dtype))
  signs, rnorm = qjl_encode(tq.qjl, y - y_hat)
  return Code(codes, norm.astype(norm_dtype), signs, rnorm.astype(norm_dtype))


def decode_rotated(tq: Quantizer, code: Code, dtype=jnp.float32) -> jax.Array:
  """The unit direction's reconstruction in rotated space, ŷ (+ QJL term) [..., d], no norm."""
  check_code(tq, code)
  y_hat = codebook_direction(tq, code.codes, dtype)
  if tq.qjl is not None:
    y_hat = y_hat + qjl_decode(tq.qjl, code.qjl_signs, code.residual_norms, dtype)
  return y_hat


def decode(tq: Quantizer, code: Code, dtype=jnp.float32) -> jax.Array:
  """Reconstructs x̂ [..., d] in `dtype` (unbiased for prod: E_S[x̂] = x on the codebook's ŷ)."""
  math = _math_dtype(jnp.dtype(dtype))
  y_hat = decode_rotated(tq, code, math)
  return (code.norms.astype(math)[..., None] * unrotate(tq.rotation, y_hat)).astype(dtype)


def estimate_ip(tq: Quantizer, q: jax.Array, code: Code) -> jax.Array:
  """Estimates ⟨q, x⟩ for every encoded x. q [..., d] broadcasts against the code's batch dims.

  Rotates q once (Π·q, and S·Π·q for prod) and never forms x̂. Unbiased for prod.
  Returns [broadcast batch dims] in q's dtype.
  """
  _check_vectors(tq, q, "q")
  check_code(tq, code)
  math = _math_dtype(q.dtype)
  q_rot = rotate(tq.rotation, q.astype(math))
  ip = jnp.sum(q_rot * codebook_direction(tq, code.codes, math), axis=-1)
  if tq.qjl is not None:
    ip = ip + qjl_ip(tq.qjl, q_rot, code.qjl_signs, code.residual_norms)
  return (code.norms.astype(math) * ip).astype(q.dtype)


# ----------------------------------------------------------------------------- accounting


def bits_per_coordinate(config: QuantizerConfig) -> float:
  """Stored bits per coordinate: packed codes, norm, QJL signs and residual norm (with padding)."""
  norm_bits = jnp.dtype(config.norm_dtype).itemsize * 8
  bits = 32 * (packing.packed_words(config.dim, config.mse_bits) if config.mse_bits else 0) + norm_bits
  if config.variant == "prod":
    bits += 32 * packing.num_columns(config.sketch_dim) + norm_bits
  return bits / config.dim


def compression_ratio(config: QuantizerConfig, baseline_bits: int = 16) -> float:
  """Uncompressed bits per coordinate (16 = bf16, 32 = fp32) over `bits_per_coordinate`."""
  return baseline_bits / bits_per_coordinate(config)
