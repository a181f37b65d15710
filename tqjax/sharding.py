"""A compressed KV cache split over a device mesh: by batch, by kv heads and by cache slots.

Owns `CacheLayout` (which mesh axes split the cache's leading dims [B, K, S]), the cache's
partition specs for a layout, and the sharded write and read paths — `prefill`, `append`,
`chunked_attention`, `attention` — each one `jax.shard_map` over the mesh:

  batch, kv heads   every device owns whole sequences / heads: the unsharded ops run on its
                    slice, with no communication.
  slots (sequence)  device d of the `seq` axes owns slots [d·S/P, (d+1)·S/P) of every
                    sequence. Its partial (accs, m, l) over the attended slots it holds — the
                    reference partial or a fused kernel's, with positions offset by the shard's
                    start — merges with the others in one collective round (`merge_over_axis`:
                    pmax of m, then one psum of the rescaled l and accs, the merge of the
                    kernels' splits), then ÷ l and the un-rotation run once. Prefill writes each
                    device's slice and finds the key mean and outlier channels with psums;
                    `append` writes each token on the device that owns its slot. Per-sequence
                    data (lengths, key mean, channel permutations) and the full-precision window
                    ring are replicated over the `seq` axes, so windows span shard boundaries.

Shapes: B batch, N query heads, K kv heads (N = K·G), T tokens, S cache slots (all shards),
H head dim, W window, P devices along the `seq` axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tqjax import cache as C
from tqjax import ops, partials

__all__ = [
    "CacheLayout",
    "cache_specs",
    "shard_cache",
    "merge_over_axis",
    "prefill",
    "append",
    "chunked_attention",
    "attention",
]

_Axes = str | tuple[str, ...] | None


def _names(axes: _Axes) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """Which axes of `mesh` split the cache's leading dims [B, K, S]: `batch`, `heads` (kv heads;
  query heads follow their kv head) and `seq` (cache slots), each a mesh axis name, a tuple of
  names or None (not split). Axes not named replicate the cache."""

  mesh: jax.sharding.Mesh
  batch: _Axes = None
  heads: _Axes = None
  seq: _Axes = None

  def __post_init__(self):
    used = [a for axes in (self.batch, self.heads, self.seq) for a in _names(axes)]
    for a in used:
      if a not in self.mesh.axis_names:
        raise ValueError(f"mesh axis {a!r} is not in the mesh's axis_names={self.mesh.axis_names}")
    if len(set(used)) != len(used):
      raise ValueError(f"a mesh axis splits two dims: batch={self.batch!r} heads={self.heads!r} seq={self.seq!r}")

  def shards(self, axes: _Axes) -> int:
    """How many pieces `axes` (one of batch, heads, seq) cut their dim into."""
    return math.prod(self.mesh.shape[a] for a in _names(axes))

  @property
  def spec(self) -> P:
    """The PartitionSpec of a [B, K, S, ...] array (codes, norms)."""
    return P(self.batch, self.heads, self.seq)

  @property
  def head_spec(self) -> P:
    """The PartitionSpec of a [B, N or K, ...] array (queries, outputs, per-head data, new tokens)."""
    return P(self.batch, self.heads)


def _check_layout(cache: C.KVCache, layout: CacheLayout) -> None:
  for name, size, axes in (("batch_size", cache.batch_size, layout.batch),
                           ("num_kv_heads", cache.num_kv_heads, layout.heads),
                           ("capacity", cache.capacity, layout.seq)):
    n = layout.shards(axes)
    if size % n:
      raise ValueError(f"the cache's {name}={size} must be divisible by the {n} shards of mesh axes {axes!r}")


def cache_specs(cache: C.KVCache, layout: CacheLayout) -> C.KVCache:
  """The cache's PartitionSpecs under `layout`, a KVCache-shaped pytree (for shard_map's specs or
  NamedShardings): codes and norms [B, K, S, ...] split as `layout.spec`; lengths [B] over batch;
  key mean, channel permutations and the window ring over batch and heads (replicated over seq);
  the quantizers' constants replicated."""
  rep = lambda tree: jax.tree_util.tree_map(lambda _: P(), tree)
  tokens = lambda tree: jax.tree_util.tree_map(lambda _: layout.spec, tree)
  heads = lambda tree: jax.tree_util.tree_map(lambda _: layout.head_spec, tree)
  store = lambda s: C.Store(rep(s.quantizer), tokens(s.main), rep(s.outlier_quantizer), tokens(s.outlier), heads(s.perm))
  return C.KVCache(cache.config, store(cache.k), store(cache.v), P(layout.batch), heads(cache.key_mean),
                   heads(cache.window_k), heads(cache.window_v))


