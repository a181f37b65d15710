"""The compressed KV cache: a pytree of TurboQuant codes, and reference (XLA) attention over it.

Layout (batch and kv heads lead, so a `NamedSharding` over heads needs no communication):

  k, v: `Store`   codes uint32 [B, K, S, words], scales [B, K, S] (+ QJL signs [B, K, S, words_m]
                  and residual norms [B, K, S] for prod keys; + an outlier-channel `Code` and the
                  channel permutation [B, K, D] when outlier channels are on)
  lengths         int32 [B], tokens written per sequence (Gemma's `end_index`)
  key_mean        float32 [B, K, D] when `center_keys` (found at prefill), else None
  window_k/v      [B, K, W, D] ring buffer of the most recent W tokens in full precision, else None

Attention never forms dequantized keys or values for the whole cache: the query is rotated once
(Π·q, and S·Π·q for prod keys), logits come from codes and scales block by block under an
online softmax, values are accumulated in rotated space and un-rotated once per query.
Einsum letters: B batch, K kv heads, G query heads per kv head, T query tokens, S cache slots,
D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from tqjax.codebook import check_bits
from tqjax.qjl import project, signs as qjl_signs
from tqjax.quantizer import (
    Code,
    Quantizer,
    QuantizerConfig,
    bits_per_coordinate,
    codebook_direction,
    encode,
    quantizer_from_config,
)
from tqjax.rotation import rotate, unrotate

IMPLEMENTATIONS = (None, "xla", "pallas")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Static configuration of a compressed KV cache (validated on construction).

  The defaults are the recommended configuration measured in experiments/kv_fidelity.py:
  K4/V4 mse with norm correction, key centring and float16 scales (float16 scales overflow to
  inf for vectors with norm above 65504: use norm_dtype="float32" or "bfloat16" for such data).

  k_bits / v_bits: total bits per coordinate of keys / values (prod keys: bits − 1 codebook + 1 QJL).
  k_variant: "mse" or "prod" for keys; values are always mse.
  norm_correction: rescale mse reconstructions to unit direction before applying the norm.
  outlier_channels: channels per head (top by RMS over the prefill) quantized separately with
    `outlier_bits` (default: bits + 1), as in the paper's 2.5/3.5-bit settings; 0 = off.
  center_keys: subtract a per-head key mean found at prefill (stored, counted) before quantizing.
  window: keep the most recent `window` tokens also in full precision (KIVI-style); 0 = off.
  """

  head_dim: int
  k_bits: int = 4
  v_bits: int = 4
  k_variant: str = "mse"
  norm_correction: bool = True
  norm_dtype: str = "float16"
  rotation: str = "haar"
  qjl_kind: str = "orthogonal"
  center_keys: bool = True
  outlier_channels: int = 0
  outlier_bits: int | None = None
  window: int = 0
  window_dtype: str = "bfloat16"
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 2:
      raise ValueError(f"head_dim must be an integer >= 2, got head_dim={self.head_dim!r}")
    check_bits(self.k_bits, name="k_bits")
    check_bits(self.v_bits, name="v_bits")
    n = self.outlier_channels
    if isinstance(n, bool) or not isinstance(n, int) or not (n == 0 or 2 <= n <= self.head_dim - 2):
      raise ValueError(f"outlier_channels must be 0 or in [2, head_dim - 2], got outlier_channels={n!r}")
    if self.outlier_bits is not None:
      check_bits(self.outlier_bits, name="outlier_bits")
    if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
      raise ValueError(f"window must be an integer >= 0, got window={self.window!r}")
    # Building the quantizer configs validates variant, dtypes, rotation and QJL options.
    for part in ("k", "v"):
      self.quantizer_config(part, outlier=False)
      if n:
        self.quantizer_config(part, outlier=True)

  def quantizer_config(self, part: str, outlier: bool) -> QuantizerConfig:
    """The QuantizerConfig of keys ("k") or values ("v"), main or outlier channels."""
    bits = self.k_bits if part == "k" else self.v_bits
    dim = self.head_dim - self.outlier_channels
    if outlier:
      bits, dim = (self.outlier_bits or min(bits + 1, 8)), self.outlier_channels
    prod = part == "k" and self.k_variant == "prod"
    return QuantizerConfig(
        dim=dim,
        bits=bits,
        variant="prod" if prod else "mse",
        norm_correction=self.norm_correction and not prod,
        norm_dtype=self.norm_dtype,
        rotation=self.rotation,
        qjl_kind=self.qjl_kind,
        seed=self.seed + (1 if outlier else 0),
    )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("quantizer", "main", "outlier_quantizer", "outlier", "perm"),
    meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class Store:
  """Compressed keys or values. main/outlier: `Code` with batch dims [B, K, S].

  perm: int32 [B, K, D] when outlier channels are on: channel perm[:n_out] are the outliers,
  the rest (in increasing order) the main channels; else None.
  """

  quantizer: Quantizer
  main: Code
  outlier_quantizer: Quantizer | None = None
  outlier: Code | None = None
  perm: jax.Array | None = None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("k", "v", "lengths", "key_mean", "window_k", "window_v"),
    meta_fields=("config",),
)
@dataclasses.dataclass(frozen=True)
class KVCache:
  """A compressed KV cache for B sequences, K kv heads and S slots (see the module docstring)."""

  config: CacheConfig
  k: Store
  v: Store
  lengths: jax.Array
  key_mean: jax.Array | None = None
  window_k: jax.Array | None = None
  window_v: jax.Array | None = None

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.k.main.norms.shape[1]

  @property
  def capacity(self) -> int:
    return self.k.main.norms.shape[2]

  @property
  def end_index(self) -> jax.Array:
    """Gemma's name for `lengths`."""
    return self.lengths


