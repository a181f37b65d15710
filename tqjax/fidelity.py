"""Attention fidelity of a compressed KV cache: metrics against exact attention, with accounting.

Owns the measurement that `experiments/kv_fidelity.py` reports and the tests check: exact
bidirectional attention in float32 (`dense_attention`), per-unit error metrics of approximate
logits and outputs (`attention_metrics`), their mean ± standard error (`summarize`) and paired
comparisons (`paired`, `not_worse`), the tqjax cache's path (prefill every token, logits from
`scores`, outputs from `chunked_attention(causal=False)`: `compressed_attention`), the integer
baselines' path (`baseline_quantizers`, `evaluate_baseline`), and bits per coordinate checked
against the stored arrays (`cache_accounting`). `load_minilm_qkv` reads the real MiniLM capture
(see `tqjax.data`).

Shapes: q [B, K, T, H], k and v [B, K, S, H] (one query head per kv head; B may fold sequences and
layers), logits [B, K, T, S], out [B, K, T, H]. A *unit* is one (b, k) pair: metrics are [B, K].
Metrics per unit:
* logit_rel_rmse: sqrt(mean_{t,s}(l̂ − l)²) / sqrt(mean_t var_s l)
* kl: mean over queries of KL(p‖p̂) in nats, p = exact attention row
* out_rel_err: ‖O − Ô‖_F / ‖O‖_F over the unit's queries
* top1: fraction of queries whose argmax key is unchanged
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tqjax import baselines
from tqjax import cache as tqc
from tqjax import ops as tq_ops
from tqjax.data import data_path

__all__ = [
    "METRICS",
    "attention_metrics",
    "baseline_quantizers",
    "cache_accounting",
    "compressed_attention",
    "dense_attention",
    "evaluate_baseline",
    "load_minilm_qkv",
    "not_worse",
    "paired",
    "prefill_and_attend",
    "summarize",
]

METRICS = ("logit_rel_rmse", "kl", "out_rel_err", "top1")
_HIGHEST = jax.lax.Precision.HIGHEST


def load_minilm_qkv(path: Path | None = None, layers=None, heads=None, tokens=None):
  """Real MiniLM q, k, v as float32 [segments·layers, heads, tokens, 32] plus scale and slicing.

  path: the capture (default `tqjax.data.data_path("minilm_l6_qkv.npz")`). layers / heads /
  tokens: optional slices (for quick tests). Batch index = segment·L + layer.
  Returns (q, k, v, scale, (segments, layers)).
  """
  path = data_path("minilm_l6_qkv.npz") if path is None else path
  with np.load(path) as d:
    arrs = [d[n] for n in ("queries", "keys", "values")]
    scale = float(d["scale"])
  sl = (slice(None), layers or slice(None), heads or slice(None), tokens or slice(None))
  arrs = [a[sl].astype(np.float32) for a in arrs]
  s, l, h, t, dd = arrs[0].shape
  q, k, v = (jnp.asarray(a.reshape(s * l, h, t, dd)) for a in arrs)
  return q, k, v, scale, (s, l)


@jax.jit
def dense_attention(q, k, v, scale):
  """Bidirectional attention: q [B, K, T, H], k, v [B, K, S, H] → logits [B, K, T, S], out [B, K, T, H]."""
  logits = jnp.einsum("bkth,bksh->bkts", q, k, precision=_HIGHEST) * scale
  p = jax.nn.softmax(logits, axis=-1)
  return logits, jnp.einsum("bkts,bksh->bkth", p, v, precision=_HIGHEST)


@jax.jit
def attention_metrics(logits, out, logits_hat, out_hat):
  """Per-unit metrics {name: [B, K]} of approximate logits/outputs against the exact ones.

  logits, logits_hat: [B, K, T, S]; out, out_hat: [B, K, T, H]. Names: `METRICS`.
  """
  err = logits_hat - logits
  rmse = jnp.sqrt(jnp.mean(jnp.square(err), axis=(-2, -1)))
  spread = jnp.sqrt(jnp.mean(jnp.var(logits, axis=-1), axis=-1))
  lp = jax.nn.log_softmax(logits, axis=-1)
  lp_hat = jax.nn.log_softmax(logits_hat, axis=-1)
  kl = jnp.sum(jnp.exp(lp) * (lp - lp_hat), axis=-1)  # [B, K, T]
  o_err = jnp.sqrt(jnp.sum(jnp.square(out_hat - out), axis=(-2, -1)) / jnp.sum(jnp.square(out), axis=(-2, -1)))
  top1 = jnp.argmax(logits, axis=-1) == jnp.argmax(logits_hat, axis=-1)
  return {
      "logit_rel_rmse": rmse / spread,
      "kl": jnp.mean(kl, axis=-1),
      "out_rel_err": o_err,
      "top1": jnp.mean(top1.astype(jnp.float32), axis=-1),
  }


def summarize(per_unit: dict, select=None) -> dict:
  """{metric: {"mean", "se", "n"}} over units (optionally a boolean/index selection of them)."""
  out = {}
  for name, a in per_unit.items():
    a = np.asarray(a, np.float64)
    a = (a if select is None else a[select]).ravel()
    out[name] = {"mean": float(a.mean()), "se": float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0,
                 "n": int(a.size)}
  return out


def paired(row, ref, metric: str) -> tuple[float, float]:
  """Mean and standard error over units of (row − ref) for one metric; units are paired.

  row, ref: {"per_unit": {metric: [units]}}.
  """
  d = np.asarray(row["per_unit"][metric], np.float64).ravel() - np.asarray(ref["per_unit"][metric], np.float64).ravel()
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def not_worse(row, ref, metric: str, higher_is_better: bool = False, n_se: float = 2.0) -> bool:
  """True unless `row` is worse than `ref` on `metric` by more than n_se paired standard errors."""
  m, se = paired(row, ref, metric)
  worse = -m if higher_is_better else m
  return worse <= n_se * se


def baseline_quantizers():
  """[(name, key quantizer, value quantizer)]; each maps x [..., S, H] → (x_hat, bits, storage)."""
  rs = dict(return_storage=True)
  return [
      ("bf16", lambda x: baselines.bf16(x, **rs), lambda x: baselines.bf16(x, **rs)),
      ("int8 per token", lambda x: baselines.int8_per_token(x, **rs), lambda x: baselines.int8_per_token(x, **rs)),
      ("int4 per token, group 32", lambda x: baselines.int4_per_token_group(x, 32, **rs),
       lambda x: baselines.int4_per_token_group(x, 32, **rs)),
      ("KIVI-2 (K per channel, V per token)", lambda x: baselines.kivi(x, 2, "key", **rs),
       lambda x: baselines.kivi(x, 2, "value", **rs)),
      ("KIVI-4 (K per channel, V per token)", lambda x: baselines.kivi(x, 4, "key", **rs),
       lambda x: baselines.kivi(x, 4, "value", **rs)),
      ("rand. Hadamard + int4 group 32", lambda x: baselines.hadamard_int4(x, 32, **rs),
       lambda x: baselines.hadamard_int4(x, 32, **rs)),
  ]


def evaluate_baseline(fk, fv, q, k, v, scale, ref):
  """(per-unit metrics, accounting) of one baseline; ref = dense_attention(q, k, v, scale).

  Raises if a baseline's stated bits per coordinate disagree with the bytes of its storage.
  """
  k_hat, bk, sk = fk(k)
  v_hat, bv, sv = fv(v)
  nb = sum(int(a.nbytes) for a in (*sk.values(), *sv.values()))
  for bits, st, x in ((bk, sk, k), (bv, sv, v)):
    got = 8 * sum(int(a.nbytes) for a in st.values()) / x.size
    if abs(got - bits) >= 1e-9:
      raise AssertionError(f"baseline bits {bits} != nbytes-derived {got}")
  logits_hat, out_hat = dense_attention(q, k_hat, v_hat, scale)
  per_unit = attention_metrics(*ref, logits_hat, out_hat)
  return per_unit, {"k_bits": bk, "v_bits": bv, "nbytes": nb, "nbytes_bits": 8 * nb / (k.size + v.size)}


@functools.partial(jax.jit, static_argnames="scale")
def prefill_and_attend(cache0, q, k, v, scale: float):
  """Prefill all S tokens, then logits via `scores` and outputs via `chunked_attention`.

  cache0: an empty cache of capacity S; q [B, K, T, H]; k, v [B, K, S, H]; scale: a Python float
  (static: the attention entry points validate it at trace time).
  Returns (cache, logits [B, K, T, S], out [B, K, T, H]).
  """
  cache = tq_ops.prefill(cache0, k, v)
  b, h, t, d = q.shape
  # Fold query tokens into the query-head axis: N = K·T, so each kv head sees G = T queries.
  logits = tq_ops.scores(cache, q.reshape(b, h * t, d), scale=scale).reshape(b, h, t, -1)
  out = tq_ops.chunked_attention(cache, q, scale=scale, causal=False, block_size=min(t, 1024))
  return cache, logits, out


def compressed_attention(config: tqc.CacheConfig, q, k, v, scale):
  """(logits [B, K, T, S], out [B, K, T, H], cache) of attention through a tqjax cache of `config`."""
  b, h, t, _ = k.shape
  cache, logits, out = prefill_and_attend(tqc.init_cache(config, b, h, t), q, k, v, scale)
  return logits, out, cache


def _leaf_bytes(*trees) -> int:
  return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(list(trees)))


def cache_accounting(cache: tqc.KVCache) -> dict:
  """Bits per coordinate from the formulas and from the arrays; raises if they disagree.

  Returns {"k_bits", "v_bits", "nbytes", "nbytes_bits", "k_bits_arrays", "v_bits_arrays"}.
  """
  cfg = cache.config
  b, h, s, d = cache.batch_size, cache.num_kv_heads, cache.capacity, cfg.head_dim
  bk, bv = tqc.bits_per_coordinate_kv(cfg)
  n = b * h * s * d
  k_tok = 8 * _leaf_bytes(cache.k.main, cache.k.outlier) / n
  v_tok = 8 * _leaf_bytes(cache.v.main, cache.v.outlier) / n
  if abs(k_tok - bk) >= 1e-9 or abs(v_tok - bv) >= 1e-9:
    raise AssertionError(f"{cfg}: formula bits {bk=}, {bv=} != array bits {k_tok=}, {v_tok=}")
  nb = tqc.nbytes(cache)
  exp = tqc.expected_nbytes(cfg, b, h, s)
  if nb != exp:
    raise AssertionError(f"nbytes {nb} != expected_nbytes {exp} for {cfg}")
  return {"k_bits": bk, "v_bits": bv, "nbytes": nb, "nbytes_bits": 8 * nb / (2 * n),
          "k_bits_arrays": k_tok, "v_bits_arrays": v_tok}
