"""The uncompressed KV cache, with the operations of the compressed one: the reference for models.

Owns `DenseCacheConfig`, the `DenseKVCache` pytree and its operations, with the signatures of
`tqjax.cache` / `tqjax.ops`: `init_cache`, `prefill`, `append`, `attention`, `chunked_attention`,
`nbytes`, `expected_nbytes`, `partition_specs`; `prompt_attention`, the full-precision attention of a prompt over
itself that a layer runs at prefill; and `range_attention`, exact attention over given slot ranges,
which both run. A model switches between a bf16 cache and a compressed one by
the config alone.

The semantics are the compressed cache's, not a copy of them: which positions a query attends is
`tqjax.partials.query_ranges`, logits are capped with `tqjax.partials.apply_soft_cap`, an empty
range gives zeros with softmax sum l = 0 and max m = −inf (mergeable with
`tqjax.partials.merge_partials`), and bad input gets the same errors from the same checks.
`implementation` is accepted for the same signatures: None and "xla" run the one plain-jnp path;
"pallas" raises, since no fused kernel reads a dense cache.

Layout: k, v [B, K, S, H] in the config's dtype; lengths int32 [B].
Shapes: B batch, N query heads, K kv heads (N = K·G), T query tokens, S cache slots, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from tqjax.cache import token_writer
from tqjax.partials import apply_soft_cap, query_ranges

# The compressed cache's input checks (private there), so that bad input gets the same errors.
from tqjax.cache import check_capacity, check_kv, valid_count
from tqjax.ops import check_implementation, check_options, check_query

__all__ = [
    "DenseCacheConfig",
    "DenseKVCache",
    "init_cache",
    "prefill",
    "append",
    "attention",
    "chunked_attention",
    "prompt_attention",
    "range_attention",
    "nbytes",
    "expected_nbytes",
    "partition_specs",
]

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class DenseCacheConfig:
  """Static configuration of an uncompressed cache: head_dim H and the storage dtype (a floating
  dtype's name, e.g. "bfloat16"; anything `jnp.dtype` takes is normalized to its name)."""

  head_dim: int
  dtype: str = "bfloat16"

  def __post_init__(self):
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, (int, np.integer)) or self.head_dim < 1:
      raise ValueError(f"head_dim must be a positive integer, got head_dim={self.head_dim!r}")
    try:
      dtype = jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"dtype must be a floating dtype, got dtype={self.dtype!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"dtype must be a floating dtype, got dtype={self.dtype!r}")
    object.__setattr__(self, "head_dim", int(self.head_dim))
    object.__setattr__(self, "dtype", dtype.name)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("k", "v", "lengths"), meta_fields=("config",))
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
  """An uncompressed cache for B sequences, K kv heads and S slots: k, v [B, K, S, H], lengths int32 [B]."""

  config: DenseCacheConfig
  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.k.shape[1]

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  @property
  def end_index(self) -> jax.Array:
    """Gemma's name for `lengths`."""
    return self.lengths


def init_cache(config: DenseCacheConfig, batch_size: int, num_kv_heads: int, capacity: int) -> DenseKVCache:
  """An empty cache (all lengths 0) for `batch_size` sequences of up to `capacity` tokens."""
  for name, val in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("capacity", capacity)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{name} must be a positive integer, got {name}={val!r}")
  z = jnp.zeros((batch_size, num_kv_heads, capacity, config.head_dim), config.dtype)
  return DenseKVCache(config, z, z, jnp.zeros((batch_size,), jnp.int32))


def _check_dense_implementation(implementation) -> None:
  check_implementation(implementation)
  if implementation == "pallas":
    raise ValueError('implementation="pallas" is not available for a dense cache: no fused kernel reads it '
                     '(use None or "xla")')


def _write(cache: DenseKVCache, k, v, start, count, prefix: bool) -> DenseKVCache:
  """Tokens t < count[b] of k, v [B, K, T, H] to slots start[b] + t; past the capacity dropped."""
  _, _, put = token_writer(start, count, k.shape[2], cache.capacity, prefix)
  lengths = jnp.minimum(start + count, cache.capacity).astype(jnp.int32)
  return DenseKVCache(cache.config, put(cache.k, k), put(cache.v, v), lengths)