# ----------------------------------------------------------------------------- construction


def _empty_code(tq: Quantizer, lead: tuple[int, ...]) -> Code:
  return jax.eval_shape(lambda: encode(tq, jnp.zeros((*lead, tq.dim), jnp.float32)))


def _zeros_like_code(tq: Quantizer, lead: tuple[int, ...]) -> Code:
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), _empty_code(tq, lead))


def _empty_store(config: CacheConfig, part: str, lead: tuple[int, ...]) -> Store:
  tq = quantizer_from_config(config.quantizer_config(part, outlier=False))
  if not config.outlier_channels:
    return Store(tq, _zeros_like_code(tq, lead))
  tq_out = quantizer_from_config(config.quantizer_config(part, outlier=True))
  perm = jnp.broadcast_to(jnp.arange(config.head_dim, dtype=jnp.int32), (*lead[:2], config.head_dim))
  return Store(tq, _zeros_like_code(tq, lead), tq_out, _zeros_like_code(tq_out, lead), perm)


def init_cache(config: CacheConfig, batch_size: int, num_kv_heads: int, capacity: int) -> KVCache:
  """An empty cache (all lengths 0) for `batch_size` sequences of up to `capacity` tokens."""
  for name, val in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("capacity", capacity)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{name} must be a positive integer, got {name}={val!r}")
  lead = (batch_size, num_kv_heads, capacity)
  window = None
  if config.window:
    window = jnp.zeros((batch_size, num_kv_heads, config.window, config.head_dim), config.window_dtype)
  return KVCache(
      config=config,
      k=_empty_store(config, "k", lead),
      v=_empty_store(config, "v", lead),
      lengths=jnp.zeros((batch_size,), jnp.int32),
      key_mean=jnp.zeros((batch_size, num_kv_heads, config.head_dim), jnp.float32) if config.center_keys else None,
      window_k=window,
      window_v=window,
  )


# ----------------------------------------------------------------------------- writing


