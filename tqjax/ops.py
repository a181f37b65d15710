"""The public entry points over the cache: attention (the read path) and prefill (the encode it picks).

`attention` (one query per sequence) and `chunked_attention` (T queries, the last T tokens
written) validate the query once, get a partial function — the plain-jnp reference
(`implementation="xla"`) or a fused kernel from `pallas_kernels.dispatch` ("pallas"; None picks
the kernel where one serves the cache on this backend, as `jax.nn.dot_product_attention`
does) — and run prepare → partial → finish (`tqjax.partials`), merging the exact partial of the
full-precision window. `prefill` picks the encoder the same way and writes the cache with
`tqjax.cache.prefill_with_encoder`. `scores` returns the logits attention normalizes.

Shapes: B batch, N query heads, K kv heads (N = K·G), T query tokens, S cache slots, H head dim.
An empty range (a sequence with nothing written, or a sliding window that covers no token)
attends to nothing: its output is zeros and, with return_residuals, its softmax sum is 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from tqjax import partials
from tqjax.cache import KVCache, prefill_with_encoder

__all__ = [
    "IMPLEMENTATIONS", "prefill", "attention", "chunked_attention", "scores", "check_implementation", "check_query",
    "check_options",
]

IMPLEMENTATIONS = (None, "xla", "pallas")


def check_implementation(implementation) -> None:
  """Raises ValueError unless implementation is one of IMPLEMENTATIONS."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} must be one of {IMPLEMENTATIONS}")


def check_query(cache: KVCache, q, op: str, with_tokens: bool) -> None:
  """q [B, N, H] (with_tokens=False) or [B, N, T, H]: floating point, shapes matching the cache."""
  d, b, kh = cache.config.head_dim, cache.batch_size, cache.num_kv_heads
  layout = f"[batch={b}, q_heads, tokens, head_dim={d}]" if with_tokens else f"[batch={b}, q_heads, head_dim={d}]"
  if not isinstance(q, (jax.Array, np.ndarray)):
    raise TypeError(f"{op}: q must be an array {layout}, got {type(q).__name__}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"{op}: q must be floating point, got q.dtype={q.dtype}")
  if q.ndim != (4 if with_tokens else 3) or q.shape[0] != b or q.shape[-1] != d:
    raise ValueError(f"{op}: q must be {layout}, got q.shape={q.shape}")
  if q.shape[1] % kh:
    raise ValueError(f"{op}: q_heads={q.shape[1]} must be a multiple of the cache's kv_heads={kh}")


def check_options(scale, soft_cap, sliding_window) -> None:
  """Raises ValueError naming scale (finite), soft_cap (positive, finite) or sliding_window
  (positive int) when one is bad; None passes for each."""
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
    raise ValueError(f"scale must be a finite number or None, got {scale=}")
  if soft_cap is not None and (
      isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float)) or not (0 < soft_cap < math.inf)
  ):
    raise ValueError(f"soft_cap must be a positive finite number or None, got {soft_cap=}")
  if sliding_window is not None and (
      isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
  ):
    raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window=}")


def _partial_fn(cache: KVCache, rows: int, implementation: str | None, block_size: int):
  """The partial for `implementation`, as a callable (cache, pq, lo, hi, soft_cap)."""
  if implementation is None:
    implementation = dispatch.default_implementation(cache)
  if implementation == "pallas":
    return dispatch.decode_partial_fn(cache, rows)
  return functools.partial(partials.compressed_partial_reference, block_size=block_size)


def _attend(cache: KVCache, q, *, scale, soft_cap, sliding_window, causal, partial_fn):
  """prepare → partial → finish (+ the window's exact partial) for validated q [B, N, T, H]:
  → (o [B, N, T, H] in q's dtype, m, l [B, N, T])."""
  b, hq, t, d = q.shape
  kh = cache.num_kv_heads
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, kh, hq // kh, t, d)
  lo, hi = partials.query_ranges(cache, t, sliding_window, causal)
  c_hi = partials.compressed_range(cache, hi)
  pq = partials.prepare_query(cache, qg, scale)
  accs, m, l = partial_fn(cache, pq, lo, c_hi, soft_cap)
  o = partials.finish_values(cache, accs, l)
  if cache.config.window:
    o2, m2, l2 = partials.window_partial(cache, qg * jnp.float32(scale), jnp.maximum(lo, c_hi), hi, soft_cap)
    o, m, l = partials.merge_partials(o, m, l, o2, m2, l2)
  return o.reshape(b, hq, t, d).astype(q.dtype), m.reshape(b, hq, t), l.reshape(b, hq, t)


