"""Flax attention over the KV caches: an NNX layer and its Linen form.

Owns `TurboQuantAttention` (q/k/v/o projections, GQA/MQA, optional QK-norm and RoPE, a
compressed or full-precision KV cache held in one `nnx.Cache` variable),
`TurboQuantAttentionLinen` (the same computation, cache in Linen's `'cache'` collection),
`linen_params_from_nnx`, and the pieces real decoders share with it: `RMSNorm` / `rms_norm`
(Gemma's (1 + w) form) and `apply_rope`.

Caches. `cache_config` picks the cache: a `tqjax.cache.CacheConfig` keeps TurboQuant codes
(`tqjax.cache` writes them, `tqjax.ops` reads them); a `tqjax.dense_cache.DenseCacheConfig`, or
None (the layer's dtype), keeps k and v uncompressed (`tqjax.dense_cache`, same operations and
signatures). `implementation` (None | "xla" | "pallas") goes to every cache operation that has a
choice: the prefill's encode and single- and multi-token decode attention.

Cache state. The whole cache pytree is the value of a single `nnx.Cache` variable. A Variable's
value may be any pytree: `nnx.jit` traces through it (mutations are written back), and
`nnx.split(model, nnx.Cache, ...)` yields a State whose leaves are the cache's arrays, so a
`lax.scan`/`while_loop` sampler carries it like any other carry. One variable keeps the cache's
static metadata (its config, quantizer configs) in the pytree structure, where the functional API
expects it. The quantizer constants (rotation, codebook, QJL sketch: a few KiB per layer) ride
along in the same state; `nbytes()` counts only what grows with tokens.

Modes. prefill: full-precision attention of the prompt over itself (causal or bidirectional,
padding from `lengths`; `tqjax.dense_cache.prompt_attention`), then the prompt is written into
the cache, starting every sequence afresh. decode: the new token(s) are appended at each
sequence's own length and attend over the cache (`attention` for one token, `chunked_attention`
for several). Without an initialized cache, prefill is a plain attention layer that stores nothing.

Shapes: B batch, T query tokens, S cache slots, N query heads, K kv heads, G query heads per kv
head (N = K·G), H head dim, D model width (in_features).

Imports flax at module top; `tqjax/__init__.py` does not import this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tqjax import cache as tqcache
from tqjax import dense_cache
from tqjax import ops as tq_ops
from tqjax.cache import CacheConfig, KVCache
from tqjax.dense_cache import DenseCacheConfig, DenseKVCache

__all__ = [
    "MODES",
    "rms_norm",
    "RMSNorm",
    "apply_rope",
    "TurboQuantAttention",
    "TurboQuantAttentionLinen",
    "linen_params_from_nnx",
]

MODES = ("prefill", "decode")

# The compressed cache's operations under the names `tqjax.dense_cache` gives the dense one's.
_COMPRESSED = types.SimpleNamespace(
    init_cache=tqcache.init_cache, prefill=tq_ops.prefill, append=tqcache.append, attention=tq_ops.attention,
    chunked_attention=tq_ops.chunked_attention, nbytes=tqcache.nbytes)


def _cache_ops(config_or_cache):
  """The module of operations for a cache (or its config): `tqjax.dense_cache` or the compressed ones."""
  return dense_cache if isinstance(config_or_cache, (DenseCacheConfig, DenseKVCache)) else _COMPRESSED


# ----------------------------------------------------------------------------- shared pieces


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Gemma's RMSNorm over the last axis: x / rms(x) · (1 + scale), statistics in float32.

  x [..., D], scale [D] → [..., D] in x's dtype (D the normalized width: the model's, or H for
  QK-norm). A checkpoint that stores the multiplier
  m = 1 + scale itself is loaded as scale = m − 1.
  """
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + jnp.float32(eps))
  return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class RMSNorm(nnx.Module):
  """`rms_norm` with a learned scale [D] (initialized to 0: the identity multiplier)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., D] → [..., D]."""
    return rms_norm(x, self.scale.get_value(), self.eps)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary embedding in the half-split layout (Gemma, Hugging Face Llama): channel i pairs with
  i + H/2 and turns by positions · base^(−2i/H). x [B, T, N, H] (H even), positions [B, T] →
  [B, T, N, H] in x's dtype."""
  h = x.shape[-1]
  inv_freq = 1.0 / (jnp.float32(base) ** (2.0 * jnp.arange(h // 2, dtype=jnp.float32) / h))
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- the computation


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static attention options shared by the NNX layer and the Linen wrapper."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  cache_config: CacheConfig | DenseCacheConfig
  rope_base: float | None
  causal: bool
  sliding_window: int | None
  soft_cap: float | None
  scale: float
  qk_norm: bool
  qk_norm_eps: float
  implementation: str | None


def _attend(spec: _Spec, cache, q, k, v, *, mode: str, lengths):
  """The layer's attention after projection (and QK-norm): q [B, T, N, H], k, v [B, T, K, H],
  before RoPE. cache: KVCache | DenseKVCache | None. → (out [B, T, N, H] in q's dtype, new cache)."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode=!r}")
  b, t = q.shape[:2]
  opts = dict(scale=spec.scale, soft_cap=spec.soft_cap, sliding_window=spec.sliding_window)
  if mode == "prefill":
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  else:
    if cache is None:
      raise ValueError("decode before init_cache: call init_cache(batch_size, capacity) first")
    if lengths is not None:
      raise ValueError("decode: lengths is only for ragged prefill; decode appends T tokens to every sequence")
    pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  if spec.rope_base is not None:
    q, k = apply_rope(q, pos, spec.rope_base), apply_rope(k, pos, spec.rope_base)
  qh, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, N, T, H], [B, K, T, H]

  if mode == "prefill":
    if cache is not None:
      cache = _cache_ops(cache).prefill(cache, kt, vt, lengths, implementation=spec.implementation)
    out = dense_cache.prompt_attention(qh, kt, vt, lengths, causal=spec.causal, **opts)
  else:
    ops = _cache_ops(cache)
    cache = ops.append(cache, kt, vt)
    if t == 1:  # causal or not, the newest token sees every cached position
      out = ops.attention(cache, qh[:, :, 0], implementation=spec.implementation, **opts)[:, :, None]
    else:
      out = ops.chunked_attention(cache, qh, causal=spec.causal, implementation=spec.implementation, **opts)
  return out.transpose(0, 2, 1, 3).astype(q.dtype), cache


def _new_cache(spec: _Spec, batch_size: int, capacity: int):
  cfg = spec.cache_config
  cache = _cache_ops(cfg).init_cache(cfg, batch_size, spec.num_kv_heads, capacity)
  # When this runs under jit (Linen init), the barrier stops XLA from constant-folding the
  # zero arrays through the first write's scatter into a literal of the cache's full size.
  return jax.lax.optimization_barrier(cache)


def _make_spec(num_heads, num_kv_heads, head_dim, in_features, cache_config, dtype, *, rope_base, causal,
               sliding_window, soft_cap, scale, qk_norm, qk_norm_eps, implementation) -> _Spec:
  for name, val in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{name} must be a positive integer, got {name}={val!r}")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
  if head_dim is None:
    if in_features is None or in_features % num_heads:
      raise ValueError(f"head_dim not given and in_features={in_features} is not divisible by num_heads={num_heads}")
    head_dim = in_features // num_heads
  if rope_base is not None and (isinstance(rope_base, bool) or not isinstance(rope_base, (int, float))
                                or not 1 < rope_base < math.inf):
    raise ValueError(f"rope_base must be a finite number > 1 or None (no RoPE), got {rope_base=}")
  if rope_base is not None and head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
  if cache_config is None:
    cache_config = DenseCacheConfig(head_dim, dtype)
  if not isinstance(cache_config, (CacheConfig, DenseCacheConfig)):
    raise TypeError(f"cache_config must be a CacheConfig, a DenseCacheConfig or None, got {type(cache_config).__name__}")
  if cache_config.head_dim != head_dim:
    raise ValueError(f"cache_config.head_dim={cache_config.head_dim} must equal the layer's head_dim={head_dim}")
  tq_ops.check_options(scale, soft_cap, sliding_window)
  if not isinstance(qk_norm_eps, (int, float)) or not qk_norm_eps > 0:
    raise ValueError(f"qk_norm_eps must be a positive number, got {qk_norm_eps=}")
  if implementation not in tq_ops.IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} must be one of {tq_ops.IMPLEMENTATIONS}")
  return _Spec(int(num_heads), int(num_kv_heads), int(head_dim), cache_config,
               None if rope_base is None else float(rope_base), bool(causal), sliding_window, soft_cap,
               float(1.0 / math.sqrt(head_dim) if scale is None else scale), bool(qk_norm), float(qk_norm_eps),
               implementation)


# ----------------------------------------------------------------------------- NNX layer


class TurboQuantAttention(nnx.Module):
  """Self-attention with a TurboQuant-compressed (or full-precision) KV cache.

  x [B, T, D] → [B, T, out_features]. num_heads query heads share num_kv_heads key/value heads
  (GQA; 1 is MQA). Per head, q and k are optionally RMS-normalized (qk_norm) and then rotated
  (RoPE at positions 0 .. T − 1 for prefill, lengths[b] + t for decode) before k is cached.

      layer = TurboQuantAttention(256, 8, 2, 64, cache_config=CacheConfig(head_dim=64),
                                  rope_base=10000.0, rngs=nnx.Rngs(0))
      layer.init_cache(batch_size=4, capacity=512)
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
      cache_config: CacheConfig | DenseCacheConfig | None = None,
      rope_base: float | None = None,
      causal: bool = True,
      sliding_window: int | None = None,
      soft_cap: float | None = None,
      scale: float | None = None,
      qk_norm: bool = False,
      qk_norm_eps: float = 1e-6,
      qkv_bias: bool = False,
      out_bias: bool = False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      precision=None,
      implementation: str | None = None,
      kernel_init=nnx.initializers.lecun_normal(),
      rngs: nnx.Rngs,
  ):
    """in_features D; head_dim H (default D / num_heads); out_features (default D).

    cache_config: a CacheConfig (compressed), a DenseCacheConfig, or None (dense, in `dtype`).
    rope_base: RoPE's base θ (e.g. 1e4, 1e5, 1e6), None for no RoPE. causal=False attends
    bidirectionally. sliding_window: attend only the last W positions (the query's own included).
    soft_cap: cap·tanh(logit/cap) on logits. scale: logit scale, default 1/√H (Gemma 3:
    query_pre_attn_scalar^−½). qk_norm: RMSNorm (1 + w, over H, shared by heads) on q and k
    before RoPE, params `q_norm.scale`, `k_norm.scale` [H]. implementation: None | "xla" |
    "pallas" for the cache's prefill encode and decode attention.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    self.spec = _make_spec(num_heads, num_kv_heads, head_dim, in_features, cache_config, dtype, rope_base=rope_base,
                           causal=causal, sliding_window=sliding_window, soft_cap=soft_cap, scale=scale,
                           qk_norm=qk_norm, qk_norm_eps=qk_norm_eps, implementation=implementation)
    n, k, h = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim
    self.in_features = in_features
    self.out_features = in_features if out_features is None else out_features
    lin = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, precision=precision,
                            kernel_init=kernel_init, rngs=rngs)
    self.q_proj = lin(in_features, n * h, use_bias=qkv_bias)
    self.k_proj = lin(in_features, k * h, use_bias=qkv_bias)
    self.v_proj = lin(in_features, k * h, use_bias=qkv_bias)
    self.o_proj = lin(n * h, self.out_features, use_bias=out_bias)
    norm = lambda: RMSNorm(h, eps=qk_norm_eps, param_dtype=param_dtype) if qk_norm else None
    self.q_norm, self.k_norm = nnx.data(norm()), nnx.data(norm())
    self.kv_cache = nnx.data(None)  # an nnx.Cache holding the cache pytree after init_cache

  num_heads = property(lambda self: self.spec.num_heads)
  num_kv_heads = property(lambda self: self.spec.num_kv_heads)
  head_dim = property(lambda self: self.spec.head_dim)
  cache_config = property(lambda self: self.spec.cache_config)
  implementation = property(lambda self: self.spec.implementation)

  def init_cache(self, batch_size: int, capacity: int) -> None:
    """Allocates an empty cache (all lengths 0) for batch_size sequences of up to capacity tokens."""
    self.kv_cache = nnx.Cache(_new_cache(self.spec, batch_size, capacity))

  @property
  def cache(self) -> KVCache | DenseKVCache | None:
    """The cache pytree, or None before init_cache."""
    return None if self.kv_cache is None else self.kv_cache.get_value()

  @property
  def lengths(self) -> jax.Array | None:
    """Tokens cached per sequence, int32 [B] (None before init_cache)."""
    c = self.cache
    return None if c is None else c.lengths

  def nbytes(self) -> int:
    """Resident bytes of the per-token / per-sequence cache arrays (quantizer constants excluded)."""
    c = self.cache
    return 0 if c is None else _cache_ops(c).nbytes(c)

  def project(self, x: jax.Array):
    """x [B, T, D] → q [B, T, N, H], k, v [B, T, K, H] (QK-norm applied, RoPE not)."""
    b, t, _ = x.shape
    n, k, h = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim
    q, kk, v = (self.q_proj(x).reshape(b, t, n, h), self.k_proj(x).reshape(b, t, k, h),
                self.v_proj(x).reshape(b, t, k, h))
    if self.q_norm is not None:
      q, kk = self.q_norm(q), self.k_norm(kk)
    return q, kk, v

  def __call__(self, x: jax.Array, *, mode: str = "prefill", lengths: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] → [B, T, out_features].

    mode="prefill": attention over the prompt in full precision; writes it into the cache (if
      initialized), restarting every sequence. lengths [B] (optional, in [0, T]): real tokens
      per sequence (right padding); padding keys are not attended and not cached.
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
      q_norm=None,
      k_norm=None,
      num_heads: int | None = None,
      num_kv_heads: int | None = None,
      cache_config: CacheConfig | DenseCacheConfig | None = None,
      **kwargs,
  ) -> TurboQuantAttention:
    """A layer with the given projections (no retraining, no random init).

    wq [D, N, H] or [D, N·H]; wk, wv [D, K, H] or [D, K·H]; wo [N, H, out] or [N·H, out]
    (inputs multiply on the left: q = x @ wq). Biases (optional) match the outputs: bq [N, H]
    or [N·H], bk, bv [K, H] or [K·H], bo [out]. q_norm, k_norm [H] (optional, both or neither):
    QK-norm scales in `rms_norm`'s (1 + scale) form; giving them turns qk_norm on. With 2-D
    weights num_heads is required (num_kv_heads defaults to num_heads). kwargs go to the
    constructor (rope_base, causal, sliding_window, ...).
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
                         f"(D={in_features}, N={num_heads}, K={num_kv_heads}, H={head_dim})")
    if (bq is None) != (bk is None) or (bq is None) != (bv is None):
      raise ValueError("give all of bq, bk, bv or none of them")
    if (q_norm is None) != (k_norm is None):
      raise ValueError("give both q_norm and k_norm or neither")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
      if w is not None and jnp.shape(w) != (head_dim,):
        raise ValueError(f"{name} must be [H={head_dim}], got {name}.shape={jnp.shape(w)}")
    if q_norm is not None:
      kwargs["qk_norm"] = True
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
    if layer.q_norm is not None:
      q_norm = jnp.zeros((head_dim,)) if q_norm is None else q_norm
      k_norm = jnp.zeros((head_dim,)) if k_norm is None else k_norm
      put(layer.q_norm.scale, q_norm)
      put(layer.k_norm.scale, k_norm)
    return layer

  @classmethod
  def from_multihead_attention(
      cls, mha: nnx.MultiHeadAttention, cache_config: CacheConfig | DenseCacheConfig | None = None, **kwargs
  ) -> TurboQuantAttention:
    """A layer computing what `mha` computes (self-attention), with its q/k/v/o weights copied.

    nnx.MultiHeadAttention attends bidirectionally unless given a mask: pass causal=False to
    reproduce `mha(x)`, causal=True (the default) to reproduce `mha(x, mask=nnx.make_causal_mask(...))`.
    Unsupported: normalize_qk (a LayerNorm, not this layer's RMSNorm), and cross-attention.
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


class _RMSNormLinen(nn.Module):
  eps: float
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    return rms_norm(x, self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype), self.eps)


class TurboQuantAttentionLinen(nn.Module):
  """Linen form of `TurboQuantAttention`: same parameters (q_proj/k_proj/v_proj/o_proj, each
  {'kernel', 'bias'}; q_norm/k_norm {'scale'} with qk_norm), same options, same computation,
  cache in the `'cache'` collection under 'kv'.

  x [B, T, D] → [B, T, out_features]. The cache is created on the first call (typically
  `init`), for the call's batch size and `capacity` slots (default: the call's T). Thereafter
  use `apply(variables, x, mode=..., mutable=['cache'])`. A prefill whose 'cache' collection is
  not mutable computes attention without storing anything; decode needs it mutable.
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  cache_config: CacheConfig | DenseCacheConfig | None = None
  capacity: int | None = None
  rope_base: float | None = None
  causal: bool = True
  sliding_window: int | None = None
  soft_cap: float | None = None
  scale: float | None = None
  qk_norm: bool = False
  qk_norm_eps: float = 1e-6
  qkv_bias: bool = False
  out_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, mode: str = "prefill", lengths: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] → [B, T, out_features]; mode and lengths as in `TurboQuantAttention.__call__`."""
    if mode == "decode" and not self.has_variable("cache", "kv"):
      raise ValueError("decode before init_cache: the 'cache' collection is empty; run a first call "
                       "(model.init or a prefill with mutable=['cache']) to create it")
    b, t, d = x.shape
    kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    spec = _make_spec(self.num_heads, kv_heads, self.head_dim, d, self.cache_config, self.dtype,
                      rope_base=self.rope_base, causal=self.causal, sliding_window=self.sliding_window,
                      soft_cap=self.soft_cap, scale=self.scale, qk_norm=self.qk_norm, qk_norm_eps=self.qk_norm_eps,
                      implementation=self.implementation)
    n, k, h = spec.num_heads, spec.num_kv_heads, spec.head_dim
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                              kernel_init=nn.initializers.lecun_normal())
    q = dense(n * h, use_bias=self.qkv_bias, name="q_proj")(x).reshape(b, t, n, h)
    kk = dense(k * h, use_bias=self.qkv_bias, name="k_proj")(x).reshape(b, t, k, h)
    v = dense(k * h, use_bias=self.qkv_bias, name="v_proj")(x).reshape(b, t, k, h)
    if spec.qk_norm:
      q = _RMSNormLinen(spec.qk_norm_eps, self.param_dtype, name="q_norm")(q)
      kk = _RMSNormLinen(spec.qk_norm_eps, self.param_dtype, name="k_norm")(kk)

    if mode == "decode" and not self.is_mutable_collection("cache"):
      raise ValueError("decode needs a mutable cache: apply(..., mutable=['cache'])")
    cache = None
    if self.has_variable("cache", "kv") or self.is_mutable_collection("cache"):
      var = self.variable("cache", "kv", lambda: _new_cache(spec, b, self.capacity or t))
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

  params = {name: lin(getattr(layer, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
  if layer.q_norm is not None:
    params |= {"q_norm": {"scale": layer.q_norm.scale.get_value()}, "k_norm": {"scale": layer.k_norm.scale.get_value()}}
  return {"params": params}
