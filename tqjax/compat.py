"""Seed-style `TurboQuantConfig` / `TurboQuant` / `TurboQuantKVCache` over the functional core.

For code written against the original NumPy seed script: the same names, constructor arguments,
defaults (`TurboQuantConfig(dimension=128)` is bits=4, qjl_enabled=True, qjl_dim=0 meaning
"= dimension", seed=42) and methods, each a thin wrapper over `tqjax.encode` / `decode` /
`estimate_ip`, the byte accounting of `tqjax.quantizer`, and `tqjax.cache` / `tqjax.ops` for the
KV cache. New code should use the functional API (`make_quantizer`, `encode`, ...) directly: it
composes with jit / vmap / shard_map, which these objects only forward to.

Shapes: `...` is any leading batch dims, d = config.dimension, n the number of cached tokens,
H = num_heads of a `TurboQuantKVCache`.

Differences from the seed (results are *not* bit-compatible with it):

* `bits` is the TOTAL bits per coordinate, as in the paper. In the seed, `bits=3,
  qjl_enabled=True` meant a 3-bit codebook plus a 1-bit QJL sketch, i.e. 4 bits per coordinate;
  here that quantizer is `bits=4, qjl_enabled=True` (TurboQuant_prod: a (bits − 1)-bit codebook and
  1 QJL bit). `qjl_enabled=False` is TurboQuant_mse with a `bits`-bit codebook, as before. bits
  must be in [1, 8].
* The seed's codebook was Lloyd–Max for Beta(d/2, d/2), which is the coordinate density of the
  sphere in R^(d+1); the density in R^d is Beta((d−1)/2, (d−1)/2) (`tqjax.codebook`). Centroids,
  and so reconstructions, differ (most at small d).
* The seed quantized the raw vector (exact only for unit vectors); here every vector's norm is
  stored, so any vector reconstructs at its own scale.
* The seed's QJL stage was broken (its inner products were biased); here `inner_product` with
  `qjl_enabled=True` is unbiased over the quantizer's randomness, and `decompress` includes the
  QJL term (the seed's returned the codebook stage only).
* The same seed draws other constants than the seed script's (rotation and sketch come from
  `tqjax.rotation.constants_rng`; the sketch is row-orthogonal, not Rademacher).
* Config values are validated: `seed` must be an integer >= 0, `qjl_dim` an integer >= 0, and a
  nonzero `qjl_dim` needs `qjl_enabled=True` (the seed ignored it); bad values raise ValueError
  naming the field.
* `compress` takes vectors [..., d] and returns a `tqjax.Code` pytree of packed uint32 words and
  norms, not a `CompressedVector` of index arrays; `inner_product` returns a jax array ([...], a
  0-d array for one vector) instead of a Python float. The seed's constants (`centroids`,
  `boundaries`, `Pi`, `S`) are not attributes: they live in `TurboQuant.quantizer`. A code carries
  the config that made it: `decompress` or `inner_product` of a code made with another config
  (even only another seed) raises instead of returning garbage.
* `compression_ratio()` counts everything stored per vector (packed codes with padding, the norm,
  QJL signs and residual norm) and is against a bf16 cache (`baseline_bits=16`) by default; the
  seed's was against float32 and counted codes and signs only. `compressed_size_bytes()` likewise
  counts the norms, and takes an optional number of vectors (default 1, the seed's only case).
* `TurboQuantKVCache` holds a fixed `capacity` (default 4096; appending past it raises) of one
  sequence with `num_heads` heads (default 1, the seed's case). Values are stored with
  TurboQuant_mse at `value_bits` (default: bits), not with the keys' QJL quantizer; its key sketch
  has d rows (another `qjl_dim` raises). It also gives the attention output (`attention`), which
  the seed did not.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tqjax.codebook import check_bits
from tqjax.quantizer import (
    Code,
    QuantizerConfig,
    bits_per_coordinate,
    decode,
    encode,
    estimate_ip,
    quantizer_from_config,
)
from tqjax.quantizer import compression_ratio as _compression_ratio

__all__ = ["TurboQuant", "TurboQuantConfig", "TurboQuantKVCache"]


def _is_int(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, np.integer))


@dataclasses.dataclass(frozen=True)
class TurboQuantConfig:
  """Seed-style configuration (the seed's fields and defaults).

  dimension: vector length d (>= 2). bits: TOTAL bits per coordinate (see the module docstring).
  qjl_enabled: TurboQuant_prod (unbiased inner products) instead of TurboQuant_mse.
  qjl_dim: QJL sketch rows; 0 means d. seed: integer >= 0, the quantizer's randomness.
  """

  dimension: int
  bits: int = 4
  qjl_enabled: bool = True
  qjl_dim: int = 0
  seed: int = 42

  def __post_init__(self):
    if not _is_int(self.dimension) or self.dimension < 2:
      raise ValueError(f"dimension must be an integer >= 2, got dimension={self.dimension!r}")
    if not isinstance(self.qjl_enabled, bool):
      raise ValueError(f"qjl_enabled must be a bool, got qjl_enabled={self.qjl_enabled!r}")
    if not _is_int(self.qjl_dim) or self.qjl_dim < 0:
      raise ValueError(f"qjl_dim must be an integer >= 0 (0 means dimension), got qjl_dim={self.qjl_dim!r}")
    if self.qjl_dim and not self.qjl_enabled:
      raise ValueError(f"qjl_dim={self.qjl_dim!r} needs qjl_enabled=True")
    self.quantizer_config()  # validates bits and seed

  def quantizer_config(self) -> QuantizerConfig:
    """The equivalent functional-core config."""
    return QuantizerConfig(
        dim=self.dimension,
        bits=self.bits,
        variant="prod" if self.qjl_enabled else "mse",
        qjl_dim=self.qjl_dim or None,
        seed=self.seed,
    )


class TurboQuant:
  """Seed-style quantizer object; `self.quantizer` is the functional core's `Quantizer`."""

  def __init__(self, config: TurboQuantConfig):
    if not isinstance(config, TurboQuantConfig):
      raise TypeError(f"expected a TurboQuantConfig, got {type(config).__name__}")
    self.config = config
    self.quantizer = quantizer_from_config(config.quantizer_config())

  def compress(self, x) -> Code:
    """Encodes x [..., d] (float32 / bfloat16 / float16; NumPy, JAX or a list) into a `Code` [...]."""
    return encode(self.quantizer, x)

  def decompress(self, code: Code, dtype=jnp.float32) -> jax.Array:
    """Reconstructs vectors [..., d] in `dtype` from a `Code` [...] made by this quantizer."""
    return decode(self.quantizer, code, dtype)

  def inner_product(self, query, code: Code) -> jax.Array:
    """Estimates ⟨query, x⟩ for every encoded x: query [..., d] broadcasts against the code's
    batch dims [...]; returns the broadcast batch dims (0-d for one query and one vector)."""
    return estimate_ip(self.quantizer, query, code)

  def compression_ratio(self, baseline_bits: int = 16) -> float:
    """Uncompressed bits per coordinate (16 = bf16, 32 = fp32) over the stored bits per coordinate."""
    return _compression_ratio(self.quantizer.config, baseline_bits)

  def compressed_size_bytes(self, n_vectors: int = 1) -> int:
    """Bytes that `compress` stores for n_vectors vectors [n_vectors, d] (equals `Code.nbytes`)."""
    if not _is_int(n_vectors) or n_vectors < 0:
      raise ValueError(f"n_vectors must be an integer >= 0, got n_vectors={n_vectors!r}")
    # Every stored field is whole bytes per vector, so bits_per_coordinate·d is an integer of bits.
    bits_per_vector = round(bits_per_coordinate(self.quantizer.config) * self.config.dimension)
    return bits_per_vector // 8 * int(n_vectors)

  def __repr__(self) -> str:
    return f"TurboQuant({self.config})"


@functools.cache
def _cache_ops():
  """`tqjax.cache.append`, `tqjax.ops.scores` and `tqjax.ops.attention`, jitted once per process:
  the seed appends one token at a time, and eager dispatch would compile every primitive of every
  call."""
  from tqjax import cache, ops  # they import the quantizer: keep compat's import light

  return (
      jax.jit(cache.append),
      jax.jit(functools.partial(ops.scores, scale=1.0)),
      jax.jit(functools.partial(ops.attention, implementation="xla"), static_argnames="scale"),
  )


class TurboQuantKVCache:
  """Seed-style KV cache for ONE sequence, a stateful wrapper over `tqjax.cache` and `tqjax.ops`.

  Keys use `config` (prod keys when qjl_enabled, so `attention_scores` are unbiased inner
  products); values use TurboQuant_mse at `value_bits` (default: config.bits). Like the seed it
  applies no norm correction and no key centring; the functional cache (`tqjax.cache.CacheConfig`)
  exposes both and recommends them.
  """

  def __init__(self, config: TurboQuantConfig, num_heads: int = 1, capacity: int = 4096, value_bits: int | None = None):
    from tqjax import cache as _cache  # the cache imports the quantizer: keep compat's import light

    if not isinstance(config, TurboQuantConfig):
      raise TypeError(f"expected a TurboQuantConfig, got {type(config).__name__}")
    if not _is_int(num_heads) or num_heads < 1:
      raise ValueError(f"num_heads must be a positive integer, got num_heads={num_heads!r}")
    if value_bits is not None:
      check_bits(value_bits, name="value_bits")
    if config.qjl_dim not in (0, config.dimension):
      raise ValueError(
          f"TurboQuantKVCache sketches keys with qjl_dim = dimension = {config.dimension}; got qjl_dim={config.qjl_dim!r}"
      )
    self._c = _cache
    self.config = config
    self.num_heads = num_heads
    self.cache_config = _cache.CacheConfig(
        head_dim=int(config.dimension),
        k_bits=config.bits,
        v_bits=config.bits if value_bits is None else value_bits,
        k_variant="prod" if config.qjl_enabled else "mse",
        norm_correction=False,
        norm_dtype="float32",
        center_keys=False,
        seed=config.seed,
    )
    self.state = _cache.init_cache(self.cache_config, 1, num_heads, capacity)

  def __len__(self) -> int:
    return int(self.state.lengths[0])

  def _tokens(self, x, name: str) -> jax.Array:
    """[d] | [T, d] (one head) | [H, d] | [T, H, d] → [1, H, T, d]."""
    x = jnp.asarray(x)
    d, h = self.config.dimension, self.num_heads
    if x.ndim == 1 or (x.ndim == 2 and h == 1):
      x = x.reshape(-1, 1, x.shape[-1])
    elif x.ndim == 2:
      x = x[None]
    if x.ndim != 3 or x.shape[1:] != (h, d):
      raise ValueError(f"{name} must be [tokens, num_heads={h}, dimension={d}] (or one token), got {name}.shape={x.shape}")
    return jnp.swapaxes(x, 0, 1)[None]

  def append(self, key, value) -> None:
    """Appends tokens' keys and values: each [d] (one head), [T, d] (one head), [H, d] or [T, H, d]."""
    k, v = self._tokens(key, "key"), self._tokens(value, "value")
    if k.shape != v.shape:
      raise ValueError(f"key and value must hold the same tokens, got {k.shape[2]} keys and {v.shape[2]} values")
    if len(self) + k.shape[2] > self.state.capacity:
      raise ValueError(f"append of {k.shape[2]} tokens exceeds capacity={self.state.capacity} (holding {len(self)})")
    self.state = _cache_ops()[0](self.state, k, v)

  def _query(self, query) -> tuple[jax.Array, bool]:
    """query [d] (one head) | [H, d] → ([1, H, d], whether the head axis is dropped on output)."""
    q = jnp.asarray(query)
    one = q.ndim == 1 and self.num_heads == 1
    q = q[None] if one else q
    if q.shape != (self.num_heads, self.config.dimension):
      raise ValueError(
          f"query must be [num_heads={self.num_heads}, dimension={self.config.dimension}]"
          f"{' or [dimension]' if self.num_heads == 1 else ''}, got query.shape={jnp.shape(query)}"
      )
    return q[None], one

  def attention_scores(self, query) -> jax.Array:
    """Estimated inner products ⟨query, key_t⟩ for every cached token: query [d] → [n] (a
    single-head cache, as in the seed); query [H, d] → [H, n]."""
    q, one = self._query(query)
    s = _cache_ops()[1](self.state, q)[0, :, : len(self)]
    return s[0] if one else s

  def attention(self, query, scale: float | None = None) -> jax.Array:
    """softmax(q·kᵀ·scale)·v over the cached tokens (scale defaults to 1/√d): query [d] → [d]
    (a single-head cache); query [H, d] → [H, d]."""
    q, one = self._query(query)
    out = _cache_ops()[2](self.state, q, scale=scale)[0]
    return out[0] if one else out

  def memory_bytes(self) -> int:
    """Bytes resident in the cache arrays (all `capacity` slots)."""
    return self._c.nbytes(self.state)
