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

A `Code` carries the config of the quantizer that made it as static pytree metadata, so decoding
it with any other quantizer (another seed, dim, bits, variant, ...) raises at trace time instead
of returning garbage; the metadata survives jit, scan, tree_map and eval_shape.

Shapes: `...` is any leading batch dims, `dim` the vector length (the head dim H when the vectors
are attention heads), m = sketch_dim the QJL rows, W = ceil(m/32) the packed sign words.
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
from tqjax.rotation import ROTATION_KINDS, Rotation, check_seed, make_rotation, rotate, unrotate

__all__ = [
    "NORM_DTYPES",
    "VARIANTS",
    "Code",
    "Quantizer",
    "QuantizerConfig",
    "bits_per_coordinate",
    "check_code",
    "codebook_direction",
    "compression_ratio",
    "decode",
    "decode_rotated",
    "encode",
    "estimate_ip",
    "make_quantizer",
    "quantizer_from_config",
]

VARIANTS = ("mse", "prod")
NORM_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """Static description of a TurboQuant quantizer.

  dim: vector length (≥ 2). bits: total bits per coordinate as in the paper (prod spends
  bits − 1 on the codebook and 1 on QJL). variant: "mse" or "prod". norm_correction (mse only):
  store ‖x‖/‖ŷ‖ so reconstructions have the input's norm. norm_dtype: storage dtype of norms (and
  residual norms), counted in the accounting. rotation: "haar" or "hadamard" (power-of-2 dim).
  qjl_kind: "orthogonal" or "gaussian". qjl_dim: QJL sketch rows m (default dim).
  seed: integer >= 0; the rotation and the QJL sketch are drawn from it.
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
    check_seed(self.seed)

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
    meta_fields=("config",),
)
@dataclasses.dataclass(frozen=True)
class Code:
  """Encoded vectors with leading batch dims [...].

  codes:          uint32 [..., mse_bits·ceil(dim/32)] packed codebook indices (`tqjax.packing`).
  norms:          [...] the scale of the unit reconstruction, in the config's norm_dtype: ‖x‖, or
                  ‖x‖/‖ŷ‖ with norm correction (so decoding is always norms·Πᵀŷ); NaN for
                  non-finite inputs.
  qjl_signs:      uint32 [..., W] packed signs of S·r (prod only, else None).
  residual_norms: [...] ‖r‖ of the unit direction's residual (prod only, else None).
  config:         keyword-only, static: the `QuantizerConfig` of the quantizer that made the code.
  """

  codes: jax.Array
  norms: jax.Array
  qjl_signs: jax.Array | None = None
  residual_norms: jax.Array | None = None
  config: QuantizerConfig = dataclasses.field(kw_only=True)

  @property
  def shape(self) -> tuple[int, ...]:
    """The batch dims [...] (the shape of `norms`)."""
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
    """The vector length `dim` of the config."""
    return self.config.dim


def make_quantizer(dim: int, bits: int, variant: str = "mse", *, seed: int = 0, **options: Any) -> Quantizer:
  """Builds a quantizer for vectors [..., dim]; `options` are the other `QuantizerConfig` fields."""
  return quantizer_from_config(QuantizerConfig(dim=dim, bits=bits, variant=variant, seed=seed, **options))


def quantizer_from_config(config: QuantizerConfig) -> Quantizer:
  """Builds the constants of `config`: Π [dim, dim] (or Hadamard signs [dim]), the codebook
  [2^mse_bits] (cached per (bits, dim)) and, for prod, S [m, dim]."""
  if not isinstance(config, QuantizerConfig):
    raise TypeError(f"expected a tqjax QuantizerConfig, got {type(config).__name__}")
  return Quantizer(
      config=config,
      rotation=make_rotation(config.dim, config.rotation, seed=config.seed),
      codebook=make_codebook(config.mse_bits, config.dim) if config.mse_bits > 0 else None,
      qjl=make_qjl(config.dim, config.sketch_dim, config.qjl_kind, seed=config.seed) if config.variant == "prod" else None,
  )


# ----------------------------------------------------------------------------- validation


def _math_dtype(dtype) -> jnp.dtype:
  return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _check_quantizer(tq: Quantizer) -> None:
  if not isinstance(tq, Quantizer):
    raise TypeError(f"expected a tqjax Quantizer, got {type(tq).__name__}")


def _check_vectors(tq: Quantizer, x, name: str) -> jax.Array:
  """x as a jax array (array-likes are accepted) of floating vectors [..., tq.dim]."""
  _check_quantizer(tq)
  try:
    x = jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be an array of vectors [..., {tq.dim}], got {type(x).__name__}: {e}") from None
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point (float32, bfloat16, float16), got {name}.dtype={x.dtype}")
  if x.ndim < 1 or x.shape[-1] != tq.dim:
    raise ValueError(f"{name} last dim must be the quantizer's dim={tq.dim}, got {name}.shape={x.shape}")
  return x


def check_code(tq: Quantizer, code: Code) -> None:
  """Raises unless `code` was made by a quantizer with `tq`'s config and its arrays are consistent.

  code.config (static) must equal tq.config, so the check costs nothing at run time. Then the
  arrays: codes uint32 [..., mse_bits·ceil(dim/32)], norms [...], and for prod qjl_signs uint32
  [..., W] and residual_norms [...], with one batch shape [...] across all of them.
  """
  _check_quantizer(tq)
  if not isinstance(code, Code):
    raise TypeError(f"expected a tqjax Code, got {type(code).__name__}")
  cfg = tq.config
  if code.config != cfg:
    if not isinstance(code.config, QuantizerConfig):
      raise TypeError(f"code.config must be the QuantizerConfig that made it, got {code.config!r}")
    diff = ", ".join(
        f"{f.name}={getattr(code.config, f.name)!r} vs {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if getattr(code.config, f.name) != getattr(cfg, f.name)
    )
    raise ValueError(f"code was made by another quantizer than this one (code vs quantizer: {diff})")
  lead = code.norms.shape
  want = packing.packed_words(cfg.dim, cfg.mse_bits) if cfg.mse_bits else 0
  if code.codes.ndim < 1 or code.codes.shape[:-1] != lead:
    raise ValueError(
        f"code's batch dims disagree: norms.shape={lead} but codes.shape={code.codes.shape} "
        f"(codes must be [*norms.shape, {want}])"
    )
  if code.codes.dtype != jnp.uint32 or code.codes.shape[-1] != want:
    raise ValueError(
        f"code does not match the quantizer ({cfg.variant}, bits={cfg.bits}, dim={cfg.dim}): expected "
        f"codes uint32 [..., {want}], got {code.codes.dtype} {code.codes.shape}"
    )
  is_prod = code.qjl_signs is not None
  if is_prod != (cfg.variant == "prod") or (code.residual_norms is not None) != is_prod:
    raise ValueError(
        f"code {'has' if is_prod else 'lacks'} QJL signs (residual_norms "
        f"{'present' if code.residual_norms is not None else 'absent'}) but the quantizer is {cfg.variant!r}"
    )
  if is_prod:
    if code.residual_norms.shape != lead:
      raise ValueError(
          f"code's batch dims disagree: norms.shape={lead} but residual_norms.shape={code.residual_norms.shape}"
      )
    words = packing.num_columns(cfg.sketch_dim)
    if code.qjl_signs.ndim < 1 or code.qjl_signs.shape[:-1] != lead:
      raise ValueError(
          f"code's batch dims disagree: norms.shape={lead} but qjl_signs.shape={code.qjl_signs.shape} "
          f"(qjl_signs must be [*norms.shape, {words}])"
      )
    if code.qjl_signs.dtype != jnp.uint32 or code.qjl_signs.shape[-1] != words:
      raise ValueError(
          f"code's qjl_signs {code.qjl_signs.dtype} {code.qjl_signs.shape} do not match qjl_dim={cfg.sketch_dim} "
          f"of the quantizer: expected uint32 [..., {words}]"
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
  """ŷ [..., dim] in `dtype`: the centroids of packed codes uint32 [..., mse_bits·ceil(dim/32)]
  (zeros without a codebook stage). Takes the raw words, so it does not check a Code's identity."""
  cb = tq.codebook
  if cb is None:  # prod at 1 bit: no codebook stage
    return jnp.zeros((*codes.shape[:-1], tq.dim), dtype)
  return dequantize(cb, packing.unpack(codes, cb.bits, tq.dim), dtype)