def prefill(
    cache: DenseKVCache, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, *,
    implementation: str | None = None,
) -> DenseKVCache:
  """Starts every sequence afresh with T prompt tokens k, v [B, K, T, H] (T ≤ capacity).

  lengths [B] (optional, in [0, T]; concrete values outside raise): real tokens per sequence
  (right padding); the padding is not stored. Slots past lengths keep their old contents, which
  nothing reads. implementation as in `tqjax.ops.prefill` ("pallas" raises).
  """
  _check_dense_implementation(implementation)
  check_kv(cache, k, v, "prefill")
  b = cache.batch_size
  count = valid_count(lengths, k.shape[2], b, "prefill", "lengths")
  return _write(cache, k, v, jnp.zeros((b,), jnp.int32), count, prefix=True)


def append(cache: DenseKVCache, k: jax.Array, v: jax.Array, num_new: jax.Array | None = None) -> DenseKVCache:
  """Appends tokens k, v [B, K, T, H] at each sequence's own position (its current length).

  num_new [B] (optional, in [0, T]): real tokens per sequence. Past the capacity: with concrete
  lengths (outside jit) a ValueError names the overflowing sequences; under jit the tokens past
  the capacity are dropped and `lengths` saturates at the capacity (as `tqjax.cache.append`).
  """
  check_kv(cache, k, v, "append")
  count = valid_count(num_new, k.shape[2], cache.batch_size, "append", "num_new")
  check_capacity(cache.lengths + count, cache.capacity)
  return _write(cache, k, v, cache.lengths, count, prefix=False)


def _range_block(q, k, v, lo, hi, scale, soft_cap):
  slots = jnp.arange(k.shape[2], dtype=jnp.int32)
  ok = (slots >= lo[..., None]) & (slots < hi[..., None])  # [B, T, S]
  logits = jnp.einsum("bkgth,bksh->bkgts", q.astype(jnp.float32) * jnp.float32(scale), k.astype(jnp.float32),
                      precision=_HIGHEST)
  logits = jnp.where(ok[:, None, None], apply_soft_cap(logits, soft_cap), -jnp.inf)
  m = jnp.max(logits, axis=-1)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)[..., None])
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgts,bksh->bkgth", p, v.astype(jnp.float32), precision=_HIGHEST)
  return o / jnp.where(l > 0, l, 1.0)[..., None], m, l


def range_attention(q, k, v, lo, hi, *, scale: float, soft_cap: float | None, block_q: int = 256):
  """Exact attention of q [B, K, G, T, H] over slots lo ≤ s < hi ([B, T]) of k, v [B, K, S, H].

  → (o [B, K, G, T, H] float32 normalized, m, l [B, K, G, T]): the running max and softmax sum
  of `tqjax.partials` (an empty range: o = 0, m = −inf, l = 0). Queries go `block_q` at a time
  (a `lax.map` over blocks when T > block_q), so the logits held are [B, K, G, block_q, S], not
  [B, K, G, T, S]: a long prompt's attention fits where its T × T logits would not.
  """
  t = q.shape[3]
  if t <= block_q:
    return _range_block(q, k, v, lo, hi, scale, soft_cap)
  nb = -(-t // block_q)
  pad = nb * block_q - t
  qb = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))  # padded queries get empty ranges: zeros
  qb = jnp.moveaxis(qb.reshape(*q.shape[:3], nb, block_q, q.shape[4]), 3, 0)
  lob, hib = (jnp.moveaxis(jnp.pad(a, ((0, 0), (0, pad))).reshape(a.shape[0], nb, block_q), 1, 0) for a in (lo, hi))
  o, m, l = jax.lax.map(lambda a: _range_block(a[0], k, v, a[1], a[2], scale, soft_cap), (qb, lob, hib))
  o = jnp.moveaxis(o, 0, 3).reshape(*q.shape[:3], nb * block_q, q.shape[4])[..., :t, :]
  m, l = (jnp.moveaxis(a, 0, 3).reshape(*q.shape[:3], nb * block_q)[..., :t] for a in (m, l))
  return o, m, l


