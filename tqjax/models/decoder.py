"""Flax NNX decoder for GGUF models (SmolLM2 / llama, Gemma 3) over a compressed or dense KV cache.

Owns: `Decoder` (weights as nnx.Params, layers stacked and run under `jax.lax.scan`), the jitted
`step` (prefill a fresh cache or append to it, then attend: one call serves prompt prefill,
teacher-forced chunks and single-token decode), `DenseCache` (the uncompressed reference cache,
bf16 by default, optionally passing k/v through a fake quantizer `transform` for baselines),
`init_caches`, and the sampler loop `generate` (greedy or temperature, ragged prompts).

Layers run in groups of `cfg.sliding_period` (1 for llama, 6 for Gemma 3: five local layers then
one global), scanned over the groups; each position in the group keeps its own stacked weights
and caches, so its sliding window and RoPE base are static.

Ragged batches are right-padded: `num_new` [B] says how many of the T tokens are real. The
compressed cache's chunked attention places query t at position lengths − T + t, so each
sequence's queries are rolled right by T − num_new before attending (and back after): every
real query then sits at its own position; the rolled-in pad queries are discarded.

Einsum letters: B batch, T query tokens, S cache slots, N query heads, K kv heads, G = N/K,
H head dim, D width, F MLP width, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tqjax import CacheConfig, append, chunked_attention, init_cache, prefill
from tqjax.models.gguf import DecoderConfig, Weights

__all__ = ["Decoder", "DenseCache", "init_caches", "step", "generate", "cache_nbytes"]

_HIGHEST = jax.lax.Precision.HIGHEST
_FIELDS = ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down",
           "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


@functools.partial(jax.tree_util.register_dataclass, data_fields=("k", "v", "lengths"), meta_fields=("transform",))
@dataclasses.dataclass(frozen=True)
class DenseCache:
  """Uncompressed cache: k, v [B, K, S, H] (bf16 by default), lengths [B].

  transform: optional (k, v) -> (k̂, v̂) on [B, K, T, H] float32 applied to every written block
  (a fake quantizer for baseline comparisons: KIVI, int8, q4_0); None stores k, v as they are.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  transform: Callable | None = None


def _dense_write(cache: DenseCache, k, v, num_new) -> DenseCache:
  """Writes k, v [B, K, T, H] at each sequence's length; the first num_new [B] tokens count."""
  if cache.transform is not None:
    k, v = cache.transform(k.astype(jnp.float32), v.astype(jnp.float32))
  t, s = k.shape[2], cache.k.shape[2]
  slot = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
  ok = jnp.arange(t)[None, :] < num_new[:, None]
  slot = jnp.where(ok & (slot < s), slot, s)  # out of range: dropped

  def put(dst, src):
    return jax.vmap(lambda d, x, i: d.at[:, i].set(x.astype(d.dtype), mode="drop"))(dst, src, slot)

  return dataclasses.replace(cache, k=put(cache.k, k), v=put(cache.v, v),
                             lengths=jnp.minimum(cache.lengths + num_new, s))


