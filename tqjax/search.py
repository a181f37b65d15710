"""Compressed nearest-neighbour index over TurboQuant codes: add, remove, search, save, load.

Owns the `Index` pytree and its operations. A vector x is stored as the packed `bits`-bit
Lloyd–Max codes of its rotated direction y = Π·x/‖x‖ (exactly `tqjax.quantizer`'s mse codes) and
one float scale s, so ⟨q, x⟩ ≈ s·⟨Π·q, ŷ⟩ with ŷ the codes' centroids. Adding needs no training:
each vector is encoded on its own (online, jit-able). The scale is the `estimator`:

* "norm":  s = ‖x‖ (the paper's TurboQuant_mse inner product, biased low by ⟨y, ŷ⟩ ≈ ‖ŷ‖²);
* "unit":  s = ‖x‖/‖ŷ‖ (norm correction: the reconstruction has x's norm);
* "ratio": s = ‖x‖/⟨y, ŷ⟩ (RaBitQ's estimator: ⟨ŷ, Π·q⟩/⟨ŷ, y⟩ estimates ⟨y, Π·q⟩ without the
  shrinkage of the other two; same storage).

Metrics: "ip" (scores = estimated ⟨q, x⟩, largest first), "cosine" (vectors and queries are
normalized; scores = estimated cosine, largest first), "l2" (scores = estimated ‖q − x‖², smallest
first; ‖x‖ is stored exactly beside the scale, one more float per vector).

Search streams the codes in blocks of `block_size` slots: per block it unpacks codes to centroids
[block, d], scores every query against them with one matmul and keeps a running top-k of
(score, slot), so memory is O(T·(k + block)), never O(T·S). Rotations are paid
per query. An optional re-rank store (the vectors in int8 with a per-vector scale, bfloat16 or
float32) rescores the best `rerank` candidates exactly.

Capacity. Arrays have a fixed capacity (slots), so the index passes through jit. Eager `add`
grows it (doubling) when needed; inside jit the capacity must already suffice: rows past it are
dropped and `size` stops at the capacity (check `index.size` against what you added).

Non-finite input. Eagerly, `add` and `search` raise ValueError naming the first bad row. Inside
jit (values unknown at trace time) a non-finite vector is stored with id −1, so it is never
returned, and a non-finite query row returns ids −1 with NaN scores.

Removal marks slots dead (id −1); `compact` drops them eagerly. Ids are int32 ≥ 0, chosen by the
caller or consecutive from the current size; duplicates are allowed (both are returned).

Shapes (the project's letters where they apply): T queries, S slots (the capacity), d the vector
dim, k results, R re-rank candidates.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tqjax import packing
from tqjax.codebook import check_bits, quantize
from tqjax.quantizer import NORM_DTYPES, Quantizer, QuantizerConfig, codebook_direction, quantizer_from_config
from tqjax.rotation import ROTATION_KINDS, rotate

__all__ = [
    "ESTIMATORS",
    "METRICS",
    "RERANK_STORES",
    "Index",
    "IndexConfig",
    "add",
    "bits_per_coordinate",
    "compact",
    "init_index",
    "live_count",
    "load",
    "nbytes",
    "remove",
    "save",
    "search",
    "search_reference",
    "shard_index",
    "sharded_search",
]

METRICS = ("ip", "cosine", "l2")
ESTIMATORS = ("norm", "unit", "ratio")
RERANK_STORES = ("int8", "bfloat16", "float32")
FORMAT_MAGIC = b"TQJXIDX\x00"
FORMAT_VERSION = 1
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class IndexConfig:
  """Static description of an index.

  dim: vector length d (≥ 2). bits: codebook bits per coordinate (1–8). metric: one of
  `METRICS`. estimator: the stored scale (`ESTIMATORS`, module docstring). rerank_store: None or
  one of `RERANK_STORES` (a copy of the vectors for exact re-ranking). scale_dtype: storage dtype
  of the scale (and of ‖x‖ for l2). rotation, seed: of the quantizer (same seed, same codes).
  """

  dim: int
  bits: int
  metric: str = "ip"
  estimator: str = "ratio"
  rerank_store: str | None = None
  scale_dtype: str = "float32"
  rotation: str = "haar"
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 2:
      raise ValueError(f"dim must be an integer >= 2, got dim={self.dim!r}")
    check_bits(self.bits)
    if self.metric not in METRICS:
      raise ValueError(f"metric={self.metric!r} must be one of {METRICS}")
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"estimator={self.estimator!r} must be one of {ESTIMATORS}")
    if self.rerank_store is not None and self.rerank_store not in RERANK_STORES:
      raise ValueError(f"rerank_store={self.rerank_store!r} must be None or one of {RERANK_STORES}")
    if self.scale_dtype not in NORM_DTYPES:
      raise ValueError(f"scale_dtype={self.scale_dtype!r} must be one of {NORM_DTYPES}")
    if self.rotation not in ROTATION_KINDS:
      raise ValueError(f"rotation={self.rotation!r} must be one of {ROTATION_KINDS}")

  def quantizer_config(self) -> QuantizerConfig:
    """The mse quantizer whose codes the index stores."""
    return QuantizerConfig(dim=self.dim, bits=self.bits, variant="mse", norm_dtype=self.scale_dtype,
                           rotation=self.rotation, seed=self.seed)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("quantizer", "codes", "scales", "norms", "ids", "store", "store_scales", "size"),
    meta_fields=("config",),
)
@dataclasses.dataclass(frozen=True)
class Index:
  """A compressed vector index; build with `init_index`, fill with `add`.

  codes:        uint32 [S, words] packed codebook indices of the rotated unit directions.
  scales:       [S] the estimator's scale s (scale_dtype).
  norms:        [S] ‖x‖ (scale_dtype), metric "l2" only, else None.
  ids:          int32 [S] caller ids; −1 marks an empty, removed or non-finite slot.
  store:        [S, d] re-rank copy (int8, bfloat16 or float32) or None.
  store_scales: float32 [S] per-vector int8 scale (int8 store only), else None.
  size:         int32 [] slots used so far (removed slots included until `compact`).
  """

  config: IndexConfig
  quantizer: Quantizer
  codes: jax.Array
  scales: jax.Array
  norms: jax.Array | None
  ids: jax.Array
  store: jax.Array | None
  store_scales: jax.Array | None
  size: jax.Array

  @property
  def capacity(self) -> int:
    return self.ids.shape[0]

  @property
  def dim(self) -> int:
    return self.config.dim


# ----------------------------------------------------------------------------- construction


def _check_capacity(capacity) -> int:
  if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
    raise ValueError(f"capacity must be an integer >= 1, got capacity={capacity!r}")
  return int(capacity)


def _empty_arrays(config: IndexConfig, capacity: int) -> dict:
  sdt = jnp.dtype(config.scale_dtype)
  store = store_scales = None
  if config.rerank_store is not None:
    store = jnp.zeros((capacity, config.dim), jnp.dtype(config.rerank_store))
    store_scales = jnp.zeros((capacity,), jnp.float32) if config.rerank_store == "int8" else None
  return dict(
      codes=jnp.zeros((capacity, packing.packed_words(config.dim, config.bits)), jnp.uint32),
      scales=jnp.zeros((capacity,), sdt),
      norms=jnp.zeros((capacity,), sdt) if config.metric == "l2" else None,
      ids=jnp.full((capacity,), -1, jnp.int32),
      store=store,
      store_scales=store_scales,
  )


def init_index(config: IndexConfig, capacity: int = 1024) -> Index:
  """An empty index with room for `capacity` vectors (eager `add` grows it)."""
  if not isinstance(config, IndexConfig):
    raise TypeError(f"expected an IndexConfig, got {type(config).__name__}")
  capacity = _check_capacity(capacity)
  return Index(config=config, quantizer=quantizer_from_config(config.quantizer_config()),
               size=jnp.zeros((), jnp.int32), **_empty_arrays(config, capacity))


def _grow(index: Index, capacity: int) -> Index:
  """The same index with `capacity` slots (≥ the current one), eager."""
  fresh = _empty_arrays(index.config, capacity)
  grown = {}
  for name, empty in fresh.items():
    old = getattr(index, name)
    grown[name] = None if old is None else empty.at[: old.shape[0]].set(old)
  return dataclasses.replace(index, **grown)


# ----------------------------------------------------------------------------- validation


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_index(index) -> None:
  if not isinstance(index, Index):
    raise TypeError(f"expected a tqjax.search.Index, got {type(index).__name__}")


def _check_vectors(index: Index, x, name: str) -> jax.Array:
  x = jnp.asarray(x) if isinstance(x, np.ndarray) else x
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array (float32, bfloat16, float16), got "
                    f"{getattr(x, 'dtype', type(x).__name__)}")
  if x.ndim != 2 or x.shape[-1] != index.dim:
    raise ValueError(f"{name} must be [n, {index.dim}] (the index dim={index.dim}), got {name}.shape={x.shape}")
  if not _is_traced(x):
    bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(x, np.float32)), axis=-1))
    if bad.size:
      raise ValueError(f"{name} row {int(bad[0])} is not finite (NaN or Inf); {bad.size} such rows: {name}[{int(bad[0])}]"
                       f"={np.asarray(x[int(bad[0])])[:4]}...")
  return x


def live_count(index: Index) -> jax.Array:
  """Number of slots holding a searchable vector (int32 [])."""
  slot = jnp.arange(index.capacity)
  return jnp.sum((index.ids >= 0) & (slot < index.size), dtype=jnp.int32)


# ----------------------------------------------------------------------------- add / remove


def _encode_rows(index: Index, x: jax.Array) -> dict:
  """Per-row arrays of x [n, d]: codes [n, words], scales [n], norms [n] | None, store, finite [n]."""
  cfg, tq = index.config, index.quantizer
  x = x.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(x), axis=-1)
  x = jnp.where(finite[:, None], x, 0)
  norm = jnp.linalg.norm(x, axis=-1)
  safe = jnp.where(norm > 0, norm, 1)
  u = x / safe[:, None]
  y = rotate(tq.rotation, u)
  codes = packing.pack(quantize(tq.codebook, y), cfg.bits)
  y_hat = codebook_direction(tq, codes)
  if cfg.metric == "cosine":  # stored as unit vectors
    x, norm = u, jnp.where(norm > 0, 1.0, 0.0).astype(jnp.float32)
  if cfg.estimator == "norm":
    scale = norm
  elif cfg.estimator == "unit":
    scale = norm / jnp.linalg.norm(y_hat, axis=-1)
  else:  # ⟨y, ŷ⟩ > 0 for every code: each coordinate's centroid has the sign of y's coordinate
    scale = norm / jnp.maximum(jnp.sum(y * y_hat, axis=-1), 1e-30)  # x = 0 gives y = 0, scale 0
  sdt = jnp.dtype(cfg.scale_dtype)
  out = dict(codes=codes, scales=scale.astype(sdt), norms=norm.astype(sdt) if cfg.metric == "l2" else None,
             store=None, store_scales=None, finite=finite)
  if cfg.rerank_store == "int8":
    amax = jnp.max(jnp.abs(x), axis=-1)
    s = jnp.where(amax > 0, amax / 127.0, 1.0)
    out["store"] = jnp.round(x / s[:, None]).astype(jnp.int8)
    out["store_scales"] = s
  elif cfg.rerank_store is not None:
    out["store"] = x.astype(jnp.dtype(cfg.rerank_store))
  return out


@jax.jit
def _add_jit(index: Index, x: jax.Array, ids: jax.Array) -> Index:
  rows = _encode_rows(index, x)
  n = x.shape[0]
  pos = index.size + jnp.arange(n, dtype=jnp.int32)  # past the capacity: dropped by the scatter
  put = lambda dst, src: None if dst is None else dst.at[pos].set(src.astype(dst.dtype), mode="drop")
  new = {name: put(getattr(index, name), rows[name]) for name in ("codes", "scales", "norms", "store", "store_scales")}
  new["ids"] = put(index.ids, jnp.where(rows["finite"], ids, -1))
  new["size"] = jnp.minimum(index.size + n, index.capacity).astype(jnp.int32)
  return dataclasses.replace(index, **new)


def add(index: Index, x: jax.Array, ids: jax.Array | None = None) -> Index:
  """Adds vectors x [n, d] (float) with int ids [n] (≥ 0; default size, size+1, ...).

  Eager: validates values (non-finite rows, negative ids raise ValueError) and grows the
  capacity as needed. Under jit: see the module docstring (capacity, non-finite rows).
  """
  _check_index(index)
  x = _check_vectors(index, x, "x")
  n = x.shape[0]
  if ids is None:
    ids = index.size + jnp.arange(n, dtype=jnp.int32)
  else:
    ids = jnp.asarray(ids) if isinstance(ids, (np.ndarray, list, tuple)) else ids
    if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"ids must be an integer array, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.shape != (n,):
      raise ValueError(f"ids must have shape ({n},) to match x.shape={x.shape}, got ids.shape={ids.shape}")
    if not _is_traced(ids):
      ids_np = np.asarray(ids)
      if ids_np.size and (ids_np.min() < 0 or ids_np.max() > np.iinfo(np.int32).max):
        bad = ids_np[(ids_np < 0) | (ids_np > np.iinfo(np.int32).max)][0]
        raise ValueError(f"ids must be in [0, 2**31 - 1], got id={int(bad)}")
  ids = ids.astype(jnp.int32)
  if n == 0:
    return index
  if not _is_traced(index.size):
    need = int(index.size) + n
    if need > index.capacity:
      index = _grow(index, max(need, 2 * index.capacity))
  return _add_jit(index, x, ids)


@jax.jit
def _remove_jit(index: Index, ids: jax.Array) -> Index:
  dead = jnp.isin(index.ids, ids)
  return dataclasses.replace(index, ids=jnp.where(dead, -1, index.ids))


def remove(index: Index, ids: jax.Array) -> Index:
  """Marks every slot holding one of `ids` [m] (int) removed; they are never returned again."""
  _check_index(index)
  ids = jnp.asarray(ids) if isinstance(ids, (np.ndarray, list, tuple)) else ids
  if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim != 1:
    raise TypeError(f"ids must be a 1-D integer array, got {getattr(ids, 'dtype', type(ids).__name__)} "
                    f"{getattr(ids, 'shape', '')}")
  ids = ids.astype(jnp.int32)
  # -1 marks dead slots already; "removing" it would be a no-op that hides a caller bug.
  return _remove_jit(index, jnp.where(ids < 0, jnp.iinfo(jnp.int32).min, ids))


def compact(index: Index) -> Index:
  """Drops removed and empty slots (eager): live vectors move to slots 0 .. live−1, in order."""
  _check_index(index)
  keep = np.flatnonzero((np.asarray(index.ids) >= 0) & (np.arange(index.capacity) < int(index.size)))
  new = {}
  for name in ("codes", "scales", "norms", "ids", "store", "store_scales"):
    a = getattr(index, name)
    new[name] = None if a is None else jnp.asarray(np.asarray(a)[keep]) if len(keep) else a[:1]
  if not len(keep):
    new["ids"] = jnp.full((1,), -1, jnp.int32)
  return dataclasses.replace(index, size=jnp.asarray(len(keep), jnp.int32), **new)


# ----------------------------------------------------------------------------- search


def _prepare_queries(index: Index, q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Π·q [T, d] float32, ‖q‖² [T]) with q normalized first for cosine."""
  q = q.astype(jnp.float32)
  if index.config.metric == "cosine":
    n = jnp.linalg.norm(q, axis=-1, keepdims=True)
    q = q / jnp.where(n > 0, n, 1)
  return rotate(index.quantizer.rotation, q), jnp.sum(q * q, axis=-1)


