"""tqjax.fidelity (the KV-fidelity experiment's metrics, paths and accounting) on a slice of the real
MiniLM data.

Slice: both segments, layers 0–1 (layer 0 holds the high-norm head 2), heads 0–3, the first 128
tokens: 16 (sequence, head) units, attended bidirectionally.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tqjax import fidelity as E
from tqjax import cache as tqc
from tqjax.quantizer import decode

pytestmark = pytest.mark.math


@pytest.fixture(scope="module")
def data(minilm_qkv_path):
  with jax.numpy_dtype_promotion("strict"):
    q, k, v, scale, _ = E.load_minilm_qkv(minilm_qkv_path, layers=slice(0, 2), heads=slice(0, 4), tokens=slice(0, 128))
    ref = E.dense_attention(q, k, v, scale)
  return q, k, v, scale, ref


def _cfg(bits, **kw):
  opts = dict(k_variant="mse", norm_correction=True, center_keys=True)
  opts.update(kw)
  return tqc.CacheConfig(head_dim=32, k_bits=bits, v_bits=bits, **opts)


@pytest.fixture(scope="module")
def tq(data):
  q, k, v, scale, ref = data
  out = {}
  with jax.numpy_dtype_promotion("strict"):
    for name, cfg in {
        "nc+c 2": _cfg(2),
        "nc+c 4": _cfg(4),
        "mse 3": _cfg(3, norm_correction=False, center_keys=False),
        "nc 3": _cfg(3, center_keys=False),
    }.items():
      logits, o, cache = E.compressed_attention(cfg, q, k, v, scale)
      per_unit = E.attention_metrics(*ref, logits, o)
      out[name] = {"per_unit": {m: np.asarray(a) for m, a in per_unit.items()}, **E.cache_accounting(cache),
                   "cfg": cfg, "logits": logits, "out": o, "cache": cache}
  return out


def test_exact_reference_scores_perfectly(data):
  q, k, v, scale, ref = data
  m = E.attention_metrics(*ref, *ref)
  np.testing.assert_allclose(np.asarray(m["kl"]), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(m["top1"]), 1.0)
  np.testing.assert_allclose(np.asarray(m["logit_rel_rmse"]), 0.0, atol=1e-7)


def test_kl_nonnegative_and_baselines_ordered(data, tq):
  q, k, v, scale, ref = data
  rows = {n: E.evaluate_baseline(fk, fv, q, k, v, scale, ref) for n, fk, fv in E.baseline_quantizers()[:3]}
  for name, (per_unit, acct) in rows.items():
    assert np.all(np.asarray(per_unit["kl"]) >= -1e-6), name
    assert acct["nbytes_bits"] == pytest.approx((acct["k_bits"] + acct["v_bits"]) / 2, abs=1e-9)
  for name, r in tq.items():
    assert np.all(r["per_unit"]["kl"] >= -1e-6), name
  kl = {n: float(np.mean(r[0]["kl"])) for n, r in rows.items()}
  assert kl["bf16"] < kl["int8 per token"] < kl["int4 per token, group 32"]


def test_more_bits_is_better(tq):
  lo, hi = tq["nc+c 2"]["per_unit"], tq["nc+c 4"]["per_unit"]
  # Lloyd–Max distortion falls ~4x per bit: two bits apart is far outside any noise.
  assert np.mean(hi["kl"]) < 0.25 * np.mean(lo["kl"])
  assert np.mean(hi["out_rel_err"]) < 0.5 * np.mean(lo["out_rel_err"])
  assert np.mean(hi["logit_rel_rmse"]) < 0.5 * np.mean(lo["logit_rel_rmse"])
  assert np.mean(hi["top1"]) > np.mean(lo["top1"])


def test_norm_correction_does_not_hurt_at_3_bits(tq):
  with_nc = {"per_unit": {m: a.tolist() for m, a in tq["nc 3"]["per_unit"].items()}}
  without = {"per_unit": {m: a.tolist() for m, a in tq["mse 3"]["per_unit"].items()}}
  for metric, higher in (("kl", False), ("out_rel_err", False), ("logit_rel_rmse", False), ("top1", True)):
    assert E.not_worse(with_nc, without, metric, higher_is_better=higher), (metric, E.paired(with_nc, without, metric))


def test_bits_columns_match_nbytes(data, tq):
  q, k, v, scale, ref = data
  b, h, t, d = k.shape
  for name, r in tq.items():
    cfg = r["cfg"]
    assert (r["k_bits"], r["v_bits"]) == tqc.bits_per_coordinate_kv(cfg)
    assert r["k_bits_arrays"] == pytest.approx(r["k_bits"], abs=1e-12)
    assert r["v_bits_arrays"] == pytest.approx(r["v_bits"], abs=1e-12)
    assert r["nbytes"] == tqc.expected_nbytes(cfg, b, h, t)
    side = 4 * b + (4 * b * h * d if cfg.center_keys else 0)  # lengths + key mean
    assert r["nbytes"] - side == pytest.approx((r["k_bits"] + r["v_bits"]) * b * h * t * d / 8, abs=1e-6)
    # One norm per vector in norm_dtype (32 or 16 bits on D=32): bits + 1 or + 0.5 per coordinate.
    norm_bits = np.dtype(cfg.norm_dtype).itemsize * 8 / d
    assert r["k_bits"] == cfg.k_bits + norm_bits and r["v_bits"] == cfg.v_bits + norm_bits


def test_cache_attention_is_bidirectional_and_consistent(tq):
  """Outputs from chunked_attention(causal=False) = softmax(scores) @ decoded cache values."""
  logits, out, cache = (tq["nc 3"][n] for n in ("logits", "out", "cache"))
  v_hat = decode(cache.v.quantizer, cache.v.main)  # [B, K, S, D]
  dense = jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(logits, axis=-1), v_hat, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(dense))))
  assert bool(jnp.all(jnp.isfinite(logits)))  # every query saw every key