def _dense_attention(cache: DenseCache, q, pos, *, scale, window):
  """q [B, N, T, H] at positions pos [B, T] over the cache → [B, N, T, H] float32."""
  b, n, t, h = q.shape
  kh = cache.k.shape[1]
  qg = q.reshape(b, kh, n // kh, t, h)
  s = jnp.einsum("bkgth,bksh->bkgts", qg, cache.k.astype(jnp.float32), precision=_HIGHEST) * jnp.float32(scale)
  slots = jnp.arange(cache.k.shape[2])[None, None, :]
  ok = (slots <= pos[:, :, None]) & (slots < cache.lengths[:, None, None])
  if window is not None:
    ok = ok & (slots > pos[:, :, None] - window)
  s = jnp.where(ok[:, None, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.float32(1e-30))
  o = jnp.einsum("bkgts,bksh->bkgth", p, cache.v.astype(jnp.float32), precision=_HIGHEST)
  return o.reshape(b, n, t, h)


def _roll_rows(x, shift, sign: int):
  """x [B, N, T, H]: row t of sequence b ← row (t − sign·shift[b]) mod T."""
  t = x.shape[2]
  idx = (jnp.arange(t)[None, :] - sign * shift[:, None]) % t  # [B, T]
  return jnp.take_along_axis(x, idx[:, None, :, None], axis=2)


def _rms(x, w, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + jnp.float32(eps)) * w


def _rope(x, pos, base: float):
  """x [B, N, T, H] at positions pos [B, T] (rotate-half convention)."""
  h = x.shape[-1]
  inv = jnp.asarray(1.0 / (base ** (np.arange(0, h, 2, dtype=np.float64) / h)), jnp.float32)
  ang = pos.astype(jnp.float32)[:, None, :, None] * inv  # [B, 1, T, H/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = x[..., : h // 2], x[..., h // 2 :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _mm(x, w):
  """x [..., in] @ w[out, in].T"""
  return jnp.einsum("...i,oi->...o", x, w, precision=_HIGHEST)


class _Layers(nnx.Module):
  """One position of the layer pattern: weights stacked over its L / period layers."""

  def __init__(self, layers, dtype):
    for name in _FIELDS:
      arrays = [getattr(lw, name) for lw in layers]
      if arrays[0] is not None:
        setattr(self, name, nnx.Param(jnp.asarray(np.stack(arrays), dtype)))

  def arrays(self) -> dict:
    return {name: getattr(self, name)[...] for name in _FIELDS if hasattr(self, name)}


class Decoder(nnx.Module):
  """A GGUF decoder (see the module docstring). `Decoder(cfg, weights)` from `gguf.load`."""

  def __init__(self, cfg: DecoderConfig, weights: Weights, dtype=jnp.float32):
    self.cfg = cfg
    self.embed = nnx.Param(jnp.asarray(weights.embed, dtype))
    self.final_norm = nnx.Param(jnp.asarray(weights.final_norm, dtype))
    p = cfg.sliding_period
    self.groups = nnx.List([_Layers(weights.layers[j::p], dtype) for j in range(p)])

  def _layer(self, j: int, w: dict, x, cache, pos, num_new, fresh: bool):
    """Layer at pattern position j: x [B, T, D] → x, cache."""
    cfg = self.cfg
    b, t, _ = x.shape
    n, kh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    window, base = cfg.window_of(j), cfg.rope_base_of(j)
    a = _rms(x, w["attn_norm"], cfg.norm_eps)
    q = _mm(a, w["q"]).reshape(b, t, n, h).transpose(0, 2, 1, 3)
    k = _mm(a, w["k"]).reshape(b, t, kh, h).transpose(0, 2, 1, 3)
    v = _mm(a, w["v"]).reshape(b, t, kh, h).transpose(0, 2, 1, 3)
    if cfg.qk_norm:
      q, k = _rms(q, w["q_norm"], cfg.norm_eps), _rms(k, w["k_norm"], cfg.norm_eps)
    q, k = _rope(q, pos, base), _rope(k, pos, base)
    if isinstance(cache, DenseCache):
      if fresh:
        cache = dataclasses.replace(cache, lengths=jnp.zeros_like(cache.lengths))
      cache = _dense_write(cache, k, v, num_new)
      o = _dense_attention(cache, q, pos, scale=cfg.scale, window=window)
    else:
      cache = prefill(cache, k, v, num_new) if fresh else append(cache, k, v, num_new)
      shift = t - num_new
      o = chunked_attention(cache, _roll_rows(q, shift, 1), scale=cfg.scale, soft_cap=cfg.attn_soft_cap,
                            sliding_window=window)
      o = _roll_rows(o.astype(jnp.float32), shift, -1)
    o = _mm(o.transpose(0, 2, 1, 3).reshape(b, t, n * h), w["o"])
    if cfg.post_norms:
      o = _rms(o, w["post_attn_norm"], cfg.norm_eps)
    x = x + o
    f = _rms(x, w["ffn_norm"], cfg.norm_eps)
    g = _mm(f, w["gate"])
    act = jax.nn.silu(g) if cfg.activation == "silu" else jax.nn.gelu(g, approximate=True)
    f = _mm(act * _mm(f, w["up"]), w["down"])
    if cfg.post_norms:
      f = _rms(f, w["post_ffn_norm"], cfg.norm_eps)
    return x + f, cache

  def __call__(self, tokens, caches: list, num_new=None, *, fresh: bool = False, last_only: bool = False):
    """tokens [B, T] int32 → (logits [B, T, V] float32, caches).

    caches: one per pattern position, each stacked over its layers (`init_caches`).
    fresh: start every sequence afresh (prefill; position 0), else append at the caches' lengths.
    num_new [B]: real tokens per row (right padding), default T.
    last_only: logits [B, 1, V] of each row's last real token only (sampling, passkey).
    """
    cfg = self.cfg
    b, t = tokens.shape
    num_new = jnp.full((b,), t, jnp.int32) if num_new is None else num_new.astype(jnp.int32)
    start = jnp.zeros((b,), jnp.int32) if fresh else caches[0].lengths[0]
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    x = self.embed[...][tokens] * jnp.float32(cfg.embed_scale)
    weights = [g.arrays() for g in self.groups]

    def body(x, xs):
      ws, cs = xs
      new = []
      for j, (w, c) in enumerate(zip(ws, cs)):
        x, c = self._layer(j, w, x, c, pos, num_new, fresh)
        new.append(c)
      return x, new

    x, caches = jax.lax.scan(body, x, (weights, list(caches)))
    if last_only:
      x = jnp.take_along_axis(x, (num_new - 1)[:, None, None], axis=1)
    logits = _mm(_rms(x, self.final_norm[...], cfg.norm_eps), self.embed[...])
    if cfg.final_soft_cap:
      logits = jnp.float32(cfg.final_soft_cap) * jnp.tanh(logits / jnp.float32(cfg.final_soft_cap))
    return logits, caches


step = nnx.jit(Decoder.__call__, static_argnames=("fresh", "last_only"))
step.__doc__ = "Jitted `Decoder.__call__(model, tokens, caches, num_new, fresh=..., last_only=...)`."


def init_caches(cfg: DecoderConfig, batch_size: int, capacity: int, cache_config: CacheConfig | None = None, *,
                dtype=jnp.bfloat16, transform: Callable | None = None) -> list:
  """Empty caches, one per pattern position, stacked over its layers: compressed when
  cache_config is given, else `DenseCache` in `dtype` (with an optional fake-quant transform)."""
  if cache_config is not None and cache_config.head_dim != cfg.head_dim:
    raise ValueError(f"cache_config.head_dim={cache_config.head_dim} != model head_dim={cfg.head_dim}")
  n = cfg.num_layers // cfg.sliding_period
  if cache_config is None:
    z = jnp.zeros((n, batch_size, cfg.num_kv_heads, capacity, cfg.head_dim), dtype)
    one = DenseCache(z, z, jnp.zeros((n, batch_size), jnp.int32), transform)
    return [one for _ in range(cfg.sliding_period)]
  c = init_cache(cache_config, batch_size, cfg.num_kv_heads, capacity)
  stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), c)
  return [stacked for _ in range(cfg.sliding_period)]