def _slot_scores(index: Index, q_rot, q_sq, codes, scales, norms) -> jax.Array:
  """Estimated scores [T, block] of one block (larger is better: −‖q − x‖² for l2)."""
  y_hat = codebook_direction(index.quantizer, codes)  # [block, d]
  ip = jnp.einsum("td,sd->ts", q_rot, y_hat, precision=_HIGHEST) * scales.astype(jnp.float32)[None]
  if index.config.metric == "l2":
    n = norms.astype(jnp.float32)
    return 2 * ip - q_sq[:, None] - (n * n)[None]
  return ip


def _exact_scores(index: Index, q, q_sq, slots) -> jax.Array:
  """Scores [T, R] of candidate slots [T, R] from the re-rank store (larger is better)."""
  x = index.store[slots].astype(jnp.float32)  # [T, R, d]
  if index.store_scales is not None:
    x = x * index.store_scales[slots][..., None]
  ip = jnp.einsum("td,trd->tr", q, x, precision=_HIGHEST)
  if index.config.metric == "l2":
    return 2 * ip - q_sq[:, None] - jnp.sum(x * x, axis=-1)
  return ip


def _scan_topk(index: Index, q_rot, q_sq, k: int, block: int, slot_offset, size) -> tuple[jax.Array, jax.Array]:
  """Running top-k over all slots: (scores [T, k], slots [T, k]; −inf / −1 where fewer exist)."""
  c = index.capacity
  block = min(block, c)
  nblocks = -(-c // block)
  nq = q_rot.shape[0]
  init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), -1, jnp.int32))

  def body(i, carry):
    top_s, top_i = carry
    # A ragged last block is read from c − block and its already-seen slots are masked.
    start = jnp.minimum(i * block, c - block)
    sl = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, start, block, 0)
    s = _slot_scores(index, q_rot, q_sq, sl(index.codes), sl(index.scales), sl(index.norms))
    slot = start + jnp.arange(block, dtype=jnp.int32)
    ok = (sl(index.ids) >= 0) & (slot >= i * block) & (slot_offset + slot < size)
    s = jnp.where(ok[None], s, -jnp.inf)
    cand_s = jnp.concatenate([top_s, s], axis=1)
    cand_i = jnp.concatenate([top_i, jnp.broadcast_to(slot, (nq, block))], axis=1)
    top_s, pos = jax.lax.top_k(cand_s, k)
    return top_s, jnp.take_along_axis(cand_i, pos, axis=1)

  return jax.lax.fori_loop(0, nblocks, body, init)