def _check_kv(cache: KVCache, k: jax.Array, v: jax.Array, op: str) -> None:
  b, h, d = cache.batch_size, cache.num_kv_heads, cache.config.head_dim
  for name, x in (("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{op}: {name} must be floating point, got {name}.dtype={x.dtype}")
    if x.ndim != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (b, h, d):
      raise ValueError(
          f"{op}: {name} must be [batch={b}, kv_heads={h}, tokens, head_dim={d}], got {name}.shape={x.shape}"
      )
  if k.shape != v.shape:
    raise ValueError(f"{op}: k and v shapes differ: {k.shape=} {v.shape=}")
  if k.shape[2] > cache.capacity:
    raise ValueError(f"{op}: {k.shape[2]} tokens exceed the cache capacity={cache.capacity}")


def scatter_tokens(dst: jax.Array, src: jax.Array, pos: jax.Array, ok: jax.Array) -> jax.Array:
  """dst [B, K, S, ...] ← src [B, K, T, ...] at slots pos [B, T] where ok [B, T]; others dropped."""
  slots = jnp.where(ok, pos, dst.shape[2])[:, None, :]  # out of range → dropped by mode="drop"
  b = jnp.arange(dst.shape[0])[:, None, None]
  h = jnp.arange(dst.shape[1])[None, :, None]
  # Index arrays broadcast to [B, K, T], matching src's leading dims: an in-place scatter of
  # T tokens, with no transpose of the whole cache. The result is sharded as dst (explicit mesh
  # axes need it said).
  return dst.at[b, h, slots].set(src, mode="drop", out_sharding=jax.typeof(dst).sharding)


def write_prefix(dst: jax.Array, src: jax.Array, ok: jax.Array) -> jax.Array:
  """dst [B, K, S, ...] ← src [B, K, T, ...] at slots 0 .. T − 1 where ok [B, T]; the others kept,
  tokens past S dropped: `scatter_tokens` at pos = 0 .. T − 1 as one in-place slice update (a
  prefill's write; measured ~1.5x faster than the scatter on an H100)."""
  t = min(src.shape[2], dst.shape[2])
  keep = ok[:, :t].reshape(ok.shape[0], 1, t, *(1,) * (src.ndim - 3))
  new = jnp.where(keep, src[:, :, :t], dst[:, :, :t]).astype(dst.dtype)
  # A prompt as long as the cache replaces it whole; as a slice update of the whole array, XLA:CPU
  # (jax 0.11.2) crashed compiling it under shard_map.
  return new if t == dst.shape[2] else dst.at[:, :, :t].set(new)


def _split_channels(x: jax.Array, perm: jax.Array | None, n_out: int) -> tuple[jax.Array, jax.Array | None]:
  """x [B, K, ..., D] → (main channels [..., D − n_out], outlier channels [..., n_out] or None).

  perm [B, K, D] is the store's channel permutation (outliers first).
  """
  if perm is None:
    return x, None
  p = perm.reshape(*perm.shape[:2], *(1,) * (x.ndim - 3), perm.shape[-1])
  xp = jnp.take_along_axis(x, jnp.broadcast_to(p, x.shape), axis=-1)
  return xp[..., n_out:], xp[..., :n_out]


def encode_tokens(tq: Quantizer, x: jax.Array, mean: jax.Array | None = None) -> Code:
  """The write path's encode: `encode(tq, x − mean)`, the contract fused encode kernels implement.

  x [..., T, d] (float32/bfloat16/float16); mean [..., d] float32 (one per group of T tokens,
  e.g. the cache's key mean per (batch, kv head)) or None.
  """
  if mean is not None:
    x = x.astype(jnp.float32) - mean[..., None, :]
  return encode(tq, x)


def _write_store(store: Store, x: jax.Array, put, n_out: int, mean, encoder) -> Store:
  """Encodes x [B, K, T, D] (− mean [B, K, D], if given) with `encoder` and writes it into `store`
  with put(dst, src)."""
  if store.perm is None:
    return dataclasses.replace(store, main=jax.tree_util.tree_map(put, store.main, encoder(store.quantizer, x, mean)))
  if mean is not None:  # the channel split permutes channels per head: centre first
    x = x.astype(jnp.float32) - mean[:, :, None, :]
  main, out = _split_channels(x, store.perm, n_out)
  new_main = jax.tree_util.tree_map(put, store.main, encoder(store.quantizer, main, None))
  new_out = jax.tree_util.tree_map(put, store.outlier, encoder(store.outlier_quantizer, out, None))
  return dataclasses.replace(store, main=new_main, outlier=new_out)


def _write(
    cache: KVCache, k: jax.Array, v: jax.Array, start: jax.Array, count: jax.Array, encoder=encode_tokens,
    prefix: bool = False,
) -> KVCache:
  """Writes tokens t < count[b] of k, v [B, K, T, D] at slots start[b] + t; past capacity is dropped.
  prefix: start is 0 for every sequence (prefill), so the tokens go to slots 0 .. T − 1 in place."""
  t = k.shape[2]
  pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  ok = (jnp.arange(t)[None, :] < count[:, None]) & (pos < cache.capacity)
  if prefix:
    put = lambda dst, src: write_prefix(dst, src, ok)
  else:
    put = lambda dst, src: scatter_tokens(dst, src, pos, ok)
  n_out = cache.config.outlier_channels
  new = dataclasses.replace(
      cache,
      k=_write_store(cache.k, k, put, n_out, cache.key_mean, encoder),
      v=_write_store(cache.v, v, put, n_out, None, encoder),
      lengths=jnp.minimum(start + count, cache.capacity).astype(jnp.int32),
  )
  if cache.config.window:
    w = cache.config.window
    ring = lambda buf, x: scatter_tokens(buf, x.astype(buf.dtype), pos % w, ok & (pos >= start[:, None] + count[:, None] - w))
    new = dataclasses.replace(new, window_k=ring(cache.window_k, k), window_v=ring(cache.window_v, v))
  return new


def _valid_count(lengths, t: int, b: int, op: str) -> jax.Array:
  if lengths is None:
    return jnp.full((b,), t, jnp.int32)
  lengths = jnp.asarray(lengths)
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{op}: lengths must be integers of shape [{b}], got {lengths.dtype} {lengths.shape}")
  return jnp.clip(lengths.astype(jnp.int32), 0, t)


def _masked_mean(x: jax.Array, count: jax.Array) -> jax.Array:
  """Mean over tokens t < count[b] of x [B, K, T, D] → [B, K, D] (0 where count is 0); the other
  tokens are never read into it (NaN padding included)."""
  m = (jnp.arange(x.shape[2])[None, :] < count[:, None])[:, None, :, None]
  return jnp.sum(jnp.where(m, x, 0.0), axis=2) / jnp.maximum(count, 1).astype(jnp.float32)[:, None, None]


def _outlier_perm(x: jax.Array, count: jax.Array, n_out: int) -> jax.Array:
  """Channel permutation [B, K, D]: the n_out channels of largest RMS first, then the rest in order."""
  rms = _masked_mean(jnp.square(x), count)
  top = jax.lax.top_k(rms, n_out)[1].astype(jnp.int32)
  is_out = jnp.any(jnp.arange(x.shape[-1])[None, None, :, None] == top[:, :, None, :], axis=-1)
  rest = jnp.argsort(is_out, axis=-1, stable=True).astype(jnp.int32)[..., : x.shape[-1] - n_out]
  return jnp.concatenate([jnp.sort(top, axis=-1), rest], axis=-1)


def prefill(
    cache: KVCache,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> KVCache:
  """Starts every sequence afresh with T prompt tokens k, v [B, K, T, D] (T ≤ capacity).

  lengths [B] (optional, ≤ T): how many of the T tokens are real per sequence (right padding).
  The key mean (center_keys) and the outlier channels are found here from the real tokens.
  implementation: None encodes with the fused Pallas kernel on GPU where it supports the
  quantizers (XLA for the rest) and with XLA elsewhere; "pallas" insists on the kernel for
  every encode (ValueError naming the reason if it can't); "xla" never uses it.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} must be one of {IMPLEMENTATIONS}")
  _check_kv(cache, k, v, "prefill")
  if implementation == "xla":
    return prefill_with_encoder(cache, k, v, lengths)
  from pallas_kernels import dispatch  # lazy: tqjax must import without Pallas backends

  if implementation is None:
    if dispatch.default_prefill_implementation(cache, (k.dtype, v.dtype)) == "xla":
      return prefill_with_encoder(cache, k, v, lengths)
    return dispatch.prefill(cache, k, v, lengths, xla_fallback=True)
  return dispatch.prefill(cache, k, v, lengths)


def prefill_with_encoder(
    cache: KVCache, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, *, encoder=encode_tokens
) -> KVCache:
  """`prefill` with `encoder(tq, x, mean)` in place of `encode_tokens` (same contract), which is
  how fused encode kernels plug in (`pallas_kernels.dispatch.prefill`)."""
  _check_kv(cache, k, v, "prefill")
  b, t = cache.batch_size, k.shape[2]
  count = _valid_count(lengths, t, b, "prefill")
  new = cache
  if cache.key_mean is not None:
    new = dataclasses.replace(new, key_mean=_masked_mean(k.astype(jnp.float32), count))
  if cache.config.outlier_channels:
    n = cache.config.outlier_channels
    kf = k.astype(jnp.float32)
    k_c = kf - new.key_mean[:, :, None, :] if new.key_mean is not None else kf
    new = dataclasses.replace(
        new,
        k=dataclasses.replace(new.k, perm=_outlier_perm(k_c, count, n)),
        v=dataclasses.replace(new.v, perm=_outlier_perm(v.astype(jnp.float32), count, n)),
    )
  return _write(new, k, v, jnp.zeros((b,), jnp.int32), count, encoder, prefix=True)


def append(cache: KVCache, k: jax.Array, v: jax.Array, num_new: jax.Array | None = None) -> KVCache:
  """Appends tokens k, v [B, K, T, D] at each sequence's own position (its current length).

  num_new [B] (optional, ≤ T): how many of the T tokens are real per sequence. Tokens that would
  land past the capacity are dropped and `lengths` saturates at the capacity; use
  `append_checked` to get an error instead (inside jit only run-time values can tell).
  """
  _check_kv(cache, k, v, "append")
  count = _valid_count(num_new, k.shape[2], cache.batch_size, "append")
  return _write(cache, k, v, cache.lengths, count)


def append_checked(cache: KVCache, k: jax.Array, v: jax.Array, num_new: jax.Array | None = None):
  """`append` under `checkify`: returns (error, cache); `error.throw()` raises on overflow.

  Works under jit: `jax.jit(append_checked)(cache, k, v)`.
  """

  def checked(cache, k, v, num_new):
    _check_kv(cache, k, v, "append")
    count = _valid_count(num_new, k.shape[2], cache.batch_size, "append")
    end = cache.lengths + count
    checkify.check(
        jnp.all(end <= cache.capacity),
        "append past capacity: lengths + new tokens = {end} exceed capacity " + str(cache.capacity),
        end=end,
    )
    return append(cache, k, v, num_new)

  return checkify.checkify(checked)(cache, k, v, num_new)


def partition_specs(cache: KVCache, axis: str | tuple[str, ...] = "x") -> KVCache:
  """The cache's `PartitionSpec`s, a KVCache-shaped pytree, for sharding its sequences over mesh
  `axis`: P(axis) on every per-sequence array (codes, norms, lengths, key mean, channel
  permutations, window), P() on the quantizers' constants. For `jax.shard_map`'s in_specs /
  out_specs, or `NamedSharding`s to `jax.device_put` the cache with."""
  P = jax.sharding.PartitionSpec
  rep = lambda tree: jax.tree_util.tree_map(lambda _: P(), tree)
  seq = lambda tree: jax.tree_util.tree_map(lambda _: P(axis), tree)
  store = lambda s: Store(rep(s.quantizer), seq(s.main), rep(s.outlier_quantizer), seq(s.outlier), seq(s.perm))
  return KVCache(cache.config, store(cache.k), store(cache.v), P(axis), seq(cache.key_mean), seq(cache.window_k),
                 seq(cache.window_v))


# ----------------------------------------------------------------------------- accounting


def nbytes(cache: KVCache) -> int:
  """Bytes resident in the cache's per-token and per-sequence arrays (quantizer constants excluded)."""
  leaves = [cache.k.main, cache.k.outlier, cache.k.perm, cache.v.main, cache.v.outlier, cache.v.perm]
  leaves += [cache.lengths, cache.key_mean, cache.window_k, cache.window_v]
  return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(leaves))


def constants_nbytes(cache: KVCache) -> int:
  """Bytes of the quantizer constants (rotations, codebooks, QJL sketches), shared by all tokens."""
  qs = [cache.k.quantizer, cache.k.outlier_quantizer, cache.v.quantizer, cache.v.outlier_quantizer]
  return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(qs))