def _attend(cache: DenseKVCache, q, lo, hi, scale, soft_cap):
  """q [B, N, T, H] over [lo, hi) → (o [B, N, T, H] in q's dtype, m, l [B, N, T])."""
  b, n, t, h = q.shape
  kh = cache.num_kv_heads
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  o, m, l = range_attention(q.reshape(b, kh, n // kh, t, h), cache.k, cache.v, lo, hi, scale=scale,
                            soft_cap=soft_cap)
  return o.reshape(b, n, t, h).astype(q.dtype), m.reshape(b, n, t), l.reshape(b, n, t)


def chunked_attention(
    cache: DenseKVCache,
    q: jax.Array,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    implementation: str | None = None,
    return_residuals: bool = False,
):
  """Attention of T queries q [B, N, T, H] whose tokens were just written → [B, N, T, H].

  The positions each query attends are `tqjax.ops.chunked_attention`'s (`query_ranges`): query
  t sits at lengths − T + t and sees positions ≤ its own (the last `sliding_window` of them), or
  all `lengths` tokens with causal=False. scale defaults to 1/√H; soft_cap applies
  cap·tanh(logit/cap). With return_residuals, also the softmax max and sum [B, N, T].
  """
  _check_dense_implementation(implementation)
  check_query(cache, q, "chunked_attention", with_tokens=True)
  check_options(scale, soft_cap, sliding_window)
  lo, hi = query_ranges(cache, q.shape[2], sliding_window, causal)
  o, m, l = _attend(cache, q, lo, hi, scale, soft_cap)
  return (o, m, l) if return_residuals else o


def attention(
    cache: DenseKVCache,
    q: jax.Array,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Decode attention of one query per sequence, q [B, N, H], over the cache → [B, N, H].

  The query is the newest token (already appended): it sees positions < lengths[b] (the last
  `sliding_window` of them). A sequence with nothing written gets zeros.
  """
  _check_dense_implementation(implementation)
  check_query(cache, q, "attention", with_tokens=False)
  check_options(scale, soft_cap, sliding_window)
  lo, hi = query_ranges(cache, 1, sliding_window, True)
  return _attend(cache, q[:, :, None], lo, hi, scale, soft_cap)[0][:, :, 0]


def prompt_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array | None = None,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
) -> jax.Array:
  """Full-precision attention of a prompt over itself (what a layer computes at prefill).

  q [B, N, T, H], k, v [B, K, T, H] at positions 0 .. T − 1; lengths [B] (optional, in [0, T]):
  the first lengths[b] tokens are real (right padding). → [B, N, T, H] in q's dtype.
  Real query t attends what it would in a cache holding the prompt (`chunked_attention` after
  `prefill`): positions ≤ t (the last `sliding_window` of them), or with causal=False all real
  positions (the last `sliding_window` of them); padding keys are never attended. Padding
  queries get finite values that mean nothing.
  """
  b, t = q.shape[0], q.shape[2]
  check_options(scale, soft_cap, sliding_window)
  count = valid_count(lengths, t, b, "prompt_attention", "lengths")
  # The prompt as a cache of T slots: causal queries are its last T tokens (lengths T), their keys
  # past a sequence's count are padding; bidirectional queries all see the count real tokens.
  view = DenseKVCache(DenseCacheConfig(q.shape[-1], jnp.dtype(k.dtype).name), k, v,
                      jnp.full((b,), t, jnp.int32) if causal else count)
  lo, hi = query_ranges(view, t, sliding_window, causal)
  return _attend(view, q, lo, jnp.minimum(hi, count[:, None]), scale, soft_cap)[0]


def nbytes(cache: DenseKVCache) -> int:
  """Bytes resident in the cache's arrays: k, v and lengths."""
  return sum(int(x.nbytes) for x in (cache.k, cache.v, cache.lengths))


def expected_nbytes(config: DenseCacheConfig, batch_size: int, num_kv_heads: int, capacity: int) -> int:
  """The accounting formula for `nbytes`: 2·B·K·S·H elements of the dtype plus int32 lengths (the
  baseline of the compressed cache's ratios, with dtype="bfloat16")."""
  item = jnp.dtype(config.dtype).itemsize
  return 2 * batch_size * num_kv_heads * capacity * config.head_dim * item + 4 * batch_size


def partition_specs(cache: DenseKVCache, axis: str | tuple[str, ...] = "x") -> DenseKVCache:
  """The cache's `PartitionSpec`s, a DenseKVCache-shaped pytree, for sharding its sequences over
  mesh `axis` (as `tqjax.cache.partition_specs`): P(axis) on k, v and lengths."""
  spec = jax.sharding.PartitionSpec(axis)
  return DenseKVCache(cache.config, spec, spec, spec)
