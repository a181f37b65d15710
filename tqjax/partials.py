"""The kernel contract: a prepared query, the plain-jnp reference partial, and the softmax merge.

Decode attention over a compressed cache runs in three steps (`tqjax.ops` drives them):

  prepare   `prepare_query`: the query, scaled, split into the key stores' channel parts and
            rotated (Π·q), plus S·Π·q for prod keys and the key-centring offset q·μ. Paid once
            per query, never per cached token.
  partial   `compressed_partial_reference` (or a fused kernel with the same signature,
            `pallas_kernels`): an online softmax over the compressed slots [lo, hi) of each
            query, returning UNnormalized value accumulators in the value stores' rotated
            spaces and the running max and sum (acc, m, l).
  finish    `finish_values`: ÷ l, un-rotation (Πᵀ) once per query, the channel split undone;
            then `merge_partials` with the exact partial of the full-precision window.

Shapes: B batch, K kv heads, G query heads per kv head, T query tokens, S cache slots,
H head dim (d: one channel part's width).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tqjax.cache import KVCache, split_channels
from tqjax.qjl import project, signs as qjl_signs
from tqjax.quantizer import Code, Quantizer, codebook_direction
from tqjax.rotation import rotate, unrotate

__all__ = [
    "PreparedQuery",
    "prepare_query",
    "query_ranges",
    "compressed_range",
    "block_logits",
    "compressed_partial_reference",
    "finish_values",
    "window_positions",
    "window_logits",
    "window_partial",
    "merge_partials",
    "apply_soft_cap",
]

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.tree_util.register_dataclass, data_fields=("q", "sq", "offset"), meta_fields=())
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
  """q [B, K, G, T, H] (float32, unscaled) → rotated, scaled parts for the key stores."""
  qs = q * jnp.float32(scale)
  offset = jnp.zeros(q.shape[:-1], jnp.float32)
  if cache.key_mean is not None:  # q·(k − μ) + q·μ: one dot per query keeps logits exact
    offset = jnp.einsum("bkgth,bkh->bkgt", qs, cache.key_mean, precision=_HIGHEST)
  store = cache.k
  parts = split_channels(qs, store.perm, cache.config.outlier_channels)
  rot, sq = [], []
  for tq, part in zip((store.quantizer, store.outlier_quantizer), parts):
    if part is None:
      continue
    qr = rotate(tq.rotation, part)
    rot.append(qr)
    sq.append(project(tq.qjl, qr) if tq.qjl is not None else None)
  return PreparedQuery(tuple(rot), tuple(sq), offset)


def query_ranges(cache: KVCache, t: int, sliding_window: int | None, causal: bool = True):
  """Per query token: attended positions [lo, hi) [B, T] for T queries, the last T cached tokens.

  Causal: query t sees positions < lengths − T + t + 1; otherwise every query sees positions
  < lengths. A sliding window keeps the last `sliding_window` of those.
  """
  offsets = jnp.arange(t, dtype=jnp.int32)[None, :] - t + 1 if causal else jnp.zeros((1, t), jnp.int32)
  hi = jnp.clip(cache.lengths[:, None] + offsets, 0, cache.capacity)
  lo = jnp.zeros_like(hi) if sliding_window is None else jnp.maximum(hi - sliding_window, 0)
  return lo, hi


def compressed_range(cache: KVCache, hi: jax.Array) -> jax.Array:
  """The end [B, T] of the slots read from the compressed store: positions held in the
  full-precision window (the last `window` tokens) are read from the window instead."""
  if not cache.config.window:
    return hi
  return jnp.minimum(hi, jnp.maximum(cache.lengths[:, None] - cache.config.window, 0))


def _code_slice(code: Code, start, size: int) -> Code:
  return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=2), code)


def block_logits(tq: Quantizer, code: Code, q_rot: jax.Array, sq: jax.Array | None) -> jax.Array:
  """Logits [B, K, G, T, S'] of rotated queries [B, K, G, T, d] against a block of S' codes."""
  y_hat = codebook_direction(tq, code.codes)  # [B, K, S', d]: one block, never the whole cache
  ip = jnp.einsum("bkgtd,bksd->bkgts", q_rot, y_hat, precision=_HIGHEST)
  if sq is not None:
    s = qjl_signs(tq.qjl, code.qjl_signs)
    qjl = jnp.einsum("bkgtm,bksm->bkgts", sq, s, precision=_HIGHEST)
    ip = ip + qjl * (code.residual_norms.astype(jnp.float32) / (tq.qjl.kappa * tq.qjl.sketch_dim))[:, :, None, None, :]
  return ip * code.norms.astype(jnp.float32)[:, :, None, None, :]


def _block_values(tq: Quantizer, code: Code, p: jax.Array) -> jax.Array:
  """Σ_s p[..., s]·scale_s·ŷ_s in rotated space: p [B, K, G, T, S'] → [B, K, G, T, d]."""
  y_hat = codebook_direction(tq, code.codes) * code.norms.astype(jnp.float32)[..., None]
  return jnp.einsum("bkgts,bksd->bkgtd", p, y_hat, precision=_HIGHEST)


def apply_soft_cap(logits: jax.Array, soft_cap: float | None) -> jax.Array:
  """cap·tanh(logits / cap), or logits unchanged when soft_cap is None."""
  if soft_cap is None:
    return logits
  return jnp.float32(soft_cap) * jnp.tanh(logits / jnp.float32(soft_cap))


def compressed_partial_reference(cache, pq, lo, hi, soft_cap, block_size=1024):
  """Online softmax over compressed slots s with lo ≤ s < hi (lo, hi [B, T]), in blocks.

  The contract every fused kernel implements (`pallas_kernels`): given the prepared query,
  returns (accs, m, l) with accs a tuple (main[, outlier]) of UNnormalized Σ p·scale·ŷ in the
  value stores' rotated spaces [B, K, G, T, d_part], m the running max and l the sum of
  exp(logit − m) [B, K, G, T]. An empty range gives m = −inf, l = 0, accs = 0.

  Only the blocks that hold attended slots are read: the loop runs from the block of min(lo)
  to the block of max(hi) (bounds known at run time), so the work follows the tokens held,
  not the capacity.
  """
  b, kh = cache.batch_size, cache.num_kv_heads
  g, t = pq.offset.shape[2], pq.offset.shape[3]
  n_blk = min(block_size, cache.capacity)
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
      logits = logits + block_logits(tq, _code_slice(code, start, n_blk), q_rot, sq)
    logits = apply_soft_cap(logits, soft_cap)
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
  first = jnp.min(lo) // n_blk
  last = -(-jnp.max(hi) // n_blk)  # one past the last block with an attended slot
  # The first block runs outside the loop: under shard_map its carry is varying over the mesh
  # axes of the inputs, which the constant initial values are not (the loop needs both equal).
  return jax.lax.fori_loop(first + 1, last, body, body(first, (accs0, m0, l0)))


def finish_values(cache: KVCache, accs: tuple, l: jax.Array) -> jax.Array:
  """Normalizes accumulated values by l, un-rotates them once and undoes the channel split:
  → [B, K, G, T, H]. The division comes before the (linear) un-rotation so that XLA may fuse it
  into the fusion that finishes a kernel's output (the Triton kernel's split merge, the Mosaic
  GPU kernel's un-permutation) instead of running it as a kernel of its own. Rows with l = 0
  (nothing attended) come out as zeros."""
  denom = jnp.where(l > 0, l, 1.0)[..., None]
  outs = [unrotate(tq.rotation, acc / denom) for acc, tq in zip(accs, (cache.v.quantizer, cache.v.outlier_quantizer))]
  o = outs[0] if len(outs) == 1 else jnp.concatenate([outs[1], outs[0]], axis=-1)
  if cache.v.perm is not None:
    order = jnp.argsort(cache.v.perm, axis=-1)[:, :, None, None, :]
    o = jnp.take_along_axis(o, jnp.broadcast_to(order, o.shape), axis=-1)
  return o


def window_positions(cache: KVCache) -> jax.Array:
  """Position [B, 1, W] of the token each full-precision ring slot holds (negative: none yet).
  Slot j holds the token at the largest position p < lengths with p ≡ j (mod W)."""
  w = cache.config.window
  end = cache.lengths[:, None, None]
  return end - 1 - ((end - 1 - jnp.arange(w)) % w)


def window_logits(cache: KVCache, qs: jax.Array, soft_cap: float | None) -> jax.Array:
  """Exact (capped) logits [B, K, G, T, W] of scaled queries qs [B, K, G, T, H] against the
  full-precision ring."""
  logits = jnp.einsum("bkgth,bkwh->bkgtw", qs, cache.window_k.astype(jnp.float32), precision=_HIGHEST)
  return apply_soft_cap(logits, soft_cap)


def window_partial(cache: KVCache, qs, lo, hi, soft_cap):
  """Exact attention over the full-precision ring for positions in [lo, hi) [B, T]:
  (o [B, K, G, T, H] normalized, m, l [B, K, G, T])."""
  pos = window_positions(cache)
  ok = (pos >= 0) & (pos >= lo[..., None]) & (pos < hi[..., None])  # [B, T, W]
  logits = jnp.where(ok[:, None, None], window_logits(cache, qs, soft_cap), -jnp.inf)
  m = jnp.max(logits, axis=-1)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m_safe[..., None])
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bkgtw,bkwh->bkgth", p, cache.window_v.astype(jnp.float32), precision=_HIGHEST)
  return o / jnp.where(l > 0, l, 1.0)[..., None], m, l


def merge_partials(o1, m1, l1, o2, m2, l2):
  """Combines two normalized softmax partials (o [..., H], running max m [...], sum l [...])."""
  m = jnp.maximum(m1, m2)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w1 = jnp.where(jnp.isfinite(m1), jnp.exp(m1 - m_safe), 0.0) * l1
  w2 = jnp.where(jnp.isfinite(m2), jnp.exp(m2 - m_safe), 0.0) * l2
  tot = w1 + w2
  o = (o1 * w1[..., None] + o2 * w2[..., None]) / jnp.where(tot > 0, tot, 1.0)[..., None]
  return o, m, tot