def expected_nbytes(config: CacheConfig, batch_size: int, num_kv_heads: int, capacity: int) -> int:
  """The accounting formula for `nbytes`: per-token bits of every part plus per-sequence data."""
  per_token_bits = 0.0
  for part in ("k", "v"):
    for outlier in ((False, True) if config.outlier_channels else (False,)):
      qc = config.quantizer_config(part, outlier)
      per_token_bits += bits_per_coordinate(qc) * qc.dim
  heads = batch_size * num_kv_heads
  total = heads * capacity * per_token_bits / 8 + 4 * batch_size  # + lengths (int32)
  if config.outlier_channels:
    total += 2 * heads * config.head_dim * 4  # channel permutations (int32) of k and v
  if config.center_keys:
    total += heads * config.head_dim * 4
  if config.window:
    total += 2 * heads * config.window * config.head_dim * jnp.dtype(config.window_dtype).itemsize
  return int(round(total))


def bits_per_coordinate_kv(config: CacheConfig) -> tuple[float, float]:
  """Per-token stored bits per coordinate of (keys, values), all side data per token included."""
  out = []
  for part in ("k", "v"):
    bits = 0.0
    for outlier in ((False, True) if config.outlier_channels else (False,)):
      qc = config.quantizer_config(part, outlier)
      bits += bits_per_coordinate(qc) * qc.dim
    out.append(bits / config.head_dim)
  return out[0], out[1]