def _candidates(index: Index, q, width: int, rerank: bool, block: int, slot_offset, size):
  """The `width` best slots by the codes: (code scores, exact scores or the code scores again
  without re-rank, ids), each [T, width], larger is better, −inf / −1 where fewer exist."""
  q_rot, q_sq = _prepare_queries(index, q)
  code_s, slot = _scan_topk(index, q_rot, q_sq, width, block, slot_offset, size)
  score = code_s
  if rerank:
    qn = q.astype(jnp.float32)
    if index.config.metric == "cosine":
      qn = qn / jnp.maximum(jnp.linalg.norm(qn, axis=-1, keepdims=True), 1e-30)
    score = jnp.where(slot >= 0, _exact_scores(index, qn, q_sq, jnp.maximum(slot, 0)), -jnp.inf)
  return code_s, score, jnp.where(slot >= 0, index.ids[jnp.maximum(slot, 0)], -1)


def _best(score, ids, k: int):
  """Top-k of [T, width] scores with their ids."""
  top, pos = jax.lax.top_k(score, k)
  return top, jnp.take_along_axis(ids, pos, axis=1)


def _finish(index: Index, q, scores, ids):
  """Public scores: distances for l2; NaN scores and −1 ids for non-finite query rows."""
  bad = ~jnp.all(jnp.isfinite(q), axis=-1)[:, None]
  if index.config.metric == "l2":
    scores = -scores
  return jnp.where(bad, jnp.nan, scores), jnp.where(bad | (ids < 0), -1, ids)