def shard_cache(cache: C.KVCache, layout: CacheLayout) -> C.KVCache:
  """`cache` placed on `layout.mesh` as `cache_specs` says (ValueError if a dim does not divide)."""
  _check_layout(cache, layout)
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(layout.mesh, s)), cache,
                                cache_specs(cache, layout))


def merge_over_axis(accs: tuple, m: jax.Array, l: jax.Array, axis: _Axes):
  """Merges per-device softmax partials over mesh `axis` inside shard_map: accs (tuple of
  UNnormalized [..., d]), running max m [...] and sum l [...] of each device → the same of the
  union of their slots, on every device. One round of two all-reduces: pmax of m, then one psum
  of l and accs (a tuple), each rescaled by exp(m − max); a device that attended nothing
  (m = −inf) contributes nothing."""
  m_all = jax.lax.pmax(m, axis)
  m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
  w = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
  l_all, accs_all = jax.lax.psum((l * w, tuple(a * w[..., None] for a in accs)), axis)
  return accs_all, m_all, l_all


def _shard_start(layout: CacheLayout, s_local: int) -> jax.Array:
  """Global slot of this device's first slot (inside shard_map)."""
  if layout.seq is None:
    return jnp.int32(0)
  return (jax.lax.axis_index(layout.seq) * s_local).astype(jnp.int32)


def _without_window(cache: C.KVCache) -> C.KVCache:
  """The cache with its full-precision window left out, for writes of the compressed stores only."""
  return dataclasses.replace(cache, config=dataclasses.replace(cache.config, window=0), window_k=None, window_v=None)


def _write_ring(buf: jax.Array, x: jax.Array, pos: jax.Array, ok: jax.Array, end: jax.Array, w: int) -> jax.Array:
  """The window ring buf [B, K, W, H] ← tokens x [B, K, T, H] at global positions pos [B, T] that
  are written (ok) and among the last W before end [B] (as `tqjax.cache.append` writes it)."""
  return C.scatter_tokens(buf, x.astype(buf.dtype), pos % w, ok & (pos >= end[:, None] - w))


def _global_mean(x: jax.Array, real: jax.Array, count: jax.Array, axis: _Axes) -> jax.Array:
  """Mean over the real tokens of every shard: x [B, K, T', H], real [B, T'] (this shard's),
  count [B] (all shards) → [B, K, H] (0 where count is 0)."""
  s = jnp.sum(jnp.where(real[:, None, :, None], x, 0.0), axis=2)
  if axis is not None:
    s = jax.lax.psum(s, axis)
  return s / jnp.maximum(count, 1).astype(jnp.float32)[:, None, None]


def _shard_map(layout: CacheLayout, fn, in_specs, out_specs, check_vma: bool = True):
  """shard_map over the layout's mesh. On a mesh of Explicit axes (jax's default) its arguments
  are first placed as in_specs say (`jax.reshard`; a no-op for arguments already placed so);
  shard_map moves them itself on a mesh of Auto axes."""
  mapped = jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
  if jax.sharding.AxisType.Explicit not in layout.mesh.axis_types:
    return mapped

  def run(*args):
    args = jax.tree_util.tree_map(lambda x, s: jax.reshard(x, NamedSharding(layout.mesh, s)), args, in_specs)
    return mapped(*args)

  return run


def _validate(op, *args) -> None:
  """Runs the unsharded op's trace-time checks (shapes, dtypes, options, concrete counts) on args'
  shapes alone: traced, never run, and blind to how the args are placed."""
  jax.eval_shape(op, *jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args))


def _count(counts, t: int, b: int) -> jax.Array:
  """counts [B] (validated by the unsharded op; None: all T) → int32 [B] clipped to [0, T]."""
  return jnp.full((b,), t, jnp.int32) if counts is None else jnp.clip(jnp.asarray(counts).astype(jnp.int32), 0, t)