# ----------------------------------------------------------------------------- attention


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("q", "sq", "offset"), meta_fields=()
)
@dataclasses.dataclass(frozen=True)
class PreparedQuery:
  """Per-query work done once, in the key stores' spaces.

  q:      tuple (main[, outlier]) of rotated, scaled queries [B, K, G, T, d_part].
  sq:     tuple of QJL projections S·q [B, K, G, T, m] (None for mse keys).
  offset: [B, K, G, T] logit offset q·μ·scale from key centring (zeros without it).
  """

  q: tuple
  sq: tuple
  offset: jax.Array


def prepare_query(cache: KVCache, q: jax.Array, scale: float) -> PreparedQuery:
  """q [B, K, G, T, D] (float32, unscaled) → rotated, scaled parts for the key stores."""
  qs = q * jnp.float32(scale)
  offset = jnp.zeros(q.shape[:-1], jnp.float32)
  if cache.key_mean is not None:  # q·(k − μ) + q·μ: one dot per query keeps logits exact
    offset = jnp.einsum("bkgtd,bkd->bkgt", qs, cache.key_mean, precision=_HIGHEST)
  store = cache.k
  parts = _split_channels(qs, store.perm, cache.config.outlier_channels)
  rot, sq = [], []
  for tq, part in zip((store.quantizer, store.outlier_quantizer), parts):
    if part is None:
      continue
    qr = rotate(tq.rotation, part)
    rot.append(qr)
    sq.append(project(tq.qjl, qr) if tq.qjl is not None else None)
  return PreparedQuery(tuple(rot), tuple(sq), offset)