def encode(tq: Quantizer, x: jax.Array) -> Code:
  """Encodes vectors x [..., dim] (float32/bfloat16/float16, array-like) into a `Code` [...]."""
  x = _check_vectors(tq, x, "x")
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
    return Code(codes, norm.astype(norm_dtype), config=cfg)
  signs, rnorm = qjl_encode(tq.qjl, y - y_hat)
  return Code(codes, norm.astype(norm_dtype), signs, rnorm.astype(norm_dtype), config=cfg)


def decode_rotated(tq: Quantizer, code: Code, dtype=jnp.float32) -> jax.Array:
  """The unit direction's reconstruction in rotated space, ŷ (+ QJL term) [..., dim] in `dtype`,
  without the norm. Raises if `code` was made by another quantizer."""
  check_code(tq, code)
  y_hat = codebook_direction(tq, code.codes, dtype)
  if tq.qjl is not None:
    y_hat = y_hat + qjl_decode(tq.qjl, code.qjl_signs, code.residual_norms, dtype)
  return y_hat


def decode(tq: Quantizer, code: Code, dtype=jnp.float32) -> jax.Array:
  """Reconstructs x̂ [..., dim] in `dtype` from a `Code` [...] (unbiased for prod: E_S[x̂] = x on
  the codebook's ŷ). Raises if `code` was made by another quantizer."""
  math = _math_dtype(jnp.dtype(dtype))
  y_hat = decode_rotated(tq, code, math)
  return (code.norms.astype(math)[..., None] * unrotate(tq.rotation, y_hat)).astype(dtype)