def prefill(cache: C.KVCache, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None, *,
            layout: CacheLayout, encoder=C.encode_tokens, check_vma: bool | None = None) -> C.KVCache:
  """`tqjax.prefill` of the cache laid out as `layout`: T prompt tokens k, v [B, K, T, H]
  (T ≤ capacity; right padding past lengths [B]) start every sequence afresh.

  Under `seq` sharding the tokens are padded to the capacity and split like the slots, so each
  device encodes and writes only the tokens of its own slots; the key mean (center_keys) and the
  outlier channels come from psums of per-shard sums over the real tokens, and the window ring
  (replicated) from one psum of the per-shard rings. `encoder` as in
  `tqjax.cache.prefill_with_encoder` (a fused kernel from `pallas_kernels.dispatch.prefill_encoder`
  runs inside shard_map on each device's tokens). check_vma (default: on for the XLA encode, off
  for another encoder): see `chunked_attention`.
  """
  _check_layout(cache, layout)
  _validate(lambda cache, k, v: C.prefill_with_encoder(cache, k, v, lengths), cache, k, v)
  b, t, cap = cache.batch_size, k.shape[2], cache.capacity
  count = _count(lengths, t, b)
  cfg = cache.config
  seq = layout.seq
  if seq is not None:  # slot s holds token s: padded to the capacity, the token axis splits as the slots
    pad = [(0, 0), (0, 0), (0, cap - t), (0, 0)]
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)

  def body(cache, k, v, count):
    s_loc = cache.capacity
    s0 = _shard_start(layout, s_loc)
    pos = s0 + jnp.arange(k.shape[2], dtype=jnp.int32)[None, :]  # [1, T'] global slot = token index
    real = pos < count[:, None]
    new = cache
    if cfg.center_keys:
      new = dataclasses.replace(new, key_mean=_global_mean(k.astype(jnp.float32), real, count, seq))
    if cfg.outlier_channels:
      k_c = k.astype(jnp.float32) - new.key_mean[:, :, None, :] if cfg.center_keys else k.astype(jnp.float32)
      perm = lambda x: C.outlier_perm(_global_mean(jnp.square(x), real, count, seq), cfg.outlier_channels)
      new = dataclasses.replace(new, k=dataclasses.replace(new.k, perm=perm(k_c)),
                                v=dataclasses.replace(new.v, perm=perm(v.astype(jnp.float32))))
    local = _write_slice(new, k, v, jnp.clip(count - s0, 0, s_loc), encoder)
    out = dataclasses.replace(new, k=local.k, v=local.v, lengths=count)
    if cfg.window:  # each ring slot is written on at most one shard: a psum copies it exactly
      ring = lambda x: _write_ring(jnp.zeros_like(cache.window_k), x, pos, real, count, cfg.window)
      wk, wv = ring(k), ring(v)
      if seq is not None:
        wk, wv = jax.lax.psum((wk, wv), seq)
      hit = (partials.window_positions(out) >= 0)[..., None]  # [B, 1, W, 1]: slots that hold a token
      out = dataclasses.replace(out, window_k=jnp.where(hit, wk, cache.window_k),
                                window_v=jnp.where(hit, wv, cache.window_v))
    return out

  specs = cache_specs(cache, layout)
  check_vma = (encoder is C.encode_tokens) if check_vma is None else check_vma
  fn = _shard_map(layout, body, (specs, layout.spec, layout.spec, P(layout.batch)), specs, check_vma=check_vma)
  return fn(cache, k, v, count)


def _write_slice(cache: C.KVCache, k, v, count, encoder) -> C.KVCache:
  """Writes tokens t < count[b] of k, v [B, K, S/P, H] into slots 0 .. count[b] − 1 of this
  shard's compressed stores (inside shard_map), with the cache's key mean and channel
  permutations (found over all shards) rather than this shard's own."""
  local = _without_window(cache)
  if cache.config.outlier_channels:  # `append` centres and splits with the cache's mean and permutation
    if encoder is not C.encode_tokens:
      raise ValueError(f"outlier_channels={cache.config.outlier_channels}: the fused encode kernels have no channel split")
    return C.append(dataclasses.replace(local, lengths=jnp.zeros_like(count)), k, v, count)
  return C.prefill_with_encoder(local, k, v, count, encoder=encoder, key_mean=cache.key_mean)


def append(cache: C.KVCache, k: jax.Array, v: jax.Array, num_new: jax.Array | None = None, *,
           layout: CacheLayout) -> C.KVCache:
  """`tqjax.cache.append` of the cache laid out as `layout`: tokens k, v [B, K, T, H] (T ≤ the
  slots per `seq` shard; split over batch and heads, replicated over seq) go to each sequence's
  next slots lengths[b] + t, t < num_new[b] — each on the device that owns that slot, so an
  append may span two shards. The window ring (replicated) is written on every device. Tokens
  past the capacity are dropped and lengths saturate, as `append` does under jit.
  """
  _check_layout(cache, layout)
  _validate(lambda cache, k, v: C.append(cache, k, v, num_new), cache, k, v)
  b, t, cap = cache.batch_size, k.shape[2], cache.capacity
  if t > cap // layout.shards(layout.seq):
    raise ValueError(f"append: T={t} tokens exceed the {cap // layout.shards(layout.seq)} slots of one seq shard")
  count = _count(num_new, t, b)
  cfg = cache.config

  def body(cache, k, v, count):
    s_loc = cache.capacity
    s0 = _shard_start(layout, s_loc)
    start = cache.lengths
    # Tokens before this shard's first slot are skipped: the shard's first token is t = skip.
    skip = jnp.clip(s0 - start, 0, t)
    n_loc = jnp.clip(jnp.minimum(start + count, s0 + s_loc) - jnp.maximum(start, s0), 0, t)
    idx = jnp.minimum(jnp.arange(t, dtype=jnp.int32)[None, :] + skip[:, None], t - 1)[:, None, :, None]
    shift = lambda x: jnp.take_along_axis(x, jnp.broadcast_to(idx, x.shape), axis=2)
    local = dataclasses.replace(_without_window(cache), lengths=jnp.clip(start - s0, 0, s_loc))
    local = C.append(local, shift(k), shift(v), n_loc)
    out = dataclasses.replace(cache, k=local.k, v=local.v, lengths=jnp.minimum(start + count, cap).astype(jnp.int32))
    if cfg.window:
      pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      ok = (jnp.arange(t)[None, :] < count[:, None]) & (pos < cap)
      out = dataclasses.replace(out, window_k=_write_ring(cache.window_k, k, pos, ok, start + count, cfg.window),
                                window_v=_write_ring(cache.window_v, v, pos, ok, start + count, cfg.window))
    return out

  specs = cache_specs(cache, layout)
  fn = _shard_map(layout, body, (specs, layout.head_spec, layout.head_spec, P(layout.batch)), specs)
  return fn(cache, k, v, count)