def _code_slice(code: Code, start, size: int) -> Code:
  return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=2), code)


def _block_logits(tq: Quantizer, code: Code, q_rot: jax.Array, sq: jax.Array | None) -> jax.Array:
  """Logits [B, K, G, T, N] of rotated queries [B, K, G, T, d] against a block of N codes."""
  y_hat = codebook_direction(tq, code.codes)  # [B, K, N, d]: one block, never the whole cache
  ip = jnp.einsum("bkgtd,bknd->bkgtn", q_rot, y_hat, precision=_HIGHEST)
  if sq is not None:
    s = qjl_signs(tq.qjl, code.qjl_signs)
    qjl = jnp.einsum("bkgtm,bknm->bkgtn", sq, s, precision=_HIGHEST)
    ip = ip + qjl * (code.residual_norms.astype(jnp.float32) / (tq.qjl.kappa * tq.qjl.sketch_dim))[:, :, None, None, :]
  return ip * code.norms.astype(jnp.float32)[:, :, None, None, :]


def _block_values(tq: Quantizer, code: Code, p: jax.Array) -> jax.Array:
  """Σ_n p[..., n]·scale_n·ŷ_n in rotated space: p [B, K, G, T, N] → [B, K, G, T, d]."""
  y_hat = codebook_direction(tq, code.codes) * code.norms.astype(jnp.float32)[..., None]
  return jnp.einsum("bkgtn,bknd->bkgtd", p, y_hat, precision=_HIGHEST)


def _cap(logits: jax.Array, soft_cap: float | None) -> jax.Array:
  if soft_cap is None:
    return logits
  return jnp.float32(soft_cap) * jnp.tanh(logits / jnp.float32(soft_cap))