def estimate_ip(tq: Quantizer, q: jax.Array, code: Code) -> jax.Array:
  """Estimates ⟨q, x⟩ for every encoded x. q [..., dim] (array-like) broadcasts against the
  code's batch dims.

  Rotates q once (Π·q, and S·Π·q for prod) and never forms x̂. Unbiased for prod.
  Returns [broadcast batch dims] in q's dtype. Raises if `code` was made by another quantizer.
  """
  q = _check_vectors(tq, q, "q")
  check_code(tq, code)
  math = _math_dtype(q.dtype)
  q_rot = rotate(tq.rotation, q.astype(math))
  ip = jnp.sum(q_rot * codebook_direction(tq, code.codes, math), axis=-1)
  if tq.qjl is not None:
    ip = ip + qjl_ip(tq.qjl, q_rot, code.qjl_signs, code.residual_norms)
  return (code.norms.astype(math) * ip).astype(q.dtype)


# ----------------------------------------------------------------------------- accounting


def bits_per_coordinate(config: QuantizerConfig) -> float:
  """Stored bits per coordinate of one vector [dim]: packed codes, norm, QJL signs and residual
  norm (with padding)."""
  norm_bits = jnp.dtype(config.norm_dtype).itemsize * 8
  bits = 32 * (packing.packed_words(config.dim, config.mse_bits) if config.mse_bits else 0) + norm_bits
  if config.variant == "prod":
    bits += 32 * packing.num_columns(config.sketch_dim) + norm_bits
  return bits / config.dim


def compression_ratio(config: QuantizerConfig, baseline_bits: int = 16) -> float:
  """Uncompressed bits per coordinate (16 = bf16, 32 = fp32) over `bits_per_coordinate`."""
  return baseline_bits / bits_per_coordinate(config)