def cache_nbytes(caches: list) -> int:
  """Bytes of every per-token array of the caches (k/v stores, windows), without constants."""
  total = 0
  for c in caches:
    if isinstance(c, DenseCache):
      total += c.k.nbytes + c.v.nbytes
    else:
      parts = [c.k.main, c.v.main, c.k.outlier, c.v.outlier, c.window_k, c.window_v]
      total += sum(a.nbytes for p in parts if p is not None for a in jax.tree.leaves(p))
  return total


def generate(model: Decoder, prompts: list[list[int]], max_new: int, cache_config: CacheConfig | None = None, *,
             temperature: float = 0.0, seed: int = 0, pad_to: int | None = None) -> list[list[int]]:
  """Samples max_new tokens after each prompt (ragged; greedy when temperature == 0), stopping a
  sequence at EOS. Returns the new tokens of each prompt. pad_to: pad prompts to this many
  tokens (default the longest), so that batches of other lengths reuse the compiled steps."""
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature=}")
  cfg = model.cfg
  b, t = len(prompts), max(len(p) for p in prompts)
  if pad_to is not None:
    if pad_to < t:
      raise ValueError(f"{pad_to=} is shorter than the longest prompt ({t} tokens)")
    t = pad_to
  tokens = np.zeros((b, t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  caches = init_caches(cfg, b, t + max_new, cache_config)
  logits, caches = step(model, jnp.asarray(tokens), caches, lengths, fresh=True, last_only=True)
  last = logits[:, 0]
  key = jax.random.key(seed)
  out, done = [], np.zeros(b, bool)
  for _ in range(max_new):
    if temperature == 0:
      nxt = jnp.argmax(last, axis=-1)
    else:
      key, sub = jax.random.split(key)
      nxt = jax.random.categorical(sub, last / jnp.float32(temperature), axis=-1)
    nxt = np.asarray(nxt, np.int32)
    out.append(np.where(done, -1, nxt))
    done |= nxt == cfg.eos_id
    if done.all():
      break
    logits, caches = step(model, jnp.asarray(nxt)[:, None], caches)
    last = logits[:, 0]
  seqs = np.stack(out, 1) if out else np.zeros((b, 0), np.int32)
  return [[int(x) for x in row if x >= 0] for row in seqs]
