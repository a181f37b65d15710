"""tqjax.search: the blocked scan against its plain reference and against the quantizer's own
inner-product estimate, exact re-rank against NumPy brute force, add/remove/compact, jit, bad
input, save/load."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tqjax import quantizer as tq
from tqjax import search as S
from tqjax.rotation import rotate, unrotate

pytestmark = pytest.mark.search

D = 64


def _data(n=600, q=9, d=D, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((q, d)).astype(np.float32)


def _exact(metric, q, x):
  """NumPy scores [Q, N], larger is better (−‖q − x‖² for l2)."""
  q, x = q.astype(np.float64), x.astype(np.float64)
  if metric == "cosine":
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
  if metric == "l2":
    return -((q[:, None] - x[None]) ** 2).sum(-1)
  return q @ x.T


def _index(x, metric="ip", estimator="ratio", bits=3, store=None, capacity=64, **kw):
  cfg = S.IndexConfig(D, bits, metric=metric, estimator=estimator, rerank_store=store, **kw)
  return S.add(S.init_index(cfg, capacity), x)


def test_tiny_hand_case():
  # d = 2, 1 bit, Hadamard rotation Π = H·diag(s)/√2. The 1-bit codebook at d = 2 is ±2/π (the
  # mean of |cos θ| for θ uniform). x = (3, 4): ‖x‖ = 5, y = Π·x/5; q = Πᵀ·(1, 0) so Π·q = (1, 0)
  # and the "norm" estimate is 5·sign(y₀)·2/π, "ratio" is that over ⟨y, ŷ⟩ = (|y₀| + |y₁|)·2/π.
  cfg = S.IndexConfig(2, 1, estimator="norm", rotation="hadamard")
  ix = S.add(S.init_index(cfg, 4), jnp.asarray([[3.0, 4.0]]))
  rot = ix.quantizer.rotation
  y = np.asarray(rotate(rot, jnp.asarray([0.6, 0.8])))
  q = np.asarray(unrotate(rot, jnp.asarray([1.0, 0.0])))
  s, i = S.search(ix, jnp.asarray(q[None]), 1)
  np.testing.assert_allclose(s[0, 0], 5 * np.sign(y[0]) * 2 / np.pi, rtol=1e-5)
  assert int(i[0, 0]) == 0
  ix_r = S.add(S.init_index(dataclasses.replace(cfg, estimator="ratio"), 4), jnp.asarray([[3.0, 4.0]]))
  s_r, _ = S.search(ix_r, jnp.asarray(q[None]), 1)
  np.testing.assert_allclose(s_r[0, 0], 5 * np.sign(y[0]) / (abs(y[0]) + abs(y[1])), rtol=1e-5)


@pytest.mark.parametrize("estimator,norm_correction", [("norm", False), ("unit", True)])
def test_scores_equal_quantizer_estimate(estimator, norm_correction):
  # The index stores the quantizer's own mse codes: "norm" is TurboQuant_mse's ⟨q, x̂⟩ and "unit"
  # the norm-corrected one, so the top-k scores must be estimate_ip's values for the returned ids.
  x, q = _data()
  ix = _index(x, estimator=estimator)
  quant = tq.make_quantizer(D, 3, norm_correction=norm_correction)
  est = np.asarray(tq.estimate_ip(quant, jnp.asarray(q)[:, None, :], tq.encode(quant, jnp.asarray(x))))  # [Q, N]
  s, i = S.search(ix, q, 10)
  np.testing.assert_allclose(np.asarray(s), np.take_along_axis(est, np.asarray(i), 1), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(s), -np.sort(-est, axis=1)[:, :10], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("metric", S.METRICS)
@pytest.mark.parametrize("block_size", [64, 100, 4096])  # 100: a ragged last block (600 = 6·100, capacity 640)
def test_blocked_scan_matches_reference(metric, block_size):
  x, q = _data()
  ix = _index(x, metric=metric)
  s, i = S.search(ix, q, 7, block_size=block_size)
  s_ref, i_ref = S.search_reference(ix, q, 7)
  np.testing.assert_array_equal(np.asarray(i), np.asarray(i_ref))
  np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=1e-5, atol=1e-4)
  if metric == "l2":
    assert np.all(np.diff(np.asarray(s), axis=1) >= 0)  # distances ascending
  else:
    assert np.all(np.diff(np.asarray(s), axis=1) <= 0)


@pytest.mark.parametrize("metric", S.METRICS)
@pytest.mark.parametrize("store,tol", [("float32", 1e-4), ("bfloat16", 3e-2), ("int8", 3e-2)])
def test_full_rerank_is_exact(metric, store, tol):
  # Re-ranking every vector makes the search exact up to the store's rounding.
  x, q = _data()
  ix = _index(x, metric=metric, store=store)
  s, i = S.search(ix, q, 5, rerank=len(x))
  exact = _exact(metric, q, x)
  got = np.take_along_axis(exact, np.asarray(i), 1)
  best = -np.sort(-exact, axis=1)[:, :5]
  sign = -1 if metric == "l2" else 1
  np.testing.assert_allclose(sign * np.asarray(s), best, rtol=tol, atol=tol * np.abs(best).max())
  np.testing.assert_allclose(got, best, rtol=tol, atol=tol * np.abs(best).max())
  if store == "float32":
    np.testing.assert_array_equal(np.asarray(i), np.argsort(-exact, axis=1, kind="stable")[:, :5])


def test_more_bits_better_recall():
  # recall@1@1 over 200 queries on Gaussian data grows with bits: a 4-bit code's inner-product
  # error is ~1/13 of the 2-bit one (D_mse 0.117 → 0.009), so it must win by more than twice the
  # standard error of a 200-query mean (≤ 0.035).
  x, q = _data(n=2000, q=200, seed=1)
  true = np.argmax(_exact("ip", q, x), axis=1)
  rec = []
  for bits in (2, 4):
    _, i = S.search(_index(x, bits=bits), q, 1)
    rec.append(np.mean(np.asarray(i)[:, 0] == true))
  se = np.sqrt(0.25 / 200)
  assert rec[1] > rec[0] + 2 * se, rec


def test_remove_readd_compact():
  x, q = _data()
  ix = _index(x, capacity=1024)
  _, i = S.search(ix, q, 5)
  gone = np.unique(np.asarray(i)[:, 0])
  ix2 = S.remove(ix, gone)
  assert int(S.live_count(ix2)) == len(x) - len(gone)
  _, i2 = S.search(ix2, q, 5)
  assert not np.isin(np.asarray(i2), gone).any()
  # Re-adding the removed vectors under their ids brings the same results back.
  ix3 = S.add(ix2, x[gone], gone)
  s3, i3 = S.search(ix3, q, 5)
  s, _ = S.search(ix, q, 5)
  np.testing.assert_array_equal(np.asarray(i3), np.asarray(i))
  np.testing.assert_allclose(np.asarray(s3), np.asarray(s), rtol=1e-6)
  ix4 = S.compact(ix3)
  assert ix4.capacity == len(x) and int(ix4.size) == len(x)
  s4, i4 = S.search(ix4, q, 5)
  np.testing.assert_array_equal(np.asarray(i4), np.asarray(i))
  np.testing.assert_allclose(np.asarray(s4), np.asarray(s), rtol=1e-6)


def test_add_grows_capacity_and_ids():
  x, _ = _data(n=100)
  ix = S.init_index(S.IndexConfig(D, 2), capacity=8)
  ix = S.add(ix, x[:50])
  ix = S.add(ix, x[50:], np.arange(1000, 1050))
  assert ix.capacity >= 100 and int(ix.size) == 100
  np.testing.assert_array_equal(np.asarray(ix.ids[:100]), np.r_[np.arange(50), np.arange(1000, 1050)])
  assert S.nbytes(ix) == ix.capacity * (4 * 2 * 2 + 4 + 4)  # 2 bits · 64 = 4 words, scale, id


def test_under_jit_capacity_and_non_finite():
  x, q = _data(n=40)
  ix = S.init_index(S.IndexConfig(D, 3), capacity=32)
  bad = x.copy()
  bad[3, 5] = np.nan
  bad[7, 0] = np.inf
  ix = jax.jit(S.add)(ix, jnp.asarray(bad), jnp.arange(40, dtype=jnp.int32))
  assert int(ix.size) == 32  # 8 rows past the capacity were dropped
  ids = np.asarray(ix.ids)
  assert ids[3] == -1 and ids[7] == -1 and ids[8] == 8 and ids[31] == 31
  qq = q.copy()
  qq[1, 2] = np.nan
  s, i = jax.jit(lambda ix, q: S.search(ix, q, 4))(ix, jnp.asarray(qq))
  assert np.all(np.asarray(i)[1] == -1) and np.all(np.isnan(np.asarray(s)[1]))
  assert not np.isin(np.asarray(i), [3, 7]).any() and np.all(np.asarray(i)[[0, 2]] >= 0)
  # Fewer live vectors than k under jit: missing results are id −1, score −inf.
  small = S.add(S.init_index(S.IndexConfig(D, 3), 8), x[:2])
  s, i = jax.jit(lambda ix, q: S.search(ix, q, 4))(small, jnp.asarray(q))
  assert np.all(np.asarray(i)[:, 2:] == -1) and np.all(np.isneginf(np.asarray(s)[:, 2:]))
  assert np.all(np.asarray(i)[:, :2] >= 0)


def test_bfloat16_vectors():
  x, q = _data()
  ix = _index(x)
  ix_b = _index(jnp.asarray(x).astype(jnp.bfloat16))
  s, i = S.search(ix_b, jnp.asarray(q).astype(jnp.bfloat16), 3)
  assert s.dtype == jnp.float32 and i.dtype == jnp.int32
  # bf16 rounding moves a few codes; most top-1 results agree.
  _, i32 = S.search(ix, q, 3)
  assert np.mean(np.asarray(i)[:, 0] == np.asarray(i32)[:, 0]) >= 0.5


def test_bad_input():
  x, q = _data(n=20)
  ix = _index(x)
  with pytest.raises(ValueError, match=r"queries must be \[n, 64\].*shape=\(9, 32\)"):
    S.search(ix, q[:, :32], 3)
  with pytest.raises(ValueError, match=r"x must be \[n, 64\].*x.shape=\(64,\)"):
    S.add(ix, x[0])
  with pytest.raises(ValueError, match=r"k=21 exceeds the number of vectors in the index \(20\)"):
    S.search(ix, q, 21)
  with pytest.raises(ValueError, match=r"k=100 exceeds the index capacity=64"):
    S.search(ix, q, 100)
  with pytest.raises(ValueError, match="k must be an integer >= 1, got k=0"):
    S.search(ix, q, 0)
  with pytest.raises(ValueError, match="index is empty"):
    S.search(S.init_index(ix.config), q, 1)
  with pytest.raises(ValueError, match="index is empty"):
    S.search(S.remove(ix, np.arange(20)), q, 1)
  nan = x.copy()
  nan[4, 1] = np.nan
  with pytest.raises(ValueError, match=r"x row 4 is not finite"):
    S.add(ix, nan)
  inf = q.copy()
  inf[2, 0] = -np.inf
  with pytest.raises(ValueError, match=r"queries row 2 is not finite"):
    S.search(ix, inf, 1)
  with pytest.raises(TypeError, match="x must be a floating-point array.*int32"):
    S.add(ix, np.ones((2, D), np.int32))
  with pytest.raises(TypeError, match="ids must be an integer array.*float32"):
    S.add(ix, x[:2], np.ones(2, np.float32))
  with pytest.raises(ValueError, match=r"ids must have shape \(2,\)"):
    S.add(ix, x[:2], np.arange(3))
  with pytest.raises(ValueError, match="ids must be in .*got id=-5"):
    S.add(ix, x[:2], np.array([1, -5]))
  with pytest.raises(ValueError, match="rerank=5 needs a re-rank store"):
    S.search(ix, q, 3, rerank=5)
  with pytest.raises(ValueError, match=r"rerank must be None or an integer >= k=3.*rerank=2"):
    S.search(_index(x, store="int8"), q, 3, rerank=2)
  with pytest.raises(ValueError, match="metric='dot' must be one of"):
    S.IndexConfig(D, 2, metric="dot")
  with pytest.raises(ValueError, match="bits must be an integer in"):
    S.IndexConfig(D, 9)
  with pytest.raises(TypeError, match="expected a tqjax.search.Index"):
    S.search(x, q, 1)


@pytest.mark.parametrize("metric,store", [("ip", None), ("cosine", "bfloat16"), ("l2", "int8")])
def test_save_load_roundtrip(tmp_path, metric, store):
  x, q = _data()
  ix = S.remove(_index(x, metric=metric, store=store, capacity=1000), np.arange(0, 600, 7))
  path = tmp_path / "index.tqjx"
  S.save(ix, path)
  assert not list(tmp_path.glob("*.tmp"))
  back = S.load(path)
  assert back.config == ix.config and int(back.size) == int(ix.size)
  for name in ("codes", "scales", "norms", "ids", "store", "store_scales"):
    a, b = getattr(ix, name), getattr(back, name)
    assert (a is None) == (b is None), name
    if a is not None:
      np.testing.assert_array_equal(np.asarray(a[:600]).view(np.uint8), np.asarray(b[:600]).view(np.uint8), name)
  kw = dict(rerank=20) if store else {}
  for r, want in zip(S.search(back, q, 5, **kw), S.search(ix, q, 5, **kw)):
    np.testing.assert_array_equal(np.asarray(r), np.asarray(want))


def test_load_rejects_bad_files(tmp_path):
  x, _ = _data(n=50)
  path = tmp_path / "index.tqjx"
  S.save(_index(x), path)
  raw = path.read_bytes()
  (tmp_path / "trunc").write_bytes(raw[:-100])
  with pytest.raises(ValueError, match="truncated or corrupted"):
    S.load(tmp_path / "trunc")
  flipped = bytearray(raw)
  flipped[len(raw) // 2] ^= 1
  (tmp_path / "flip").write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match="truncated or corrupted"):
    S.load(tmp_path / "flip")
  np.save(tmp_path / "foreign.npy", x)
  with pytest.raises(ValueError, match="is not a tqjax index file"):
    S.load(tmp_path / "foreign.npy")
  (tmp_path / "short").write_bytes(raw[:10])
  with pytest.raises(ValueError, match="is not a tqjax index file"):
    S.load(tmp_path / "short")
  newer = bytearray(raw)
  newer[8:12] = (S.FORMAT_VERSION + 1).to_bytes(4, "little")
  (tmp_path / "newer").write_bytes(bytes(newer))
  with pytest.raises(ValueError, match="format version=2; this tqjax reads version 1"):
    S.load(tmp_path / "newer")


def test_bits_per_coordinate():
  # 3 bits at d = 64: 6 words (192 bits) + a float32 scale = 224 bits / 64 = 3.5; l2 adds ‖x‖.
  assert S.bits_per_coordinate(S.IndexConfig(64, 3)) == 3.5
  assert S.bits_per_coordinate(S.IndexConfig(64, 3, metric="l2")) == 4.0
  assert S.bits_per_coordinate(S.IndexConfig(384, 4, scale_dtype="float16"), ids=True) == (4 * 384 + 48) / 384


@pytest.mark.parametrize("metric", S.METRICS)
def test_zero_vector_is_defined(metric):
  # A zero vector is stored with scale 0: ip/cosine estimate 0 for it; l2 estimates ‖q‖².
  x, q = _data(n=5)
  x[2] = 0
  ix = _index(x, metric=metric)
  s, i = S.search(ix, q, 5)
  s, i = np.asarray(s), np.asarray(i)
  assert np.all(np.isfinite(s))
  got = s[i == 2]
  want = np.sum(q.astype(np.float64) ** 2, axis=1) if metric == "l2" else np.zeros(len(q))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