def compressed_partial_reference(cache, pq, lo, hi, soft_cap, block_size=1024):
  """Online softmax over compressed slots n with lo ≤ n < hi (lo, hi [B, T]), in blocks.

  The contract every fused kernel implements (`pallas_kernels`): given the prepared query,
  returns (accs, m, l) with accs a tuple (main[, outlier]) of UNnormalized Σ p·scale·ŷ in the
  value stores' rotated spaces [B, K, G, T, d_part], m the running max and l the sum of
  exp(logit − m) [B, K, G, T]. An empty range gives m = −inf, l = 0, accs = 0.
  """
  b, kh = cache.batch_size, cache.num_kv_heads
  g, t = pq.offset.shape[2], pq.offset.shape[3]
  n_blk = min(block_size, cache.capacity)
  num_blocks = -(-cache.capacity // n_blk)
  kstores = [(cache.k.quantizer, cache.k.main), (cache.k.outlier_quantizer, cache.k.outlier)]
  vstores = [(cache.v.quantizer, cache.v.main), (cache.v.outlier_quantizer, cache.v.outlier)]
  kstores = [s for s in kstores if s[1] is not None]
  vstores = [s for s in vstores if s[1] is not None]

  def body(i, carry):
    accs, m, l = carry
    start = jnp.minimum(i * n_blk, cache.capacity - n_blk)  # dynamic_slice would clamp anyway
    slots = start + jnp.arange(n_blk)
    logits = pq.offset[..., None]
    for (tq, code), q_rot, sq in zip(kstores, pq.q, pq.sq):
      logits = logits + _block_logits(tq, _code_slice(code, start, n_blk), q_rot, sq)
    logits = _cap(logits, soft_cap)
    # A clamped last block re-reads slots of the previous one: count each slot once.
    ok = (slots >= i * n_blk)[None, None, :] & (slots[None, None, :] >= lo[..., None]) & (slots[None, None, :] < hi[..., None])
    logits = jnp.where(ok[:, None, None, :, :], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(logits - m_safe[..., None])
    corr = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
    l = l * corr + jnp.sum(p, axis=-1)
    accs = tuple(
        acc * corr[..., None] + _block_values(tq, _code_slice(code, start, n_blk), p)
        for acc, (tq, code) in zip(accs, vstores)
    )
    return accs, m_new, l

  accs0 = tuple(jnp.zeros((b, kh, g, t, tq.dim), jnp.float32) for tq, _ in vstores)
  m0 = jnp.full((b, kh, g, t), -jnp.inf, jnp.float32)
  l0 = jnp.zeros((b, kh, g, t), jnp.float32)
  # The first block runs outside the loop: under shard_map its carry is varying over the mesh
  # axes of the inputs, which the constant initial values are not (the loop needs both equal).
  return jax.lax.fori_loop(1, num_blocks, body, body(0, (accs0, m0, l0)))


def _finish_values(cache: KVCache, accs: tuple, l: jax.Array) -> jax.Array:
  """Normalizes accumulated values by l, un-rotates them once and undoes the channel split:
  → [B, K, G, T, D]. The division comes before the (linear) un-rotation so that XLA may fuse it
  into the fusion that finishes a kernel's output (the Triton kernel's split merge, the Mosaic
  GPU kernel's un-permutation) instead of running it as a kernel of its own."""
  denom = jnp.where(l > 0, l, 1.0)[..., None]
  outs = [unrotate(tq.rotation, acc / denom) for acc, tq in zip(accs, (cache.v.quantizer, cache.v.outlier_quantizer))]
  o = outs[0] if len(outs) == 1 else jnp.concatenate([outs[1], outs[0]], axis=-1)
  if cache.v.perm is not None:
    order = jnp.argsort(cache.v.perm, axis=-1)[:, :, None, None, :]
    o = jnp.take_along_axis(o, jnp.broadcast_to(order, o.shape), axis=-1)
  return o


def _window_partial(cache, qs, lo, hi, soft_cap):
  """Exact attention over the full-precision ring: (o [B,K,G,T,D] normalized, m, l)."""
  w = cache.config.window
  ring_slots = jnp.arange(w)
  end = cache.lengths[:, None]
  # Slot j holds the token at the largest position p < end with p ≡ j (mod w).
  pos = end[..., None] - 1 - ((end[..., None] - 1 - ring_slots) % w)  # [B, 1, W]
  ok = (pos >= 0) & (pos >= lo[..., None]) & (pos < hi[..., None])  # [B, T, W]
  logits = jnp.einsum("bkgtd,bkwd->bkgtw", qs, cache.window_k.astype(jnp.float32), precision=_HIGHEST)
  logits = jnp.where(ok[:, None, None], _cap(logits, soft_cap), -jnp.inf)
  m = jnp.max(logits, axis=-1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m_safe[..., None])
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgtw,bkwd->bkgtd", p, cache.window_v.astype(jnp.float32), precision=_HIGHEST)
  return o / jnp.where(l > 0, l, 1.0)[..., None], m, l


def merge_partials(o1, m1, l1, o2, m2, l2):
  """Combines two normalized softmax partials (o [..., D], running max m [...], sum l [...])."""
  m = jnp.maximum(m1, m2)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w1 = jnp.where(jnp.isfinite(m1), jnp.exp(m1 - m_safe), 0.0) * l1
  w2 = jnp.where(jnp.isfinite(m2), jnp.exp(m2 - m_safe), 0.0) * l2
  tot = w1 + w2
  o = (o1 * w1[..., None] + o2 * w2[..., None]) / jnp.where(tot > 0, tot, 1.0)[..., None]
  return o, m, tot


def _check_query(cache: KVCache, q: jax.Array, op: str) -> None:
  d, b, kh = cache.config.head_dim, cache.batch_size, cache.num_kv_heads
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"{op}: q must be floating point, got q.dtype={q.dtype}")
  if q.ndim != 4 or q.shape[0] != b or q.shape[-1] != d:
    raise ValueError(f"{op}: q must be [batch={b}, q_heads, tokens, head_dim={d}], got q.shape={q.shape}")
  if q.shape[1] % kh:
    raise ValueError(f"{op}: q_heads={q.shape[1]} must be a multiple of the cache's kv_heads={kh}")


def query_ranges(cache: KVCache, t: int, sliding_window: int | None, causal: bool = True):
  """Per query token: attended slots [lo, hi) [B, T] for T queries, the last T cached tokens.

  Causal: query t sees slots < lengths − T + t + 1; otherwise every query sees slots < lengths.
  """
  offsets = jnp.arange(t, dtype=jnp.int32)[None, :] - t + 1 if causal else jnp.zeros((1, t), jnp.int32)
  hi = jnp.clip(cache.lengths[:, None] + offsets, 0, cache.capacity)
  lo = jnp.zeros_like(hi) if sliding_window is None else jnp.maximum(hi - sliding_window, 0)
  return lo, hi


def chunked_attention(
    cache: KVCache,
    q: jax.Array,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    block_size: int = 1024,
    return_residuals: bool = False,
    partial_fn=None,
):
  """Attention of a block of T queries q [B, Hq, T, D] whose tokens were just appended.

  Query t sits at position lengths − T + t and attends to positions ≤ its own (and, with a
  sliding window, to the last `sliding_window` of those). causal=False lets every query see
  all `lengths` tokens (bidirectional encoders). Hq must be a multiple of the cache's
  kv heads (GQA/MQA). Returns [B, Hq, T, D] in q's dtype (and, with return_residuals, the
  softmax max and sum [B, Hq, T] for merging with other partials). partial_fn replaces
  `compressed_partial_reference` (same contract), which is how fused kernels plug in.
  """
  _check_query(cache, q, "attention")
  if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window=}")
  b, hq, t, d = q.shape
  kh = cache.num_kv_heads
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, kh, hq // kh, t, d)
  lo, hi = query_ranges(cache, t, sliding_window, causal)
  pq = prepare_query(cache, qg, scale)
  c_hi = hi if not cache.config.window else jnp.minimum(hi, jnp.maximum(cache.lengths[:, None] - cache.config.window, 0))
  if partial_fn is None:
    accs, m, l = compressed_partial_reference(cache, pq, lo, c_hi, soft_cap, block_size)
  else:
    accs, m, l = partial_fn(cache, pq, lo, c_hi, soft_cap)
  o = _finish_values(cache, accs, l)
  if cache.config.window:
    w_lo = jnp.maximum(lo, c_hi)
    o2, m2, l2 = _window_partial(cache, qg * jnp.float32(scale), w_lo, hi, soft_cap)
    o, m, l = merge_partials(o, m, l, o2, m2, l2)
  out = o.reshape(b, hq, t, d).astype(q.dtype)
  if return_residuals:
    return out, m.reshape(b, hq, t), l.reshape(b, hq, t)
  return out


