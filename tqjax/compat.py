"""Seed-style `TurboQuantConfig` / `TurboQuant` classes over the functional core.

For code written against the original NumPy seed: the same names and methods, each a thin wrapper
over `tqjax.encode` / `decode` / `estimate_ip` and the byte accounting of `tqjax.quantizer`. New
code should use the functional API (`make_quantizer`, `encode`, ...) directly: it composes with
jit / vmap / shard_map, which these objects only forward to.

Differences from the seed (results are *not* bit-compatible with it):

* `bits` is the TOTAL bits per coordinate, as in the paper. In the seed, `bits=3,
  qjl_enabled=True` meant a 3-bit codebook plus a 1-bit QJL sketch, i.e. 4 bits per coordinate;
  here that quantizer is `bits=4, qjl_enabled=True` (TurboQuant_prod: a (bits − 1)-bit codebook and
  1 QJL bit). `qjl_enabled=False` is TurboQuant_mse with a `bits`-bit codebook, as before.
* The seed's codebook was Lloyd–Max for Beta(d/2, d/2), which is the coordinate density of the
  sphere in R^(d+1); the density in R^d is Beta((d−1)/2, (d−1)/2) (`tqjax.codebook`). Centroids,
  and so reconstructions, differ (most at small d).
* The seed's QJL stage was broken (its inner products were biased); here `inner_product` with
  `qjl_enabled=True` is unbiased over the quantizer's randomness.
* `compression_ratio()` counts everything stored per vector (packed codes with padding, the norm,
  QJL signs and residual norm) and is against a bf16 cache (`baseline_bits=16`) by default.
* `compress` returns a `tqjax.Code` pytree of packed uint32 words and norms, not index arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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


def _is_int(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, np.integer))


@dataclasses.dataclass(frozen=True)
class TurboQuantConfig:
  """Seed-style configuration.

  dimension: vector length d. bits: TOTAL bits per coordinate (see the module docstring).
  qjl_enabled: TurboQuant_prod (unbiased inner products) instead of TurboQuant_mse.
  qjl_dim: QJL sketch rows (default d); only with qjl_enabled. seed: the quantizer's randomness.
  """

  dimension: int
  bits: int
  qjl_enabled: bool = False
  qjl_dim: int | None = None
  seed: int = 0

  def __post_init__(self):
    if not _is_int(self.dimension) or self.dimension < 2:
      raise ValueError(f"dimension must be an integer >= 2, got dimension={self.dimension!r}")
    if not isinstance(self.qjl_enabled, bool):
      raise ValueError(f"qjl_enabled must be a bool, got qjl_enabled={self.qjl_enabled!r}")
    if self.qjl_dim is not None and not self.qjl_enabled:
      raise ValueError(f"qjl_dim={self.qjl_dim!r} needs qjl_enabled=True")
    self.quantizer_config()  # validates bits, qjl_dim and seed

  def quantizer_config(self) -> QuantizerConfig:
    """The equivalent functional-core config."""
    return QuantizerConfig(
        dim=self.dimension,
        bits=self.bits,
        variant="prod" if self.qjl_enabled else "mse",
        qjl_dim=self.qjl_dim,
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
    """Encodes x [..., dimension] (float32 / bfloat16 / float16; NumPy or JAX) into a `Code`."""
    return encode(self.quantizer, jnp.asarray(x))

  def decompress(self, code: Code, dtype=jnp.float32) -> jax.Array:
    """Reconstructs [..., dimension] vectors from `code`."""
    return decode(self.quantizer, code, dtype)

  def inner_product(self, query, code: Code) -> jax.Array:
    """Estimates ⟨query, x⟩ for every encoded x; query [..., dimension] broadcasts over the code."""
    return estimate_ip(self.quantizer, jnp.asarray(query), code)

  def compression_ratio(self, baseline_bits: int = 16) -> float:
    """Uncompressed bits per coordinate (16 = bf16, 32 = fp32) over the stored bits per coordinate."""
    return _compression_ratio(self.quantizer.config, baseline_bits)

  def compressed_size_bytes(self, n_vectors: int) -> int:
    """Bytes that `compress` stores for n_vectors vectors (equals `Code.nbytes`)."""
    if not _is_int(n_vectors) or n_vectors < 0:
      raise ValueError(f"n_vectors must be an integer >= 0, got n_vectors={n_vectors!r}")
    # Every stored field is whole bytes per vector, so bits_per_coordinate·d is an integer of bits.
    bits_per_vector = round(bits_per_coordinate(self.quantizer.config) * self.config.dimension)
    return bits_per_vector // 8 * int(n_vectors)

  def __repr__(self) -> str:
    return f"TurboQuant({self.config})"


class TurboQuantKVCache:
  """Seed-style KV cache for ONE sequence, a stateful wrapper over `tqjax.cache`.

  Keys use `config` (prod keys when qjl_enabled, so `attention_scores` are unbiased inner
  products); values use TurboQuant_mse at `value_bits` (default: config.bits). Like the seed it
  applies no norm correction and no key centring; the functional cache (`tqjax.cache.CacheConfig`)
  exposes both and recommends them. Unlike the seed it also returns the attention output.
  """

  def __init__(self, config: TurboQuantConfig, num_heads: int = 1, capacity: int = 4096, value_bits: int | None = None):
    from tqjax import cache as _cache, ops as _ops  # keep compat's import light

    if not isinstance(config, TurboQuantConfig):
      raise TypeError(f"expected a TurboQuantConfig, got {type(config).__name__}")
    self._c, self._a = _cache, _ops
    self.config = config
    self.num_heads = num_heads
    self.cache_config = _cache.CacheConfig(
        head_dim=config.dimension,
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
    """[D] | [T, D] (one head) | [H, D] | [T, H, D] → [1, H, T, D]."""
    x = jnp.asarray(x)
    d, h = self.config.dimension, self.num_heads
    if x.ndim == 1 or (x.ndim == 2 and h == 1):
      x = x.reshape(-1, 1, x.shape[-1])
    elif x.ndim == 2:
      x = x[None]
    if x.ndim != 3 or x.shape[1:] != (h, d):
      raise ValueError(f"{name} must be [tokens, num_heads={h}, dimension={d}] (or one token), got shape {x.shape}")
    return jnp.swapaxes(x, 0, 1)[None]

  def append(self, key, value) -> None:
    """Appends one or more tokens' keys and values (see `_tokens` for the accepted shapes)."""
    k, v = self._tokens(key, "key"), self._tokens(value, "value")
    if len(self) + k.shape[2] > self.state.capacity:
      raise ValueError(f"append of {k.shape[2]} tokens exceeds capacity={self.state.capacity} (holding {len(self)})")
    self.state = self._c.append(self.state, k, v)

  def _query(self, query) -> jax.Array:
    q = jnp.asarray(query)
    q = q[None] if q.ndim == 1 else q
    if q.shape != (self.num_heads, self.config.dimension):
      raise ValueError(f"query must be [num_heads={self.num_heads}, dimension={self.config.dimension}], got {q.shape}")
    return q[None]

  def attention_scores(self, query) -> jax.Array:
    """Estimated inner products ⟨query, key_t⟩ for every cached token: [num_heads, len(self)]."""
    return self._a.scores(self.state, self._query(query), scale=1.0)[0, :, : len(self)]

  def attention(self, query, scale: float | None = None) -> jax.Array:
    """softmax(q·kᵀ·scale)·v over the cached tokens (scale defaults to 1/√d): [num_heads, d]."""
    return self._a.attention(self.state, self._query(query), scale=scale, implementation="xla")[0]

  def memory_bytes(self) -> int:
    """Bytes resident in the cache arrays (all `capacity` slots)."""
    return self._c.nbytes(self.state)
