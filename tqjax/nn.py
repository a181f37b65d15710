"""Flax layers over the compressed KV cache: an NNX attention layer, a Linen wrapper, and a tiny
Gemma-style decoder for experiments.

Owns: `TurboQuantAttention` (q/k/v/o projections, GQA/MQA, optional RoPE, a compressed or
full-precision KV cache held in one `nnx.Cache` variable), `TurboQuantAttentionLinen` (the same
computation, cache in Linen's `'cache'` collection), `DenseKVCache` (the uncompressed cache with
the same interface, used when `cache_config=None`), and `GemmaStyleDecoder` (RMSNorm, RoPE, GQA,
gated MLP, tied embeddings, a greedy `generate` that compiles once).

Cache state. The whole cache pytree (`tqjax.cache.KVCache`, or `DenseKVCache`) is the value of a
single `nnx.Cache` variable. A Variable's value may be any pytree: `nnx.jit` traces through it
(mutations are written back), and `nnx.split(model, nnx.Cache, ...)` yields a State whose leaves
are the cache's arrays, so a `lax.scan`/`while_loop` sampler carries it like any other carry.
One variable keeps the cache's static metadata (CacheConfig, quantizer configs) in the pytree
structure, where the functional API expects it, rather than scattered over per-leaf variables.
The quantizer constants (rotation, codebook, QJL sketch: a few KiB per layer) ride along in
the same state; `nbytes()` counts only what grows with tokens (see `tqjax.cache.nbytes`).

Modes. prefill: full-precision attention over the fresh chunk (causal or bidirectional,
key-padding mask from `lengths`), then the chunk is written into the cache (starting every
sequence afresh). decode: the new token(s) are appended at each sequence's own length and
attend over the cache (`tqjax.cache.attention` for one token, `chunked_attention` for several).
Without an initialized cache, prefill is a plain attention layer that stores nothing.

Einsum letters (as in tqjax.cache): B batch, T query tokens, S cache slots / key tokens, N query
heads, K kv heads, G query heads per kv head, H head dim, D model dim.

Imports flax at module top; `tqjax/__init__.py` does not import this module.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tqjax import cache as tqcache
from tqjax import ops as tq_ops
from tqjax.cache import CacheConfig, KVCache

_HIGHEST = jax.lax.Precision.HIGHEST
MODES = ("prefill", "decode")

# Python side-effect counters, bumped while tracing (not while running): tests use them to
# check that a generation loop compiles once.
TRACE_COUNTS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- dense cache


@functools.partial(jax.tree_util.register_dataclass, data_fields=("k", "v", "lengths"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
  """An uncompressed cache with KVCache's layout: k, v [B, K, S, H], lengths int32 [B]."""

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def batch_size(self) -> int:
    return self.k.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.k.shape[1]

  @property
  def capacity(self) -> int:
    return self.k.shape[2]


def init_dense_cache(batch_size: int, num_kv_heads: int, capacity: int, head_dim: int, dtype) -> DenseKVCache:
  z = jnp.zeros((batch_size, num_kv_heads, capacity, head_dim), dtype)
  return DenseKVCache(z, z, jnp.zeros((batch_size,), jnp.int32))


def dense_nbytes(batch_size: int, num_kv_heads: int, capacity: int, head_dim: int, dtype=jnp.bfloat16) -> int:
  """Bytes of a full-precision k+v cache (plus int32 lengths), the baseline of compression ratios."""
  return 2 * batch_size * num_kv_heads * capacity * head_dim * jnp.dtype(dtype).itemsize + 4 * batch_size


def _dense_write(cache: DenseKVCache, k, v, start, count) -> DenseKVCache:
  """Writes tokens t < count[b] of k, v [B, K, T, H] at slots start[b] + t (past capacity dropped)."""
  t = k.shape[2]
  pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  ok = jnp.arange(t)[None, :] < count[:, None]  # [B, T]

  def put(dst, src):  # dst [B, K, S, H] ← src [B, K, T, H]
    return tqcache.scatter_tokens(dst, src.astype(dst.dtype), pos, ok)

  return DenseKVCache(put(cache.k, k), put(cache.v, v), jnp.minimum(start + count, cache.capacity).astype(jnp.int32))


def _count(lengths, t: int, b: int) -> jax.Array:
  if lengths is None:
    return jnp.full((b,), t, jnp.int32)
  return jnp.clip(jnp.asarray(lengths).astype(jnp.int32), 0, t)