def chunked_attention(cache: C.KVCache, q: jax.Array, *, layout: CacheLayout, scale: float | None = None,
                      soft_cap: float | None = None, sliding_window: int | None = None, causal: bool = True,
                      block_size: int = 1024, partial_fn=None, check_vma: bool | None = None) -> jax.Array:
  """`tqjax.ops.chunked_attention` of q [B, N, T, H] over the cache laid out as `layout` →
  [B, N, T, H], split over batch and heads as the cache, replicated over seq.

  partial_fn: the per-device partial (contract of `tqjax.partials.compressed_partial_reference`,
  the default with `block_size`), e.g. `pallas_kernels.dispatch.decode_partial_fn(cache, rows)`
  built for the local shard. check_vma (default: on for the reference, off for a partial_fn):
  shard_map's check of which mesh axes each value varies over needs every `pallas_call` to
  declare it on its out_shape; the Mosaic GPU kernels lower under check_vma=True, the Triton
  ones (decode and encode) are refused ("manual_axis_type on jax.ShapeDtypeStruct must not be
  None"), so it is off unless asked for. With it off, the merge's pmax/psum still make the
  output equal on every device of the seq axes, which is what the out_specs claim.
  """
  _check_layout(cache, layout)
  _validate(lambda cache, q: ops.chunked_attention(cache, q, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
                                                        causal=causal, implementation="xla"), cache, q)
  d = cache.config.head_dim
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  if partial_fn is None:
    partial_fn = functools.partial(partials.compressed_partial_reference, block_size=block_size)
    check_vma = True if check_vma is None else check_vma
  lo, hi = partials.query_ranges(cache, q.shape[2], sliding_window, causal)  # global slots [B, T]
  c_hi = partials.compressed_range(cache, hi)
  seq = layout.seq

  def body(cache, q, lo, hi, c_hi):
    b, hq, t, _ = q.shape
    qg = q.astype(jnp.float32).reshape(b, cache.num_kv_heads, hq // cache.num_kv_heads, t, d)
    pq = partials.prepare_query(cache, qg, scale)
    s_loc = cache.capacity
    s0 = _shard_start(layout, s_loc)
    accs, m, l = partial_fn(cache, pq, jnp.clip(lo - s0, 0, s_loc), jnp.clip(c_hi - s0, 0, s_loc), soft_cap)
    if seq is not None:
      accs, m, l = merge_over_axis(accs, m, l, seq)
    o = partials.finish_values(cache, accs, l)
    if cache.config.window:
      o2, m2, l2 = partials.window_partial(cache, qg * jnp.float32(scale), jnp.maximum(lo, c_hi), hi, soft_cap)
      o, _, _ = partials.merge_partials(o, m, l, o2, m2, l2)
    return o.reshape(b, hq, t, d).astype(q.dtype)

  ranges = P(layout.batch)
  fn = _shard_map(layout, body, (cache_specs(cache, layout), layout.head_spec, ranges, ranges, ranges),
                  layout.head_spec, check_vma=bool(check_vma))
  return fn(cache, q, lo, hi, c_hi)


def attention(cache: C.KVCache, q: jax.Array, *, layout: CacheLayout, scale: float | None = None,
              soft_cap: float | None = None, sliding_window: int | None = None, partial_fn=None,
              check_vma: bool | None = None) -> jax.Array:
  """`tqjax.ops.attention` (one query per sequence, q [B, N, H] → [B, N, H]) over the cache laid
  out as `layout`; partial_fn and check_vma as in `chunked_attention`."""
  _validate(lambda cache, q: ops.attention(cache, q, implementation="xla"), cache, q)
  o = chunked_attention(cache, q[:, :, None, :], layout=layout, scale=scale, soft_cap=soft_cap,
                        sliding_window=sliding_window, partial_fn=partial_fn, check_vma=check_vma)
  return o[:, :, 0]