@functools.partial(jax.jit, static_argnames=("k", "rerank", "block_size"))
def _search_jit(index: Index, q: jax.Array, k: int, rerank: int, block_size: int):
  _, score, ids = _candidates(index, q, max(k, rerank), bool(rerank), block_size, 0, index.size)
  return _finish(index, q, *_best(score, ids, k))


def _check_search(index: Index, queries, k, rerank, block_size) -> jax.Array:
  _check_index(index)
  for name, v, lo in (("k", k, 1), ("block_size", block_size, 1)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ValueError(f"{name} must be an integer >= {lo}, got {name}={v!r}")
  if rerank is not None and (isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < k):
    raise ValueError(f"rerank must be None or an integer >= k={k} (candidates re-scored exactly), got {rerank=}")
  if rerank and index.store is None:
    raise ValueError(f"{rerank=} needs a re-rank store: build the index with IndexConfig(rerank_store=...)")
  if k > index.capacity:
    raise ValueError(f"k={k} exceeds the index capacity={index.capacity}")
  if rerank is not None and rerank > index.capacity:
    raise ValueError(f"rerank={rerank} exceeds the index capacity={index.capacity}")
  q = _check_vectors(index, queries, "queries")
  if not _is_traced(index.size) and not _is_traced(index.ids):
    live = int(live_count(index))
    if live == 0:
      raise ValueError("the index is empty (no live vectors): add vectors before searching")
    if k > live:
      raise ValueError(f"k={k} exceeds the number of vectors in the index ({live})")
  return q


def search(index: Index, queries: jax.Array, k: int, *, rerank: int | None = None,
           block_size: int = 4096) -> tuple[jax.Array, jax.Array]:
  """The k best vectors for each query: (scores [T, k] float32, ids [T, k] int32).

  queries [T, d] float. Order: largest score first for "ip"/"cosine", smallest squared distance
  first for "l2". rerank=R ≥ k: take the R best by the codes, re-score them exactly from the
  re-rank store, return the k best of those. Under jit, with fewer than k live vectors the
  missing results have id −1 and score −inf (+inf for l2).
  """
  q = _check_search(index, queries, k, rerank, block_size)
  return _search_jit(index, q, k, int(rerank or 0), block_size)


def search_reference(index: Index, queries: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Plain reference of `search` (no re-rank): decodes every slot, scores all, one top-k."""
  q = _check_search(index, queries, k, None, 1)
  q_rot, q_sq = _prepare_queries(index, q)
  s = _slot_scores(index, q_rot, q_sq, index.codes, index.scales, index.norms)
  ok = (index.ids >= 0) & (jnp.arange(index.capacity) < index.size)
  s, slot = jax.lax.top_k(jnp.where(ok[None], s, -jnp.inf), k)
  return _finish(index, q, s, jnp.where(jnp.isfinite(s), index.ids[slot], -1))


def _partition_specs(index: Index, axis: str) -> Index:
  """Slot arrays split over `axis`; quantizer constants and size replicated."""
  slots = lambda a: None if a is None else P(axis)
  return Index(config=index.config, quantizer=jax.tree.map(lambda _: P(), index.quantizer),
               codes=P(axis), scales=P(axis), norms=slots(index.norms), ids=P(axis), store=slots(index.store),
               store_scales=slots(index.store_scales), size=P())


def shard_index(index: Index, mesh: jax.sharding.Mesh, axis: str = "x") -> Index:
  """The index placed on `mesh`: slots split over `axis` (capacity must divide), the rest replicated."""
  _check_index(index)
  n = mesh.shape[axis]
  if index.capacity % n:
    raise ValueError(f"capacity={index.capacity} must be a multiple of the {n} devices on mesh axis {axis!r}")
  specs = _partition_specs(index, axis)
  return jax.tree.map(lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec)), index, specs)


def sharded_search(index: Index, queries: jax.Array, k: int, mesh: jax.sharding.Mesh, axis: str = "x", *,
                   rerank: int | None = None, block_size: int = 4096) -> tuple[jax.Array, jax.Array]:
  """`search` with the index's slots split over mesh `axis`: each device scans its shard, then
  one all-gather of the per-device top-k and a final top-k. Queries are replicated.

  The capacity must be a multiple of the axis size. Results equal `search`'s (up to the order of
  equal scores).
  """
  q = _check_search(index, queries, k, rerank, block_size)
  n = mesh.shape[axis]
  if index.capacity % n:
    raise ValueError(f"capacity={index.capacity} must be a multiple of the {n} devices on mesh axis {axis!r}")
  width = max(k, int(rerank or 0))
  local_width = min(width, index.capacity // n)
  specs = _partition_specs(index, axis)

  def local(ix: Index, q):
    # Each device's `width` best by the codes (re-scored exactly with rerank); the global `width`
    # best by the codes among all devices' are then exactly the single-device candidates.
    offset = jax.lax.axis_index(axis) * ix.capacity
    parts = _candidates(ix, q, local_width, bool(rerank), block_size, offset, ix.size)
    code_s, score, ids = (jax.lax.all_gather(a, axis, axis=1, tiled=True) for a in parts)  # [T, n·local_width]
    if rerank:
      _, pos = jax.lax.top_k(code_s, width)
      score, ids = (jnp.take_along_axis(a, pos, axis=1) for a in (score, ids))
    return _best(score, ids, k)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(specs, P()), out_specs=(P(), P()), check_vma=False)
  s, i = jax.jit(fn)(index, q)
  return _finish(index, q, s, i)


# ----------------------------------------------------------------------------- accounting


def bits_per_coordinate(config: IndexConfig, *, ids: bool = False) -> float:
  """Stored bits per coordinate of the searchable part: packed codes + scale (+ ‖x‖ for l2)
  (+ the int32 id with ids=True). The re-rank store is not included (`nbytes` counts it)."""
  fbits = jnp.dtype(config.scale_dtype).itemsize * 8
  bits = 32 * packing.packed_words(config.dim, config.bits) + fbits * (2 if config.metric == "l2" else 1)
  return (bits + (32 if ids else 0)) / config.dim


def nbytes(index: Index) -> int:
  """Bytes of the per-slot arrays (codes, scales, norms, ids, re-rank store), constants excluded."""
  return sum(int(a.nbytes) for a in (index.codes, index.scales, index.norms, index.ids, index.store,
                                      index.store_scales) if a is not None)


# ----------------------------------------------------------------------------- save / load

_ARRAYS = ("codes", "scales", "norms", "ids", "store", "store_scales")


def _constants_digest(index: Index) -> str:
  """sha256 of the quantizer constants: a file is only valid with the very same rotation."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(index.quantizer):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def save(index: Index, path: str | os.PathLike) -> None:
  """Writes the index to `path` atomically (a temp file renamed into place).

  Layout: magic (8 bytes) | version (uint32 LE) | header length (uint32 LE) | JSON header |
  raw arrays (C order, little-endian) | sha256 of everything before (32 bytes).
  """
  _check_index(index)
  size = int(index.size)
  header = dict(config=dataclasses.asdict(index.config), size=size, capacity=index.capacity,
                constants_sha256=_constants_digest(index), arrays=[])
  blobs = []
  for name in _ARRAYS:
    a = getattr(index, name)
    if a is None:
      continue
    a = np.ascontiguousarray(np.asarray(a)[:size])
    header["arrays"].append(dict(name=name, dtype=a.dtype.str if a.dtype != jnp.bfloat16 else "bfloat16",
                                 shape=list(a.shape), nbytes=a.nbytes))
    blobs.append(a.view(np.uint8).tobytes() if a.dtype != jnp.bfloat16 else a.view(np.uint16).astype("<u2").tobytes())
  hbytes = json.dumps(header, sort_keys=True).encode()
  body = io.BytesIO()
  body.write(FORMAT_MAGIC + struct.pack("<II", FORMAT_VERSION, len(hbytes)) + hbytes)
  for b in blobs:
    body.write(b)
  data = body.getvalue()
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(data + hashlib.sha256(data).digest())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def load(path: str | os.PathLike) -> Index:
  """Reads an index written by `save`; raises ValueError for a foreign, truncated, corrupted or
  newer-version file, or one whose quantizer constants this build cannot reproduce."""
  raw = Path(path).read_bytes()
  head = len(FORMAT_MAGIC) + 8
  if len(raw) < head + 32 or not raw.startswith(FORMAT_MAGIC):
    raise ValueError(f"{str(path)!r} is not a tqjax index file (no {FORMAT_MAGIC!r} header, {len(raw)} bytes)")
  version, hlen = struct.unpack("<II", raw[len(FORMAT_MAGIC) : head])
  if version != FORMAT_VERSION:
    raise ValueError(f"{str(path)!r} has format {version=}; this tqjax reads version {FORMAT_VERSION}")
  data, digest = raw[:-32], raw[-32:]
  if hashlib.sha256(data).digest() != digest:
    raise ValueError(f"{str(path)!r} is truncated or corrupted: its sha256 checksum does not match "
                     f"({len(raw)} bytes)")
  header = json.loads(data[head : head + hlen])
  config = IndexConfig(**header["config"])
  size, capacity = int(header["size"]), int(header["capacity"])
  index = init_index(config, max(capacity, 1))
  if _constants_digest(index) != header["constants_sha256"]:
    raise ValueError(f"{str(path)!r}: this build makes different quantizer constants for {config}; the codes "
                     "cannot be decoded here")
  offset = head + hlen
  arrays = {}
  for spec in header["arrays"]:
    chunk = data[offset : offset + spec["nbytes"]]
    offset += spec["nbytes"]
    if spec["dtype"] == "bfloat16":
      a = np.frombuffer(chunk, "<u2").view(jnp.bfloat16)
    else:
      a = np.frombuffer(chunk, np.dtype(spec["dtype"]))
    arrays[spec["name"]] = a.reshape(spec["shape"])
  if offset != len(data):
    raise ValueError(f"{str(path)!r}: header describes {offset} bytes, file holds {len(data)}")
  new = {name: None if getattr(index, name) is None else getattr(index, name).at[:size].set(jnp.asarray(arrays[name]))
         for name in _ARRAYS}
  return dataclasses.replace(index, size=jnp.asarray(size, jnp.int32), **new)