def attention(
    cache: KVCache,
    q: jax.Array,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Decode attention of one query per sequence, q [B, Hq, D], over the cache → [B, Hq, D].

  The query is the newest token (already appended): it sees positions < lengths[b]. scale
  defaults to 1/√D; soft_cap applies cap·tanh(logit/cap); sliding_window limits the span.
  implementation: None picks the fused Pallas kernel on GPU/TPU and "xla" elsewhere.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} must be one of {IMPLEMENTATIONS}")
  if q.ndim != 3:
    raise ValueError(f"attention: q must be [batch, q_heads, head_dim], got q.shape={q.shape}")
  if implementation is None:
    from pallas_kernels import dispatch  # lazy: tqjax must import without Pallas backends

    implementation = dispatch.default_implementation(cache)
  if implementation == "pallas":
    from pallas_kernels import dispatch

    return dispatch.attention(cache, q, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)
  return chunked_attention(cache, q[:, :, None, :], scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)[:, :, 0]


def scores(cache: KVCache, q: jax.Array, *, scale: float | None = None, soft_cap: float | None = None) -> jax.Array:
  """Raw (scaled, capped) logits of q [B, Hq, D] against every slot → [B, Hq, S]; −inf past lengths."""
  if q.ndim != 3:
    raise ValueError(f"scores: q must be [batch, q_heads, head_dim], got q.shape={q.shape}")
  _check_query(cache, q[:, :, None, :], "scores")
  b, hq, d = q.shape
  kh = cache.num_kv_heads
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, kh, hq // kh, 1, d)
  pq = prepare_query(cache, qg, scale)
  logits = pq.offset[..., None]
  for tq, code, q_rot, sq in zip(
      (cache.k.quantizer, cache.k.outlier_quantizer), (cache.k.main, cache.k.outlier), pq.q, pq.sq
  ):
    logits = logits + _block_logits(tq, code, q_rot, sq)
  logits = _cap(logits, soft_cap)[:, :, :, 0]
  valid = jnp.arange(cache.capacity)[None, :] < cache.lengths[:, None]
  return jnp.where(valid[:, None, None], logits, -jnp.inf).reshape(b, hq, cache.capacity)