def dense_prefill(cache: DenseKVCache, k, v, lengths=None) -> DenseKVCache:
  """Starts every sequence afresh with k, v [B, K, T, H]; lengths [B] real tokens (≤ T)."""
  fresh = DenseKVCache(jnp.zeros_like(cache.k), jnp.zeros_like(cache.v), jnp.zeros_like(cache.lengths))
  return _dense_write(fresh, k, v, jnp.zeros_like(cache.lengths), _count(lengths, k.shape[2], cache.batch_size))


def dense_append(cache: DenseKVCache, k, v) -> DenseKVCache:
  """Appends k, v [B, K, T, H] at each sequence's current length."""
  return _dense_write(cache, k, v, cache.lengths, _count(None, k.shape[2], cache.batch_size))


def _masked_attention(q, k, v, ok, *, scale: float, soft_cap: float | None):
  """Full-precision attention with an explicit mask (the one code path both for prefill and for
  decoding over a DenseKVCache, so that prefill + decode reproduces a full forward pass).

  q [B, K, G, T, H], k, v [B, K, S, H], ok bool broadcastable to [B, K, G, T, S]
  → [B, K, G, T, H] float32. A query with no visible key gets zeros.
  """
  logits = jnp.einsum("bkgth,bksh->bkgts", q.astype(jnp.float32), k.astype(jnp.float32), precision=_HIGHEST)
  logits = logits * jnp.float32(scale)
  if soft_cap is not None:
    logits = jnp.float32(soft_cap) * jnp.tanh(logits / jnp.float32(soft_cap))
  logits = jnp.where(ok, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkgts,bksh->bkgth", p, v.astype(jnp.float32), precision=_HIGHEST)
  return out / jnp.where(l > 0, l, 1.0)


def _visible(q_pos, k_pos, k_valid, *, causal: bool, sliding_window: int | None):
  """Mask [B, T, S]: key slot s visible to query t. q_pos [B, T], k_pos [S] or [B, S], k_valid [B, S].

  Same ranges as tqjax.cache's chunked attention: causal → k_pos ≤ q_pos; the sliding window
  keeps the last `sliding_window` positions up to the query (causal) or up to the last key.
  """
  k_pos = jnp.broadcast_to(k_pos, k_valid.shape)[:, None, :]
  ok = k_valid[:, None, :]
  if causal:
    ok = ok & (k_pos <= q_pos[:, :, None])
    hi = q_pos[:, :, None] + 1
  else:
    hi = jnp.max(jnp.where(k_valid, k_pos + 1, 0), axis=-1)[:, None, None]
  if sliding_window is not None:
    ok = ok & (k_pos >= hi - sliding_window)
  return ok


def _dense_cache_attention(cache: DenseKVCache, q, *, scale, soft_cap, sliding_window, causal):
  """q [B, N, T, H] of the T tokens just appended → [B, N, T, H] over the dense cache."""
  b, n, t, h = q.shape
  kh = cache.num_kv_heads
  qg = q.reshape(b, kh, n // kh, t, h)
  slots = jnp.arange(cache.capacity, dtype=jnp.int32)
  q_pos = cache.lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
  k_valid = slots[None, :] < cache.lengths[:, None]
  ok = _visible(q_pos, slots, k_valid, causal=causal, sliding_window=sliding_window)
  out = _masked_attention(qg, cache.k, cache.v, ok[:, None, None], scale=scale, soft_cap=soft_cap)
  return out.reshape(b, n, t, h).astype(q.dtype)


# ----------------------------------------------------------------------------- RoPE and the core


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary embedding (Gemma's half-split layout). x [B, T, N, H] (H even), positions [B, T]."""
  h = x.shape[-1]
  frac = 2.0 * jnp.arange(h // 2, dtype=jnp.float32) / h
  inv_freq = 1.0 / (jnp.float32(base) ** frac)
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static attention options shared by the NNX layer and the Linen wrapper."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_rope: bool
  rope_base: float
  causal: bool
  sliding_window: int | None
  soft_cap: float | None
  scale: float
  implementation: str | None


def _attend(spec: _Spec, cache, q, k, v, *, mode: str, lengths):
  """The layer's attention after projection. q [B, T, N, H], k, v [B, T, K, H] (pre-RoPE).

  cache: KVCache | DenseKVCache | None. Returns (out [B, T, N, H] in q's dtype, new cache).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode=!r}")
  b, t = q.shape[:2]
  kh, g = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads
  if cache is not None and cache.batch_size != b:
    raise ValueError(f"{mode}: batch size {b} differs from the cache's batch_size={cache.batch_size}")

  if mode == "prefill":
    if cache is not None and t > cache.capacity:
      raise ValueError(f"prefill: the prompt has {t} tokens, longer than the cache (max_length={cache.capacity})")
    if lengths is not None:
      lengths = jnp.asarray(lengths)
      if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"prefill: lengths must be integers of shape [{b}], got {lengths.dtype} {lengths.shape}")
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if spec.use_rope:
      q, k = apply_rope(q, pos, spec.rope_base), apply_rope(k, pos, spec.rope_base)
    count = _count(lengths, t, b)
    k_valid = pos < count[:, None]
    ok = _visible(pos, pos, k_valid, causal=spec.causal, sliding_window=spec.sliding_window)
    qg = q.transpose(0, 2, 1, 3).reshape(b, kh, g, t, spec.head_dim)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    out = _masked_attention(qg, kt, vt, ok[:, None, None], scale=spec.scale, soft_cap=spec.soft_cap)
    out = out.reshape(b, spec.num_heads, t, spec.head_dim).transpose(0, 2, 1, 3).astype(q.dtype)
    if cache is None:
      return out, None
    if isinstance(cache, DenseKVCache):
      return out, dense_prefill(cache, kt, vt, count)
    return out, tq_ops.prefill(cache, kt, vt, count)

  # decode
  if cache is None:
    raise ValueError("decode before init_cache: call init_cache(batch_size, max_length) first")
  if lengths is not None:
    raise ValueError("decode: lengths is only for ragged prefill; decode appends T tokens to every sequence")
  if t > cache.capacity:
    raise ValueError(f"decode: {t} new tokens exceed the cache (max_length={cache.capacity})")
  if _is_concrete(cache.lengths):  # inside jit the overflow cannot be seen; tokens past capacity are dropped
    end = int(np.max(np.asarray(cache.lengths))) + t
    if end > cache.capacity:
      raise ValueError(f"decode: sequence length {end} would exceed the cache (max_length={cache.capacity})")
  pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  if spec.use_rope:
    q, k = apply_rope(q, pos, spec.rope_base), apply_rope(k, pos, spec.rope_base)
  qh = q.transpose(0, 2, 1, 3)  # [B, N, T, H]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  opts = dict(scale=spec.scale, soft_cap=spec.soft_cap, sliding_window=spec.sliding_window)
  if isinstance(cache, DenseKVCache):
    cache = dense_append(cache, kt, vt)
    out = _dense_cache_attention(cache, qh, causal=spec.causal, **opts)
  else:
    cache = tqcache.append(cache, kt, vt)
    if t == 1 and spec.causal:
      out = tq_ops.attention(cache, qh[:, :, 0], implementation=spec.implementation, **opts)[:, :, None]
    else:
      out = tq_ops.chunked_attention(cache, qh, causal=spec.causal, **opts)
  return out.transpose(0, 2, 1, 3).astype(q.dtype), cache


def _new_cache(config: CacheConfig | None, batch_size, num_kv_heads, max_length, head_dim, dtype):
  for name, val in (("batch_size", batch_size), ("max_length", max_length)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{name} must be a positive integer, got {name}={val!r}")
  if config is None:
    cache = init_dense_cache(batch_size, num_kv_heads, max_length, head_dim, dtype)
  else:
    cache = tqcache.init_cache(config, batch_size, num_kv_heads, max_length)
  # When this runs under jit (Linen init), the barrier stops XLA from constant-folding the
  # zero arrays through the first write's scatter into a literal of the cache's full size.
  return jax.lax.optimization_barrier(cache)


def _cache_nbytes(cache) -> int:
  if cache is None:
    return 0
  if isinstance(cache, DenseKVCache):
    return sum(int(x.nbytes) for x in (cache.k, cache.v, cache.lengths))
  return tqcache.nbytes(cache)


def _make_spec(num_heads, num_kv_heads, head_dim, in_features, cache_config, *, use_rope, rope_base,
               causal, sliding_window, soft_cap, scale, implementation) -> _Spec:
  for name, val in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{name} must be a positive integer, got {name}={val!r}")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
  if head_dim is None:
    if in_features is None or in_features % num_heads:
      raise ValueError(f"head_dim not given and in_features={in_features} is not divisible by num_heads={num_heads}")
    head_dim = in_features // num_heads
  if use_rope and head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
  if cache_config is not None and cache_config.head_dim != head_dim:
    raise ValueError(f"cache_config.head_dim={cache_config.head_dim} must equal the layer's head_dim={head_dim}")
  if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window=}")
  if implementation not in tq_ops.IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} must be one of {tq_ops.IMPLEMENTATIONS}")
  return _Spec(int(num_heads), int(num_kv_heads), int(head_dim), bool(use_rope), float(rope_base), bool(causal),
               sliding_window, soft_cap, float(1.0 / math.sqrt(head_dim) if scale is None else scale), implementation)


# ----------------------------------------------------------------------------- NNX layer


class TurboQuantAttention(nnx.Module):
  """Self-attention with a TurboQuant-compressed (or, with cache_config=None, full-precision) KV cache.

  x [B, T, in_features] → [B, T, out_features]. Heads: num_heads query heads share
  num_kv_heads key/value heads (GQA; num_kv_heads=1 is MQA). RoPE (optional) is applied to
  q and k before k is cached, at positions 0..T−1 for prefill and lengths[b]+t for decode.

      layer = TurboQuantAttention(256, 8, 2, 64, cache_config=CacheConfig(head_dim=64), use_rope=True, rngs=nnx.Rngs(0))
      layer.init_cache(batch_size=4, max_length=512)
      y = layer(prompt, mode="prefill", lengths=prompt_lengths)   # [4, T, 256]
      y = layer(x_new, mode="decode")                             # [4, 1, 256]

  Under `nnx.jit` the cache is updated in place; in a `lax.scan`/`while_loop` carry the
  `nnx.split(model, nnx.Cache, ...)` state and `nnx.merge` it in the body.
  """

  def __init__(
      self,
      in_features: int,
      num_heads: int,
      num_kv_heads: int | None = None,
      head_dim: int | None = None,
      *,
      out_features: int | None = None,
      cache_config: CacheConfig | None = None,
      use_rope: bool = False,
      rope_base: float = 10000.0,
      causal: bool = True,
      sliding_window: int | None = None,
      soft_cap: float | None = None,
      scale: float | None = None,
      qkv_bias: bool = False,
      out_bias: bool = False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      cache_dtype=None,
      precision=None,
      implementation: str | None = None,
      kernel_init=nnx.initializers.lecun_normal(),
      rngs: nnx.Rngs,
  ):
    """cache_config: None keeps a full-precision cache (cache_dtype, default `dtype`).
    scale: logit scale, default 1/√head_dim. soft_cap: cap·tanh(logit/cap) on logits.
    implementation: None | "xla" | "pallas" for single-token decode over the compressed cache.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    self.spec = _make_spec(num_heads, num_kv_heads, head_dim, in_features, cache_config, use_rope=use_rope,
                           rope_base=rope_base, causal=causal, sliding_window=sliding_window,
                           soft_cap=soft_cap, scale=scale, implementation=implementation)
    n, k, h = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim
    self.in_features = in_features
    self.out_features = in_features if out_features is None else out_features
    self.cache_config = cache_config
    self.dtype = dtype
    self.cache_dtype = dtype if cache_dtype is None else cache_dtype
    lin = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, precision=precision,
                            kernel_init=kernel_init, rngs=rngs)
    self.q_proj = lin(in_features, n * h, use_bias=qkv_bias)
    self.k_proj = lin(in_features, k * h, use_bias=qkv_bias)
    self.v_proj = lin(in_features, k * h, use_bias=qkv_bias)
    self.o_proj = lin(n * h, self.out_features, use_bias=out_bias)
    self.kv_cache = nnx.data(None)  # an nnx.Cache holding the cache pytree after init_cache

  # -- convenience views of the static spec
  num_heads = property(lambda self: self.spec.num_heads)
  num_kv_heads = property(lambda self: self.spec.num_kv_heads)
  head_dim = property(lambda self: self.spec.head_dim)
  implementation = property(lambda self: self.spec.implementation)

  def init_cache(self, batch_size: int, max_length: int) -> None:
    """Allocates an empty cache (all lengths 0) for batch_size sequences of up to max_length tokens."""
    cache = _new_cache(self.cache_config, batch_size, self.spec.num_kv_heads, max_length, self.spec.head_dim,
                       self.cache_dtype)
    self.kv_cache = nnx.Cache(cache)

  @property
  def cache(self) -> KVCache | DenseKVCache | None:
    """The cache pytree (tqjax.cache.KVCache, DenseKVCache) or None before init_cache."""
    return None if self.kv_cache is None else self.kv_cache.get_value()

  @property
  def lengths(self) -> jax.Array | None:
    """Tokens cached per sequence, int32 [B] (None before init_cache)."""
    c = self.cache
    return None if c is None else c.lengths

  def nbytes(self) -> int:
    """Resident bytes of the per-token / per-sequence cache arrays (quantizer constants excluded)."""
    return _cache_nbytes(self.cache)

  def project(self, x: jax.Array):
    """x [B, T, in] → q [B, T, N, H], k, v [B, T, K, H] (before RoPE)."""
    b, t, _ = x.shape
    n, k, h = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim
    return (self.q_proj(x).reshape(b, t, n, h), self.k_proj(x).reshape(b, t, k, h),
            self.v_proj(x).reshape(b, t, k, h))

  def __call__(self, x: jax.Array, *, mode: str = "prefill", lengths: jax.Array | None = None) -> jax.Array:
    """x [B, T, in_features] → [B, T, out_features].

    mode="prefill": attention over the chunk in full precision; writes it into the cache (if
      initialized), restarting every sequence. lengths [B] (optional): real tokens per sequence
      (right padding); padded keys are masked and not cached.
    mode="decode": appends the T tokens at each sequence's length, attends over the cache.
    """
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [batch, tokens, in_features={self.in_features}], got x.shape={x.shape}")
    q, k, v = self.project(x)
    out, new_cache = _attend(self.spec, self.cache, q, k, v, mode=mode, lengths=lengths)
    if new_cache is not None:
      self.kv_cache.set_value(new_cache)
    b, t = x.shape[:2]
    return self.o_proj(out.reshape(b, t, self.spec.num_heads * self.spec.head_dim))

  # -- construction from existing weights

  @classmethod
  def from_weights(
      cls,
      wq: jax.Array,
      wk: jax.Array,
      wv: jax.Array,
      wo: jax.Array,
      *,
      bq=None,
      bk=None,
      bv=None,
      bo=None,
      num_heads: int | None = None,
      num_kv_heads: int | None = None,
      cache_config: CacheConfig | None = None,
      **kwargs,
  ) -> TurboQuantAttention:
    """A layer with the given projections (no retraining, no random init).

    wq [in, N, H] or [in, N·H]; wk, wv [in, K, H] or [in, K·H]; wo [N, H, out] or [N·H, out]
    (inputs multiply on the left: q = x @ wq). Biases (optional) match the outputs: bq [N, H]
    or [N·H], bk, bv [K, H] or [K·H], bo [out]. With 2-D weights num_heads is required
    (num_kv_heads defaults to num_heads). kwargs go to the constructor (use_rope, causal, ...).
    """
    wq, wk, wv, wo = (jnp.asarray(w) for w in (wq, wk, wv, wo))
    if wq.ndim == 3:
      num_heads = wq.shape[1] if num_heads is None else num_heads
      if wq.shape[1] != num_heads:
        raise ValueError(f"wq.shape={wq.shape} has {wq.shape[1]} heads, but num_heads={num_heads}")
    if num_heads is None:
      raise ValueError(f"num_heads is required with 2-D weights (wq.shape={wq.shape})")
    if num_kv_heads is None:
      num_kv_heads = wk.shape[1] if wk.ndim == 3 else num_heads
    in_features = wq.shape[0]
    flat_q = wq.reshape(in_features, -1)
    if flat_q.shape[1] % num_heads:
      raise ValueError(f"wq has {flat_q.shape[1]} outputs, not divisible by num_heads={num_heads}")
    head_dim = flat_q.shape[1] // num_heads
    flat_k, flat_v = wk.reshape(wk.shape[0], -1), wv.reshape(wv.shape[0], -1)
    flat_o = wo.reshape(-1, wo.shape[-1])
    want = {"wk": (in_features, num_kv_heads * head_dim), "wv": (in_features, num_kv_heads * head_dim),
            "wo": (num_heads * head_dim, flat_o.shape[1])}
    for name, w in (("wk", flat_k), ("wv", flat_v), ("wo", flat_o)):
      if w.shape != want[name]:
        raise ValueError(f"{name} flattens to {w.shape}, expected {want[name]} "
                         f"(in={in_features}, heads={num_heads}, kv_heads={num_kv_heads}, head_dim={head_dim})")
    if (bq is None) != (bk is None) or (bq is None) != (bv is None):
      raise ValueError("give all of bq, bk, bv or none of them")
    kwargs.setdefault("param_dtype", wq.dtype)
    kwargs.setdefault("dtype", wq.dtype)
    layer = nnx.eval_shape(lambda: cls(
        in_features, num_heads, num_kv_heads, head_dim, out_features=flat_o.shape[1], cache_config=cache_config,
        qkv_bias=bq is not None, out_bias=bo is not None, rngs=nnx.Rngs(0), **kwargs))

    def put(var: nnx.Variable, w):
      var.set_value(jnp.asarray(w, var.dtype).reshape(var.shape))

    for lin, w, bias in ((layer.q_proj, flat_q, bq), (layer.k_proj, flat_k, bk), (layer.v_proj, flat_v, bv),
                         (layer.o_proj, flat_o, bo)):
      put(lin.kernel, w)
      if bias is not None:
        put(lin.bias, bias)
    return layer

  @classmethod
  def from_multihead_attention(
      cls, mha: nnx.MultiHeadAttention, cache_config: CacheConfig | None = None, **kwargs
  ) -> TurboQuantAttention:
    """A layer computing what `mha` computes (self-attention), with its q/k/v/o weights copied.

    nnx.MultiHeadAttention attends bidirectionally unless given a mask: pass causal=False to
    reproduce `mha(x)`, causal=True (the default) to reproduce `mha(x, mask=nnx.make_causal_mask(...))`.
    Unsupported: normalize_qk, and cross-attention (in_kv_features ≠ in_features).
    """
    if mha.normalize_qk:
      raise NotImplementedError("from_multihead_attention: normalize_qk=True is not supported")
    if mha.in_kv_features != mha.in_features:
      raise ValueError(f"from_multihead_attention: cross-attention ({mha.in_kv_features=} != {mha.in_features=}) "
                       "is not supported")
    bias = (lambda lin: lin.bias.get_value()) if mha.use_bias else (lambda lin: None)
    kwargs.setdefault("precision", mha.precision)
    if mha.dtype is not None:
      kwargs.setdefault("dtype", mha.dtype)
    return cls.from_weights(
        mha.query.kernel.get_value(), mha.key.kernel.get_value(), mha.value.kernel.get_value(),
        mha.out.kernel.get_value(), bq=bias(mha.query), bk=bias(mha.key), bv=bias(mha.value), bo=bias(mha.out),
        num_heads=mha.num_heads, num_kv_heads=mha.num_kv_heads, cache_config=cache_config, **kwargs)


# ----------------------------------------------------------------------------- Linen wrapper


class TurboQuantAttentionLinen(nn.Module):
  """Linen form of `TurboQuantAttention`: same parameters (q_proj/k_proj/v_proj/o_proj, each
  {'kernel', 'bias'}), same computation, cache in the `'cache'` collection under 'kv'.

  The cache is created on the first call (typically `init`), for the call's batch size and
  `max_length` slots (default: the call's length). Thereafter use
  `apply(variables, x, mode=..., mutable=['cache'])`. A prefill whose 'cache' collection is not
  mutable computes attention without storing anything; decode needs it mutable.
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  cache_config: CacheConfig | None = None
  max_length: int | None = None
  use_rope: bool = False
  rope_base: float = 10000.0
  causal: bool = True
  sliding_window: int | None = None
  soft_cap: float | None = None
  scale: float | None = None
  qkv_bias: bool = False
  out_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  cache_dtype: Any = None
  precision: Any = None
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str = "prefill", lengths: jax.Array | None = None) -> jax.Array:
    if mode == "decode" and not self.has_variable("cache", "kv"):
      raise ValueError("decode before init_cache: the 'cache' collection is empty; run a first call "
                       "(model.init or a prefill with mutable=['cache']) to create it")
    b, t, d = x.shape
    kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    spec = _make_spec(self.num_heads, kv_heads, self.head_dim, d, self.cache_config, use_rope=self.use_rope,
                      rope_base=self.rope_base, causal=self.causal, sliding_window=self.sliding_window,
                      soft_cap=self.soft_cap, scale=self.scale, implementation=self.implementation)
    n, k, h = spec.num_heads, spec.num_kv_heads, spec.head_dim
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                              kernel_init=nn.initializers.lecun_normal())
    q = dense(n * h, use_bias=self.qkv_bias, name="q_proj")(x).reshape(b, t, n, h)
    kk = dense(k * h, use_bias=self.qkv_bias, name="k_proj")(x).reshape(b, t, k, h)
    v = dense(k * h, use_bias=self.qkv_bias, name="v_proj")(x).reshape(b, t, k, h)

    if mode == "decode" and not self.is_mutable_collection("cache"):
      raise ValueError("decode needs a mutable cache: apply(..., mutable=['cache'])")
    cache = None
    if self.has_variable("cache", "kv") or self.is_mutable_collection("cache"):
      cache_dtype = self.dtype if self.cache_dtype is None else self.cache_dtype
      var = self.variable("cache", "kv", lambda: _new_cache(self.cache_config, b, k, self.max_length or t, h,
                                                            cache_dtype))
      cache = var.value
    out, new_cache = _attend(spec, cache, q, kk, v, mode=mode, lengths=lengths)
    if new_cache is not None and self.is_mutable_collection("cache"):
      var.value = new_cache
    return dense(self.out_features or d, use_bias=self.out_bias, name="o_proj")(out.reshape(b, t, n * h))


def linen_params_from_nnx(layer: TurboQuantAttention) -> dict:
  """{'params': ...} for TurboQuantAttentionLinen holding `layer`'s weights."""
  def lin(m):
    d = {"kernel": m.kernel.get_value()}
    if m.bias is not None:
      d["bias"] = m.bias.get_value()
    return d

  return {"params": {name: lin(getattr(layer, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}}


# ----------------------------------------------------------------------------- Gemma-style decoder


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm: x / rms(x) · (1 + scale), statistics in float32, scale initialized to 0."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + jnp.float32(self.eps))
    return (y * (1.0 + self.scale.get_value().astype(jnp.float32))).astype(x.dtype)


class GatedMLP(nnx.Module):
  """down(gelu(gate(x)) · up(x)) (Gemma's GeGLU)."""

  def __init__(self, dim: int, hidden: int, *, dtype, precision, rngs: nnx.Rngs):
    lin = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                            precision=precision, rngs=rngs)
    self.gate, self.up, self.down = lin(dim, hidden), lin(dim, hidden), lin(hidden, dim)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, mlp_dim, *, cache_config, rope_base,
               sliding_window, soft_cap, dtype, precision, implementation, rngs):
    self.attn_norm = RMSNorm(embed_dim)
    self.attn = TurboQuantAttention(
        embed_dim, num_heads, num_kv_heads, head_dim, cache_config=cache_config, use_rope=True,
        rope_base=rope_base, causal=True, sliding_window=sliding_window, soft_cap=soft_cap, dtype=dtype,
        precision=precision, implementation=implementation, rngs=rngs)
    self.mlp_norm = RMSNorm(embed_dim)
    self.mlp = GatedMLP(embed_dim, mlp_dim, dtype=dtype, precision=precision, rngs=rngs)

  def __call__(self, x, *, mode, lengths=None):
    x = x + self.attn(self.attn_norm(x), mode=mode, lengths=lengths)
    return x + self.mlp(self.mlp_norm(x))


class GemmaStyleDecoder(nnx.Module):
  """A tiny Gemma-style causal LM: scaled tied embeddings, pre-RMSNorm blocks of RoPE GQA
  attention (TurboQuantAttention) and a GeGLU MLP, a final RMSNorm, logits = x · Eᵀ.

  `init_cache(B, S)`, then `prefill(tokens, lengths)` → next-token logits [B, V] and
  `decode_step(token)` → [B, V]; `generate(prompt, steps)` runs both under one jit with a
  `lax.scan` over the nnx.split cache state (compiled once per shape).
  """

  def __init__(
      self,
      vocab: int,
      num_layers: int = 4,
      embed_dim: int = 256,
      num_heads: int = 8,
      num_kv_heads: int = 2,
      head_dim: int = 64,
      cache_config: CacheConfig | None = None,
      *,
      mlp_dim: int | None = None,
      rope_base: float = 10000.0,
      sliding_window: int | None = None,
      soft_cap: float | None = None,
      final_logit_soft_cap: float | None = None,
      embed_init_std: float = 0.02,
      dtype=jnp.float32,
      precision=None,
      implementation: str | None = None,
      rngs: nnx.Rngs,
  ):
    """embed_init_std: the embedding table's init std. With Gemma's √embed_dim input scaling and
    tied output, a large std makes a random model predict its input token; 0.02 leaves the
    next-token choice to the attention/MLP stack, so random-weight generations depend on context.
    """
    self.vocab, self.embed_dim = vocab, embed_dim
    self.final_logit_soft_cap = final_logit_soft_cap
    self.dtype = dtype
    self.precision = precision
    self.embedder = nnx.Embed(vocab, embed_dim, param_dtype=jnp.float32, dtype=dtype,
                              embedding_init=nnx.initializers.normal(embed_init_std), rngs=rngs)
    self.layers = nnx.List([
        DecoderBlock(embed_dim, num_heads, num_kv_heads, head_dim, mlp_dim or 4 * embed_dim,
                     cache_config=cache_config, rope_base=rope_base, sliding_window=sliding_window,
                     soft_cap=soft_cap, dtype=dtype, precision=precision, implementation=implementation, rngs=rngs)
        for _ in range(num_layers)
    ])
    self.final_norm = RMSNorm(embed_dim)

  def init_cache(self, batch_size: int, max_length: int) -> None:
    for layer in self.layers:
      layer.attn.init_cache(batch_size, max_length)

  @property
  def cache_capacity(self) -> int | None:
    c = self.layers[0].attn.cache
    return None if c is None else c.capacity

  def nbytes(self) -> int:
    """Resident cache bytes of all layers."""
    return sum(layer.attn.nbytes() for layer in self.layers)

  def _logits(self, x):
    x = self.final_norm(x)
    logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32),
                        self.embedder.embedding.get_value().astype(jnp.float32), precision=_HIGHEST)
    if self.final_logit_soft_cap is not None:
      c = jnp.float32(self.final_logit_soft_cap)
      logits = c * jnp.tanh(logits / c)
    return logits

  def __call__(self, tokens: jax.Array, *, mode: str = "prefill", lengths=None) -> jax.Array:
    """tokens [B, T] int → logits [B, T, V] float32 (prefill writes the caches if initialized)."""
    x = self.embedder(tokens) * jnp.asarray(math.sqrt(self.embed_dim), self.dtype)
    for layer in self.layers:
      x = layer(x, mode=mode, lengths=lengths)
    return self._logits(x)

  def prefill(self, tokens: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Caches the prompt tokens [B, T] (lengths [B] real tokens) → next-token logits [B, V]."""
    if self.cache_capacity is None:
      raise ValueError("prefill before init_cache: call init_cache(batch_size, max_length) first")
    logits = self(tokens, mode="prefill", lengths=lengths)
    last = (jnp.full((tokens.shape[0],), tokens.shape[1]) if lengths is None else jnp.asarray(lengths)) - 1
    return jnp.take_along_axis(logits, last.astype(jnp.int32)[:, None, None], axis=1)[:, 0]

  def decode_step(self, token: jax.Array) -> jax.Array:
    """Appends token [B] to every sequence → next-token logits [B, V]."""
    return self(token[:, None], mode="decode")[:, 0]

  def generate(self, prompt: jax.Array, steps: int, lengths: jax.Array | None = None, *,
               forced_tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy generation of `steps` tokens after prompt [B, T] → (tokens [B, steps], logits [B, steps, V]).

    logits[:, i] predicts generated token i; tokens[:, i] is its argmax. forced_tokens
    [B, steps] (teacher forcing): feed forced_tokens[:, i] instead of tokens[:, i] as the next
    input, so two models can be compared on the same trajectory. Reuses the cache when it fits
    (batch, T + steps − 1 slots), else (re)allocates one; one compilation per shapes/config.
    """
    b, t = prompt.shape
    if steps < 1:
      raise ValueError(f"steps must be >= 1, got {steps=}")
    need = t + steps - 1
    cache = self.layers[0].attn.cache
    if cache is None or cache.batch_size != b or cache.capacity < need:
      self.init_cache(b, need)
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    if forced_tokens is not None and forced_tokens.shape != (b, steps):
      raise ValueError(f"forced_tokens must be [{b}, {steps}], got {forced_tokens.shape}")
    return _generate(self, prompt, lengths, forced_tokens, steps)


@functools.partial(nnx.jit, static_argnames=("steps",))
def _generate(model: GemmaStyleDecoder, prompt, lengths, forced, steps: int):
  TRACE_COUNTS["generate"] += 1
  logits0 = model.prefill(prompt, lengths)
  tok0 = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
  graphdef, cache_state, rest = nnx.split(model, nnx.Cache, ...)

  def body(carry, forced_prev):
    cache_state, prev = carry
    TRACE_COUNTS["generate_step"] += 1
    m = nnx.merge(graphdef, cache_state, rest)
    logits = m.decode_step(prev if forced_prev is None else forced_prev)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (nnx.state(m, nnx.Cache), tok), (tok, logits)

  xs = None if forced is None else forced[:, :-1].T.astype(jnp.int32)  # [steps − 1, B]
  (cache_state, _), (toks, logits) = jax.lax.scan(body, (cache_state, tok0), xs, length=steps - 1)
  nnx.update(model, cache_state)
  tokens = jnp.concatenate([tok0[:, None], toks.T], axis=1)
  logits = jnp.concatenate([logits0[:, None], jnp.moveaxis(logits, 0, 1)], axis=1)
  return tokens, logits