def chunked_attention(
    cache: KVCache,
    q: jax.Array,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    implementation: str | None = None,
    block_size: int = 1024,
    return_residuals: bool = False,
    partial_fn=None,
):
  """Attention of T queries q [B, N, T, H] whose tokens were just written → [B, N, T, H].

  Query t sits at position lengths − T + t and attends to positions ≤ its own (and, with a
  sliding window, to the last `sliding_window` of those); causal=False lets every query see
  all `lengths` tokens (bidirectional encoders). N must be a multiple of the cache's kv heads
  (GQA/MQA). scale defaults to 1/√H; soft_cap applies cap·tanh(logit/cap).
  implementation: None (the fused kernel where one serves this cache on this backend, else
  "xla"), "xla" (the blocked reference, `block_size` slots per step) or "pallas" (the kernel;
  ValueError naming the reason where none serves). partial_fn, a callable with the contract of
  `tqjax.partials.compressed_partial_reference` (e.g. `pallas_kernels.dispatch.decode_partial_fn(
  cache, rows, interpret=True)`), replaces the choice. Returns the output in q's dtype and, with
  return_residuals, also the softmax max and sum [B, N, T] for merging with other partials.
  """
  check_implementation(implementation)
  check_query(cache, q, "chunked_attention", with_tokens=True)
  check_options(scale, soft_cap, sliding_window)
  if partial_fn is None:
    partial_fn = _partial_fn(cache, q.shape[1] // cache.num_kv_heads * q.shape[2], implementation, block_size)
  o, m, l = _attend(cache, q, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window, causal=causal,
                    partial_fn=partial_fn)
  return (o, m, l) if return_residuals else o


def attention(
    cache: KVCache,
    q: jax.Array,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    implementation: str | None = None,
    partial_fn=None,
) -> jax.Array:
  """Decode attention of one query per sequence, q [B, N, H], over the cache → [B, N, H].

  The query is the newest token (already appended): it sees positions < lengths[b]. scale
  defaults to 1/√H; soft_cap applies cap·tanh(logit/cap); sliding_window limits the span.
  implementation and partial_fn as in `chunked_attention`. A sequence with nothing written
  gets zeros.
  """
  check_implementation(implementation)
  check_query(cache, q, "attention", with_tokens=False)
  check_options(scale, soft_cap, sliding_window)
  if partial_fn is None:
    partial_fn = _partial_fn(cache, q.shape[1] // cache.num_kv_heads, implementation, 1024)
  o, _, _ = _attend(cache, q[:, :, None, :], scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
                    causal=True, partial_fn=partial_fn)
  return o[:, :, 0]


def scores(cache: KVCache, q: jax.Array, *, scale: float | None = None, soft_cap: float | None = None) -> jax.Array:
  """The (scaled, capped) logits that `attention` normalizes: q [B, N, H] against every slot →
  [B, N, S] float32, −inf past lengths. Tokens held in the full-precision window get their
  exact logits, as in `attention`; the others their compressed estimate."""
  check_query(cache, q, "scores", with_tokens=False)
  check_options(scale, soft_cap, None)
  b, hq, d = q.shape
  kh = cache.num_kv_heads
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, kh, hq // kh, 1, d)
  pq = partials.prepare_query(cache, qg, scale)
  logits = pq.offset[..., None]
  for tq, code, q_rot, sq in zip(
      (cache.k.quantizer, cache.k.outlier_quantizer), (cache.k.main, cache.k.outlier), pq.q, pq.sq
  ):
    logits = logits + partials.block_logits(tq, code, q_rot, sq)
  logits = partials.apply_soft_cap(logits, soft_cap)  # [B, K, G, 1, S]
  if cache.config.window:
    pos = partials.window_positions(cache)[:, 0]  # [B, W]
    hit = (pos[:, :, None] == jnp.arange(cache.capacity)[None, None, :]) & (pos[:, :, None] >= 0)  # [B, W, S]
    exact = partials.window_logits(cache, qg * jnp.float32(scale), soft_cap)  # [B, K, G, 1, W]
    from_window = jnp.einsum("bkgtw,bws->bkgts", exact, hit.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    logits = jnp.where(jnp.any(hit, axis=1)[:, None, None, None, :], from_window, logits)
  valid = jnp.arange(cache.capacity)[None, :] < cache.lengths[:, None]
  return jnp.where(valid[:, None, None], logits[:, :, :, 0], -jnp.inf).reshape(b, hq, cache.capacity)


def prefill(
    cache: KVCache,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> KVCache:
  """Starts every sequence afresh with T prompt tokens k, v [B, K, T, H] (T ≤ capacity).

  lengths [B] (optional, in [0, T]): how many of the T tokens are real per sequence (right
  padding; concrete values outside [0, T] raise). The key mean (center_keys) and the outlier
  channels are found here from the real tokens. implementation: None encodes with the fused
  Pallas kernel on GPU where it supports the quantizers (XLA for the rest) and with XLA
  elsewhere; "pallas" insists on the kernel for every encode (ValueError naming the reason if
  it can't); "xla" never uses it.
  """
  check_implementation(implementation)
  if implementation == "xla":
    return prefill_with_encoder(cache, k, v, lengths)
  dtypes = (jnp.result_type(k), jnp.result_type(v))
  if implementation is None and dispatch.default_prefill_implementation(cache, dtypes) == "xla":
    return prefill_with_encoder(cache, k, v, lengths)
  encoder = dispatch.prefill_encoder(cache, dtypes, xla_fallback=implementation is None)
  return prefill_with_encoder(cache, k, v, lengths, encoder=encoder)
