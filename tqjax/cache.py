"""The compressed KV cache: storage of TurboQuant codes and the ops that write it.

Owns `CacheConfig`, the `KVCache` pytree, `init_cache`, the write path (`prefill_with_encoder`,
`append`, `append_checked`), byte accounting and partition specs. Reading it (attention) is
`tqjax.partials` (the kernel contract) and `tqjax.ops` (the public entry, which also
holds `prefill` with its choice of encode implementation).

Layout (batch and kv heads lead, so a `NamedSharding` over heads needs no communication):

  k, v: `Store`   codes uint32 [B, K, S, words], norms [B, K, S] (+ QJL signs [B, K, S, words_m]
                  and residual norms [B, K, S] for prod keys; + an outlier-channel `Code` and the
                  channel permutation [B, K, H] when outlier channels are on)
  lengths         int32 [B], tokens written per sequence (Gemma's `end_index`)
  key_mean        float32 [B, K, H] when `center_keys` (found at prefill), else None
  window_k/v      [B, K, W, H] ring buffer of the most recent W tokens in full precision, else None

Shapes: B batch, K kv heads, T new tokens, S cache slots, H head dim, W window.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from tqjax.codebook import check_bits
from tqjax.quantizer import (
    Code,
    Quantizer,
    QuantizerConfig,
    bits_per_coordinate,
    encode,
    quantizer_from_config,
)

__all__ = [
    "CacheConfig",
    "Store",
    "KVCache",
    "init_cache",
    "encode_tokens",
    "prefill_with_encoder",
    "append",
    "append_checked",
    "partition_specs",
    "nbytes",
    "constants_nbytes",
    "expected_nbytes",
    "bits_per_coordinate_kv",
    "scatter_tokens",
    "write_prefix",
    "token_writer",
    "split_channels",
    "check_kv",
    "valid_count",
    "check_capacity",
    "outlier_perm",
]


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Static configuration of a compressed KV cache (validated on construction).

  The defaults are the recommended configuration measured in experiments/kv_fidelity.py:
  K4/V4 mse with norm correction, key centring and float16 norms (float16 norms overflow to
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

  perm: int32 [B, K, H] when outlier channels are on: channel perm[:n_out] are the outliers,
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


def check_kv(cache: KVCache, k: jax.Array, v: jax.Array, op: str) -> None:
  """Raises naming the problem unless k, v are floating arrays [B, K, T, H] of this cache, T ≤ S."""
  b, h, d = cache.batch_size, cache.num_kv_heads, cache.config.head_dim
  for name, x in (("k", k), ("v", v)):
    if not isinstance(x, (jax.Array, np.ndarray)):
      raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
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


def token_writer(start: jax.Array, count: jax.Array, t: int, capacity: int, prefix: bool):
  """Where T new tokens go: (pos [B, T] = start[b] + t, ok [B, T] = t < count[b] and pos < S,
  put(dst [B, K, S, ...], src [B, K, T, ...]) writing them there in dst's dtype). prefix: start
  is 0 for every sequence (a prefill), so put is one in-place slice update (`write_prefix`)."""
  pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  ok = (jnp.arange(t)[None, :] < count[:, None]) & (pos < capacity)
  if prefix:
    return pos, ok, lambda dst, src: write_prefix(dst, src, ok)
  return pos, ok, lambda dst, src: scatter_tokens(dst, src.astype(dst.dtype), pos, ok)


def split_channels(x: jax.Array, perm: jax.Array | None, n_out: int) -> tuple[jax.Array, jax.Array | None]:
  """x [B, K, ..., H] → (main channels [..., H − n_out], outlier channels [..., n_out] or None).

  perm [B, K, H] is the store's channel permutation (outliers first).
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
  """Encodes x [B, K, T, H] (− mean [B, K, H], if given) with `encoder` and writes it into `store`
  with put(dst, src)."""
  if store.perm is None:
    return dataclasses.replace(store, main=jax.tree_util.tree_map(put, store.main, encoder(store.quantizer, x, mean)))
  if mean is not None:  # the channel split permutes channels per head: centre first
    x = x.astype(jnp.float32) - mean[:, :, None, :]
  main, out = split_channels(x, store.perm, n_out)
  new_main = jax.tree_util.tree_map(put, store.main, encoder(store.quantizer, main, None))
  new_out = jax.tree_util.tree_map(put, store.outlier, encoder(store.outlier_quantizer, out, None))
  return dataclasses.replace(store, main=new_main, outlier=new_out)


def _write(
    cache: KVCache, k: jax.Array, v: jax.Array, start: jax.Array, count: jax.Array, encoder=encode_tokens,
    prefix: bool = False,
) -> KVCache:
  """Writes tokens t < count[b] of k, v [B, K, T, H] at slots start[b] + t; past capacity is dropped.
  prefix: start is 0 for every sequence (prefill), so the tokens go to slots 0 .. T − 1 in place."""
  pos, ok, put = token_writer(start, count, k.shape[2], cache.capacity, prefix)
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


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def valid_count(counts, t: int, b: int, op: str, name: str) -> jax.Array:
  """counts [B] of real tokens among T (None: all T) → int32 [B].

  Concrete counts outside [0, T] raise ValueError naming them; traced ones (under jit) are
  clipped to [0, T] at run time, since only run-time values can tell.
  """
  if counts is None:
    return jnp.full((b,), t, jnp.int32)
  counts = jnp.asarray(counts)
  if counts.shape != (b,) or not jnp.issubdtype(counts.dtype, jnp.integer):
    raise ValueError(f"{op}: {name} must be integers of shape [{b}], got {name}.dtype={counts.dtype} {name}.shape={counts.shape}")
  if _is_concrete(counts) and (np.any(np.asarray(counts) < 0) or np.any(np.asarray(counts) > t)):
    raise ValueError(f"{op}: {name} must lie in [0, T={t}] (T = tokens given), got {name}={np.asarray(counts).tolist()}")
  return jnp.clip(counts.astype(jnp.int32), 0, t)


def _masked_mean(x: jax.Array, count: jax.Array) -> jax.Array:
  """Mean over tokens t < count[b] of x [B, K, T, H] → [B, K, H] (0 where count is 0); the other
  tokens are never read into it (NaN padding included)."""
  m = (jnp.arange(x.shape[2])[None, :] < count[:, None])[:, None, :, None]
  return jnp.sum(jnp.where(m, x, 0.0), axis=2) / jnp.maximum(count, 1).astype(jnp.float32)[:, None, None]


def outlier_perm(mean_squares: jax.Array, n_out: int) -> jax.Array:
  """Channel permutation [B, K, H] from per-channel mean squares [B, K, H] over the real tokens:
  the n_out largest channels first (in increasing channel order), then the rest in order."""
  h = mean_squares.shape[-1]
  top = jax.lax.top_k(mean_squares, n_out)[1].astype(jnp.int32)
  is_out = jnp.any(jnp.arange(h)[None, None, :, None] == top[:, :, None, :], axis=-1)
  rest = jnp.argsort(is_out, axis=-1, stable=True).astype(jnp.int32)[..., : h - n_out]
  return jnp.concatenate([jnp.sort(top, axis=-1), rest], axis=-1)


def prefill_with_encoder(
    cache: KVCache, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, *, encoder=encode_tokens,
    key_mean: jax.Array | None = None,
) -> KVCache:
  """Starts every sequence afresh with T prompt tokens k, v [B, K, T, H] (T ≤ capacity), each
  encoded with `encoder(tq, x, mean)` (the contract of `encode_tokens`, the XLA default; fused
  encode kernels come from `pallas_kernels.dispatch.prefill_encoder`). `tqjax.prefill` picks
  the encoder by `implementation`.

  lengths [B] (optional, in [0, T]): how many of the T tokens are real per sequence (right
  padding). The key mean (center_keys) and the outlier channels are found here from the real
  tokens; key_mean [B, K, H], if given, is used instead of the tokens' own (a sequence-sharded
  prefill passes the mean over all shards).
  """
  check_kv(cache, k, v, "prefill")
  b, t = cache.batch_size, k.shape[2]
  count = valid_count(lengths, t, b, "prefill", "lengths")
  new = cache
  if cache.key_mean is not None:
    mean = _masked_mean(k.astype(jnp.float32), count) if key_mean is None else key_mean.astype(jnp.float32)
    new = dataclasses.replace(new, key_mean=mean)
  if cache.config.outlier_channels:
    n = cache.config.outlier_channels
    kf = k.astype(jnp.float32)
    k_c = kf - new.key_mean[:, :, None, :] if new.key_mean is not None else kf
    new = dataclasses.replace(
        new,
        k=dataclasses.replace(new.k, perm=outlier_perm(_masked_mean(jnp.square(k_c), count), n)),
        v=dataclasses.replace(new.v, perm=outlier_perm(_masked_mean(jnp.square(v.astype(jnp.float32)), count), n)),
    )
  return _write(new, k, v, jnp.zeros((b,), jnp.int32), count, encoder, prefix=True)


def check_capacity(end: jax.Array, capacity: int) -> None:
  """Raises ValueError naming the sequences whose end = lengths + new tokens [B] exceeds the
  capacity, when `end` is concrete (outside jit); traced ends pass (see `append_checked`)."""
  if _is_concrete(end) and np.any(np.asarray(end) > capacity):
    over = np.flatnonzero(np.asarray(end) > capacity).tolist()
    raise ValueError(
        f"append past capacity={capacity}: lengths + new tokens = {np.asarray(end).tolist()} (sequences {over})"
    )


def _append(cache: KVCache, k: jax.Array, v: jax.Array, num_new) -> tuple[KVCache, jax.Array]:
  """Validated append: (new cache, the end lengths + count [B] before saturation)."""
  check_kv(cache, k, v, "append")
  count = valid_count(num_new, k.shape[2], cache.batch_size, "append", "num_new")
  return _write(cache, k, v, cache.lengths, count), cache.lengths + count


def append(cache: KVCache, k: jax.Array, v: jax.Array, num_new: jax.Array | None = None) -> KVCache:
  """Appends tokens k, v [B, K, T, H] at each sequence's own position (its current length).

  num_new [B] (optional, in [0, T]): how many of the T tokens are real per sequence.
  Past the capacity: with concrete lengths (outside jit) a ValueError names the overflowing
  sequences; under jit, where only run-time values can tell, the tokens past the capacity are
  dropped and `lengths` saturates at the capacity — use `append_checked` to get an error there.
  """
  new, end = _append(cache, k, v, num_new)
  check_capacity(end, cache.capacity)
  return new


def append_checked(cache: KVCache, k: jax.Array, v: jax.Array, num_new: jax.Array | None = None):
  """`append` under `checkify`: returns (error, cache); `error.throw()` raises on overflow.

  Works under jit: `jax.jit(append_checked)(cache, k, v)`.
  """

  def checked(cache, k, v, num_new):
    new, end = _append(cache, k, v, num_new)
    checkify.check(
        jnp.all(end <= cache.capacity),
        "append past capacity: lengths + new tokens = {end} exceed capacity " + str(cache.capacity),
        end=end,
    )
    return new

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
