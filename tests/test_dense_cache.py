"""The uncompressed cache (tqjax.dense_cache): its writes and attention against a float64 NumPy
reference, its agreement with the compressed cache (exactly on the compressed cache's decoded
tokens, and within a bound computed from the reconstruction error at 8 bits), and its errors,
which are the compressed cache's."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tqjax
from tqjax import cache as C
from tqjax import dense_cache as DC
from tqjax import ops as tq_ops
from tqjax.partials import merge_partials

pytestmark = pytest.mark.math

B, K, G, H, S = 3, 2, 2, 16, 24
N = K * G


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _reference(k, v, lengths, q, *, scale, soft_cap=None, window=None, causal=True):
  """float64 attention, one query at a time from positions: q [B, N, T, H] are the last T of
  lengths[b] tokens, k, v [B, K, S, H] → (o [B, N, T, H], m, l [B, N, T]); nothing visible: 0, −inf, 0."""
  k, v, q = (np.asarray(a, np.float64) for a in (k, v, q))
  b, n, t, _ = q.shape
  g = n // k.shape[1]
  o, m, l = np.zeros(q.shape), np.full((b, n, t), -np.inf), np.zeros((b, n, t))
  for bi in range(b):
    length = int(lengths[bi])
    for ti in range(t):
      pos = length - t + ti
      keys = [s for s in range(length) if (s <= pos if causal else True)]
      if window is not None:
        last = pos if causal else length - 1
        keys = [s for s in keys if s > last - window]
      if not keys:
        continue
      for ni in range(n):
        z = np.array([scale * q[bi, ni, ti] @ k[bi, ni // g, s] for s in keys])
        if soft_cap is not None:
          z = soft_cap * np.tanh(z / soft_cap)
        m[bi, ni, ti] = z.max()
        p = np.exp(z - z.max())
        l[bi, ni, ti] = p.sum()
        o[bi, ni, ti] = p @ v[bi, ni // g, keys] / p.sum()
  return o, m, l


@functools.partial(jax.jit, static_argnums=0)
def _write(config, k0, v0, pre, k1, v1):
  dense = isinstance(config, DC.DenseCacheConfig)
  mod, ops = (DC, DC) if dense else (C, tq_ops)
  return mod.append(ops.prefill(mod.init_cache(config, B, K, S), k0, v0, pre), k1, v1)


def _jit(fn, **static):
  """fn with keyword options fixed, under jit (one compilation instead of op-by-op dispatch)."""
  return jax.jit(functools.partial(fn, **static))


def _filled(config, lengths, t_new, seed=0):
  """A cache prefilled with ragged `lengths` − t_new tokens, then t_new appended (under jit) →
  (cache, k, v) with k, v [B, K, S, H] float64 the tokens at their positions (zeros past lengths)."""
  pre = np.asarray(lengths) - t_new
  t0 = int(pre.max())
  k0, v0 = _normal(seed, (B, K, t0, H)), _normal(seed + 1, (B, K, t0, H))
  k1, v1 = _normal(seed + 2, (B, K, t_new, H)), _normal(seed + 3, (B, K, t_new, H))
  cache = _write(config, k0, v0, jnp.asarray(pre, jnp.int32), k1, v1)
  k, v = np.zeros((B, K, S, H)), np.zeros((B, K, S, H))
  for b in range(B):
    k[b, :, : pre[b]], v[b, :, : pre[b]] = np.asarray(k0[b, :, : pre[b]]), np.asarray(v0[b, :, : pre[b]])
    k[b, :, pre[b]: pre[b] + t_new], v[b, :, pre[b]: pre[b] + t_new] = np.asarray(k1[b]), np.asarray(v1[b])
  return cache, k, v


LENGTHS = np.array([9, 3, 16])
F32 = DC.DenseCacheConfig(H, "float32")


def test_writes_hold_the_tokens_at_their_positions():
  cache, k, v = _filled(F32, LENGTHS, 2)
  np.testing.assert_array_equal(cache.lengths, LENGTHS)
  for b in range(B):
    n = LENGTHS[b]
    np.testing.assert_array_equal(cache.k[b, :, :n], k[b, :, :n].astype(np.float32))
    np.testing.assert_array_equal(cache.v[b, :, :n], v[b, :, :n].astype(np.float32))
  assert DC.nbytes(cache) == DC.expected_nbytes(F32, B, K, S) == 2 * B * K * S * H * 4 + 4 * B
  bf16 = DC.init_cache(DC.DenseCacheConfig(H), B, K, S)
  assert bf16.k.dtype == jnp.bfloat16 and DC.nbytes(bf16) == DC.expected_nbytes(DC.DenseCacheConfig(H), B, K, S)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (4, None), (None, 2.0), (3, 5.0)])
def test_chunked_attention_matches_float64_reference(causal, window, soft_cap):
  t = 3
  cache, k, v = _filled(F32, LENGTHS, t)
  q = _normal(7, (B, N, t, H))
  scale = 0.4
  o, m, l = _jit(DC.chunked_attention, scale=scale, soft_cap=soft_cap, sliding_window=window, causal=causal,
                 return_residuals=True)(cache, q)
  ro, rm, rl = _reference(k, v, LENGTHS, q, scale=scale, soft_cap=soft_cap, window=window, causal=causal)
  np.testing.assert_allclose(o, ro, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(m, rm, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(l, rl, rtol=1e-5)


def test_attention_is_chunked_attention_of_one_token():
  cache, k, v = _filled(F32, LENGTHS, 1)
  q = _normal(8, (B, N, H))
  got = _jit(DC.attention, sliding_window=5)(cache, q)
  ro, _, _ = _reference(k, v, LENGTHS, q[:, :, None], scale=H**-0.5, window=5)
  np.testing.assert_allclose(got, ro[:, :, 0], atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(got, _jit(DC.chunked_attention, sliding_window=5)(cache, q[:, :, None])[:, :, 0],
                             atol=1e-7, rtol=1e-7)


def test_empty_ranges_and_merged_halves():
  """Nothing written → zeros with l = 0, m = −inf; two halves merged with `merge_partials` == the whole."""
  cache = DC.init_cache(F32, B, K, S)
  o, m, l = _jit(DC.chunked_attention, return_residuals=True)(cache, _normal(9, (B, N, 2, H)))
  np.testing.assert_array_equal(o, 0.0)
  np.testing.assert_array_equal(l, 0.0)
  assert np.all(np.isneginf(m))
  cache, _, _ = _filled(F32, LENGTHS, 2)
  q = _normal(10, (B, K, G, 3, H))
  lo = jnp.asarray([[0, 2, 0]] * B, jnp.int32)
  hi = jnp.broadcast_to(jnp.asarray(LENGTHS, jnp.int32)[:, None], (B, 3))
  mid = jnp.full((B, 3), 5, jnp.int32)
  part = _jit(DC.range_attention, scale=0.3, soft_cap=None)
  whole = part(q, cache.k, cache.v, lo, hi)
  a = part(q, cache.k, cache.v, lo, jnp.minimum(mid, hi))
  b = part(q, cache.k, cache.v, jnp.minimum(mid, hi), hi)
  for got, want in zip(merge_partials(*a, *b), whole):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  for got, want in zip(_jit(DC.range_attention, scale=0.3, soft_cap=None, block_q=2)(q, cache.k, cache.v, lo, hi),
                       whole):  # query blocks (with a padded last block when T % block_q != 0)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, None), (False, 3)])
def test_prompt_attention_is_prefill_then_chunked_attention(causal, window):
  """The prompt over itself == prefill + chunked_attention of its T queries; with padding, each
  sequence's real queries == that sequence alone, unpadded."""
  t = 7
  k, v, q = _normal(11, (B, K, t, H)), _normal(12, (B, K, t, H)), _normal(13, (B, N, t, H))
  opts = dict(sliding_window=window, causal=causal)
  prompt = _jit(DC.prompt_attention, **opts)
  got = prompt(q, k, v)
  want = _jit(lambda k, v, q: DC.chunked_attention(DC.prefill(DC.init_cache(F32, B, K, t), k, v), q, **opts))(k, v, q)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  lengths = np.array([4, 7, 1])
  padded = prompt(q, k, v, jnp.asarray(lengths, jnp.int32))
  for b, n in enumerate(lengths):
    alone = prompt(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
    np.testing.assert_allclose(padded[b:b + 1, :, :n], alone, atol=1e-6, rtol=1e-6)


@jax.jit
def _decoded(cache: C.KVCache):
  """K̂, V̂ [B, K, S, H] float32 that the compressed cache's codes reconstruct (key mean added back)."""
  k = tqjax.decode(cache.k.quantizer, cache.k.main)
  if cache.key_mean is not None:
    k = k + cache.key_mean[:, :, None, :]
  return k, tqjax.decode(cache.v.quantizer, cache.v.main)


def test_equals_compressed_cache_on_its_decoded_tokens():
  """The compressed cache's attention (reference partial) == the dense cache's over the tokens the
  codes decode to: the same positions, softmax and merge conventions."""
  comp, _, _ = _filled(C.CacheConfig(head_dim=H, k_bits=3, v_bits=3), LENGTHS, 3)
  k_hat, v_hat = _decoded(comp)
  dense = DC.DenseKVCache(F32, k_hat, v_hat, comp.lengths)
  q = _normal(14, (B, N, 3, H))
  for opts in (dict(sliding_window=4, soft_cap=3.0), dict(causal=False)):
    want = _jit(tq_ops.chunked_attention, implementation="xla", return_residuals=True, **opts)(comp, q)
    got = _jit(DC.chunked_attention, return_residuals=True, **opts)(dense, q)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_eight_bit_compressed_cache_within_its_reconstruction_bound():
  """At 8 bits the compressed cache's output differs from the dense one's by at most what its own
  reconstruction error allows, query by query: with logit errors |δ| ≤ ε and value errors
  ‖v̂ − v‖ ≤ e, softmax weights change by ‖Δp‖₁ ≤ e^{2ε} − 1, so ‖Δo‖ ≤ e + (e^{2ε} − 1)·max‖v‖."""
  cfg = C.CacheConfig(head_dim=H, k_bits=8, v_bits=8)
  comp, k, v = _filled(cfg, LENGTHS, 1)
  dense, _, _ = _filled(F32, LENGTHS, 1)
  q = _normal(15, (B, N, H))
  scale = H**-0.5
  got = np.asarray(_jit(tq_ops.attention, implementation="xla")(comp, q))
  want = np.asarray(_jit(DC.attention)(dense, q))
  k_hat, v_hat = (np.asarray(a, np.float64) for a in _decoded(comp))
  qn = np.asarray(q, np.float64).reshape(B, K, G, H)
  for b in range(B):
    n = LENGTHS[b]
    eps = np.abs(scale * np.einsum("kgh,ksh->kgs", qn[b], k_hat[b, :, :n] - k[b, :, :n])).max(-1)  # [K, G]
    e = np.linalg.norm(v_hat[b, :, :n] - v[b, :, :n], axis=-1).max(-1)[:, None]  # [K, 1]
    vmax = np.linalg.norm(v[b, :, :n], axis=-1).max(-1)[:, None]
    bound = (e + np.expm1(2 * eps) * vmax).reshape(N) + 1e-5  # + float32 rounding
    err = np.linalg.norm(got[b] - want[b], axis=-1)
    assert np.all(err <= bound), (b, err, bound)


def _both(fn):
  """fn(module, cache) run on a compressed and a dense cache → the two ValueError messages."""
  msgs = []
  for mod, cfg, ops in ((C, C.CacheConfig(head_dim=H), tq_ops), (DC, F32, DC)):
    cache = mod.init_cache(cfg, B, K, 4)
    with pytest.raises(ValueError) as err:
      fn(mod, ops, cache)
    msgs.append(str(err.value))
  return msgs


@pytest.mark.parametrize("case", ["prefill_lengths", "append_count", "append_past_capacity", "prefill_too_long",
                                  "q_shape", "soft_cap", "window"])
def test_errors_are_the_compressed_caches(case):
  kv = lambda t: (_normal(16, (B, K, t, H)), _normal(17, (B, K, t, H)))
  fns = {
      "prefill_lengths": lambda mod, ops, c: ops.prefill(c, *kv(3), jnp.asarray([1, 4, 0], jnp.int32)),
      "append_count": lambda mod, ops, c: mod.append(c, *kv(2), jnp.asarray([-1, 0, 0], jnp.int32)),
      "append_past_capacity": lambda mod, ops, c: mod.append(jax.jit(ops.prefill)(c, *kv(3)), *kv(2)),
      "prefill_too_long": lambda mod, ops, c: ops.prefill(c, *kv(5)),
      "q_shape": lambda mod, ops, c: ops.chunked_attention(c, _normal(18, (B, N, H))),
      "soft_cap": lambda mod, ops, c: ops.attention(c, _normal(18, (B, N, H)), soft_cap=-1.0),
      "window": lambda mod, ops, c: ops.attention(c, _normal(18, (B, N, H)), sliding_window=0),
  }
  compressed, dense = _both(fns[case])
  assert dense == compressed


def test_sharded_over_sequences_matches_single_device():
  """partition_specs shards the sequences over 4 (fake) devices; append + attention under jit agree."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 (fake) CPU devices")
  mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
  b = 4
  cache = jax.jit(DC.prefill)(DC.init_cache(F32, b, K, 8), _normal(26, (b, K, 6, H)), _normal(27, (b, K, 6, H)),
                              jnp.asarray([6, 2, 5, 0], jnp.int32))
  new = (_normal(28, (b, K, 1, H)), _normal(29, (b, K, 1, H)), _normal(30, (b, N, H)))
  step = jax.jit(lambda c, k, v, q: DC.attention(DC.append(c, k, v), q))
  want = step(cache, *new)
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  sharded = jax.tree.map(put, cache, DC.partition_specs(cache))
  assert sharded.k.sharding.spec == jax.sharding.PartitionSpec("x")
  got = step(sharded, *(put(x, jax.sharding.PartitionSpec("x")) for x in new))
  assert got.sharding.spec[0] == "x", got.sharding
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_past_capacity_under_jit_saturates():
  cache = DC.prefill(DC.init_cache(F32, B, K, 4), _normal(19, (B, K, 3, H)), _normal(20, (B, K, 3, H)))
  out = jax.jit(DC.append)(cache, _normal(21, (B, K, 2, H)), _normal(22, (B, K, 2, H)))
  np.testing.assert_array_equal(out.lengths, [4] * B)


def test_bad_config_and_pallas():
  with pytest.raises(ValueError, match="dtype must be a floating dtype, got dtype='int8'"):
    DC.DenseCacheConfig(H, "int8")
  with pytest.raises(ValueError, match="head_dim must be a positive integer"):
    DC.DenseCacheConfig(0)
  assert DC.DenseCacheConfig(H, jnp.bfloat16) == DC.DenseCacheConfig(H)
  cache = DC.init_cache(F32, B, K, 4)
  with pytest.raises(ValueError, match='implementation="pallas" is not available for a dense cache'):
    DC.attention(cache, _normal(23, (B, N, H)), implementation="pallas")
  with pytest.raises(ValueError, match="implementation='cuda' must be one of"):
    DC.prefill(cache, _normal(24, (B, K, 2, H)), _normal(25, (B, K, 2, H)), implementation="cuda")
