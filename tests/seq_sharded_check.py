"""`tqjax.sharding` on a mesh of 8 CPU devices, compared with the unsharded ops (run by
tests/test_seq_sharding.py in a process of its own: the device count is fixed when jax starts).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/seq_sharded_check.py [--configs | --kernel | --million]

For every layout (batch, kv heads, slots and their combinations) and cache class (mse, prod,
outlier channels, full-precision window), one jitted step — prefill of ragged prompts (an empty
sequence, one shorter than a shard, one ending on a shard boundary, one nearly full), an append
of ragged counts that crosses shard boundaries and overflows one sequence, decode attention and
chunked attention (2 queries) with a sliding window wider than a shard — is checked in two halves:

  write  lengths, channel permutations and the window ring equal the unsharded prefill/append
         bit for bit; the key mean (a psum of per-shard sums under slot sharding) within the
         bound of a reordered float32 sum; codes and norms against the unsharded write given
         that key mean (`same_codes`).
  read   the attention outputs against `tqjax.ops.attention` / `chunked_attention` of the same
         cache, within the float32 reassociation bound `reassociation_tol`.

Default: every layout with the mse cache; --configs: the prod, outlier and window caches on the
layouts that split slots. --kernel: the Triton decode kernel (interpret mode) as the per-shard
partial. --million: a cache of 2^20 slots split over the 8 devices (bytes per device printed).
Prints one line per check ("ok ..."); exits non-zero (an AssertionError) on the first difference.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


from pallas_kernels import dispatch
from tqjax import cache as C
from tqjax import ops
from tqjax import sharding as sh

DEVICES = 8
B, K, G, S, H = 8, 4, 2, 128, 32
# Shards of 16 slots (8 seq shards) or 64 (2): an empty sequence, one shorter than a shard, one
# ending on a shard boundary, appends crossing one (94 + 3 over 96, 63 + 2 over 64), an overflow
# (127 + 3 saturates at S).
PREFILL = np.array([0, 3, 16, 37, 63, 94, 127, 100], np.int32)
APPEND_T = 3
NUM_NEW = np.array([0, 3, 1, 3, 2, 3, 3, 1], np.int32)
CHUNK = 2  # chunked attention: queries of the last 2 tokens written
SOFT_CAP, SLIDING = 30.0, 20
EPS32 = float(np.finfo(np.float32).eps)

CONFIGS = {
    "mse": C.CacheConfig(head_dim=H, k_bits=4, v_bits=3),
    "prod": C.CacheConfig(head_dim=H, k_bits=4, v_bits=2, k_variant="prod", center_keys=False),
    "outliers": C.CacheConfig(head_dim=H, k_bits=3, v_bits=3, outlier_channels=4),
    "window": C.CacheConfig(head_dim=H, k_bits=4, v_bits=4, k_variant="prod", window=24),
}
# mesh shape over ("b", "k", "s") and which of them split batch, heads, slots
LAYOUTS = {
    "batch": ((8, 1, 1), ("b", None, None)),
    "heads": ((2, 4, 1), (None, "k", None)),  # 4 kv heads over 4 devices; replicated over "b"
    "seq": ((1, 1, 8), (None, None, "s")),
    "batch x seq": ((2, 1, 4), ("b", None, "s")),
    "heads x seq": ((1, 2, 4), (None, "k", "s")),
    "batch x heads x seq": ((2, 2, 2), ("b", "k", "s")),
}
ALL_CONFIG_LAYOUTS = ("seq", "batch x heads x seq")  # every cache class; the others with mse


def reassociation_tol(s: int, shards: int, block: int, h: int, v_max: float) -> float:
  """Bound on |sharded − unsharded| of an attention output. Both compute o = Σ_s w_s·v̂_s with
  Σ w_s = 1 in float32 and differ only in the order of roundings: a term's weight passes
  through exp (≤ 2 ulp), one rescale per block and one per merge (≤ S/block + log2 P + 1) and a
  sum of ≤ block terms (≤ block additions in the worst order), then ÷ l and the orthogonal
  un-rotation (≤ 2 + H roundings). Each rounding is ≤ eps/2 relative, so |δo| ≤ 2·n·eps/2 ·
  max‖v̂‖ for n the count above (both sides contribute)."""
  n = 2 + math.ceil(s / block) + math.ceil(math.log2(max(shards, 1))) + 1 + min(block, s) + 2 + h
  return n * EPS32 * v_max


def same_exact(name, got, want) -> None:
  """Equal pytrees bit for bit."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
    np.testing.assert_array_equal(g, w, err_msg=name)


def same_codes(name, got, want) -> int:
  """Equal stores up to rounding, token by token ([B, K, S] of each code): integer leaves (codes,
  signs) bit for bit, float leaves (norms) within one unit of their dtype (XLA fuses the float32
  arithmetic differently per shard shape). A token may differ further only where an integer
  leaf differs — a rotated coordinate within float32 rounding of a codebook boundary took the
  neighbouring index, which also moves its norm — and such tokens are rare (≤ 1e-3 of all; a
  write to a wrong slot, shard or mean changes whole shards). Returns their count."""
  flipped = 0
  for part in ("k", "v"):
    for code_g, code_w in ((getattr(got, part).main, getattr(want, part).main),
                           (getattr(got, part).outlier, getattr(want, part).outlier)):
      if code_g is None:
        continue
      off_int = off_float = 0
      for g, w in zip(jax.tree.leaves(code_g), jax.tree.leaves(code_w), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        if np.issubdtype(g.dtype, np.integer):
          off_int = off_int | (g != w).reshape(*g.shape[:3], -1).any(-1)
        else:
          assert np.isfinite(g).all(), name
          eps = float(jnp.finfo(g.dtype).eps)
          g, w = g.astype(np.float64), w.astype(np.float64)
          off_float = off_float | (np.abs(g - w) > eps * np.abs(w)).reshape(*g.shape[:3], -1).any(-1)
      off_int, off_float = np.broadcast_to(off_int, code_g.norms.shape), np.broadcast_to(off_float, code_g.norms.shape)
      assert not (off_float & ~off_int).any(), f"{name} {part}: norms differ beyond one unit where the codes agree"
      assert off_int.sum() <= 1e-3 * off_int.size, f"{name} {part}: {off_int.sum()} of {off_int.size} tokens differ"
      flipped += int(off_int.sum())
  return flipped


def close(name, got, want, atol) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.isfinite(got).all() and np.isfinite(want).all(), name
  err = float(np.abs(got - want).max())
  assert err <= atol, f"{name}: max |diff| {err:.3g} > tol {atol:.3g}"
  return err


def make_layout(shape, axes) -> sh.CacheLayout:
  mesh = jax.make_mesh(shape, ("b", "k", "s"))
  return sh.CacheLayout(mesh, batch=axes[0], heads=axes[1], seq=axes[2])


def data(r, cfg):
  k = r.standard_normal((B, K, S, H)).astype(np.float32) + 0.3
  v = r.standard_normal((B, K, S, H)).astype(np.float32)
  k[:, :, :, :2] *= 6.0  # two outlier channels per head
  k1 = r.standard_normal((B, K, APPEND_T, H)).astype(np.float32)
  v1 = r.standard_normal((B, K, APPEND_T, H)).astype(np.float32)
  q = r.standard_normal((B, K * G, CHUNK, H)).astype(np.float32)
  return k, v, k1, v1, q


def unsharded_step(cache, k, v, k1, v1):
  return C.append(ops.prefill(cache, k, v, jnp.asarray(PREFILL), implementation="xla"), k1, v1, jnp.asarray(NUM_NEW))


def rewrite(cache, k, v, k1, v1):
  """The unsharded write (prefill tokens, then the append) into `cache`'s stores emptied, with its
  key mean and channel permutations: the reference for the codes of a sharded prefill, whose key
  mean is a psum of per-shard sums."""
  empty = lambda s: dataclasses.replace(s, main=jax.tree.map(jnp.zeros_like, s.main),
                                        outlier=jax.tree.map(jnp.zeros_like, s.outlier))
  fresh = dataclasses.replace(cache, k=empty(cache.k), v=empty(cache.v), lengths=jnp.zeros_like(cache.lengths))
  return C.append(C.append(fresh, k, v, jnp.asarray(PREFILL)), k1, v1, jnp.asarray(NUM_NEW))


def check(r, cfg_name: str, layout_name: str, ref_fns) -> None:
  cfg = CONFIGS[cfg_name]
  shape, axes = LAYOUTS[layout_name]
  layout = make_layout(shape, axes)
  k, v, k1, v1, q = data(r, cfg)
  empty = C.init_cache(cfg, B, K, S)
  want_cache = ref_fns["write"](empty, k, v, k1, v1)

  def step(cache, k, v, k1, v1, q):
    cache = sh.prefill(cache, k, v, jnp.asarray(PREFILL), layout=layout)
    cache = sh.append(cache, k1, v1, jnp.asarray(NUM_NEW), layout=layout)
    return (cache, sh.attention(cache, q[:, :, 0], layout=layout, soft_cap=SOFT_CAP),
            sh.chunked_attention(cache, q, layout=layout, soft_cap=SOFT_CAP, sliding_window=SLIDING))

  t0 = time.perf_counter()
  got_cache, o, o_win = jax.jit(step)(sh.shard_cache(empty, layout), k, v, k1, v1, q)
  got_cache = jax.device_get(got_cache)
  name = f"{layout_name} mesh {shape} / {cfg_name}"
  # write: per-sequence data exact, key mean within reassociation, codes exact given that mean
  same_exact(f"{name}: lengths", got_cache.lengths, want_cache.lengths)
  for part in ("k", "v"):
    if getattr(got_cache, part).perm is not None:
      same_exact(f"{name}: {part} channel permutation", getattr(got_cache, part).perm, getattr(want_cache, part).perm)
  if cfg.window:
    same_exact(f"{name}: window ring", (got_cache.window_k, got_cache.window_v), (want_cache.window_k, want_cache.window_v))
  if cfg.center_keys:  # a sum of S terms in another order: ≤ S·eps relative to Σ|k| / count
    bound = S * EPS32 * np.abs(k).max()
    close(f"{name}: key mean", got_cache.key_mean, want_cache.key_mean, bound)
  # With centred keys the reference write uses the sharded key mean; else it is the unsharded write itself.
  ref = ref_fns["rewrite"](got_cache, k, v, k1, v1) if cfg.center_keys else want_cache
  flipped = same_codes(f"{name}: codes and norms", got_cache, ref)
  # read: the unsharded attention of the same cache
  v_max = float(np.linalg.norm(v, axis=-1).max() * 1.01)  # ‖v̂‖ ≤ ‖v‖·(1 + quantization error)
  want_o, want_win = ref_fns["attend"](got_cache, q)
  tol = reassociation_tol(S, layout.shards(layout.seq), 1024, H, v_max)
  e1 = close(f"{name}: attention", o, want_o, tol)
  e2 = close(f"{name}: chunked attention, sliding window {SLIDING}", o_win, want_win, tol)
  print(f"ok {name}: attention max |diff| {max(e1, e2):.2g} (tol {tol:.2g}); tokens with a code at a "
        f"boundary {flipped}; {time.perf_counter() - t0:.1f} s", flush=True)


def check_kernel(r) -> None:
  """The Triton decode kernel (interpret mode) as each shard's partial, against the unsharded
  reference attention of the same cache."""
  cfg = CONFIGS["mse"]
  for layout_name in ("batch x heads x seq",):
    shape, axes = LAYOUTS[layout_name]
    layout = make_layout(shape, axes)
    k, v, k1, v1, q = data(r, cfg)
    cache = sh.append(sh.prefill(sh.shard_cache(C.init_cache(cfg, B, K, S), layout), k, v, jnp.asarray(PREFILL),
                                 layout=layout), k1, v1, jnp.asarray(NUM_NEW), layout=layout)
    fn = dispatch.decode_partial_fn(cache, G, interpret=True)
    q = q[:, :, 0]
    got = jax.jit(lambda c, q: sh.attention(c, q, layout=layout, soft_cap=SOFT_CAP, partial_fn=fn))(cache, q)
    want = jax.jit(lambda c, q: ops.attention(c, q, soft_cap=SOFT_CAP, implementation="xla"))(jax.device_get(cache), q)
    v_max = float(np.linalg.norm(v, axis=-1).max() * 1.01)
    tol = reassociation_tol(S, layout.shards(layout.seq), 16, H, v_max)
    err = close(f"{layout_name}: Triton kernel (interpret) per shard", got, want, tol)
    print(f"ok {layout_name} mesh {shape}: Triton kernel (interpret) per shard, check_vma=False: "
          f"max |diff| {err:.2g} (tol {tol:.2g})", flush=True)


def check_million(r) -> None:
  """2^20 slots of head_dim 16 over 8 devices: prefill of ~1M tokens, an append, decode attention
  sharded vs unsharded, and the bytes each device holds."""
  s, h, kh, g = 1 << 20, 16, 1, 2
  cfg = C.CacheConfig(head_dim=h, k_bits=4, v_bits=4)
  layout = sh.CacheLayout(jax.make_mesh((DEVICES,), ("s",)), seq="s")
  lengths = jnp.asarray([s - 5], jnp.int32)
  k = jnp.asarray(r.standard_normal((1, kh, s, h)), jnp.float32)
  # A ramp over positions makes the output O(1) and tied to where each token sits: a shard
  # dropped or merged with the wrong weight moves it by ~1/8.
  ramp = np.linspace(0.0, 4.0, s, dtype=np.float32)[None, None, :, None]
  v = jnp.asarray(r.standard_normal((1, kh, s, h)) + ramp, jnp.float32)
  q = jnp.asarray(r.standard_normal((1, kh * g, h)), jnp.float32)
  t0 = time.perf_counter()
  cache = jax.jit(lambda c, k, v: sh.prefill(c, k, v, lengths, layout=layout))(
      sh.shard_cache(C.init_cache(cfg, 1, kh, s), layout), k, v)
  cache = jax.jit(lambda c, k, v: sh.append(c, k, v, layout=layout))(cache, k[:, :, :1], v[:, :, :1])
  o = jax.jit(lambda c, q: sh.attention(c, q, layout=layout))(cache, q)
  o.block_until_ready()
  t_sharded = time.perf_counter() - t0
  per_device = {}
  for leaf in jax.tree.leaves(cache):
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  want = jax.jit(lambda c, q: ops.attention(c, q, implementation="xla"))(jax.device_get(cache), q)
  tol = reassociation_tol(s, DEVICES, 1024, h, float(np.linalg.norm(np.asarray(v), axis=-1).max() * 1.01))
  err = close("1M slots", o, want, tol)
  assert int(cache.lengths[0]) == s - 4
  # Per device: 1/8 of the per-token arrays; lengths, key mean and quantizer constants replicated.
  replicated = cache.lengths.nbytes + cache.key_mean.nbytes
  want_bytes = (C.nbytes(cache) - replicated) // DEVICES + replicated + C.constants_nbytes(cache)
  assert set(per_device.values()) == {want_bytes}, (per_device, want_bytes)
  assert float(np.abs(np.asarray(want)).max()) > 0.1  # the ramp's mean position is in the output
  print(f"ok 1M slots (2^20, head_dim {h}) over {DEVICES} devices: {want_bytes} bytes per device "
        f"(cache {C.nbytes(cache)} B in all + {C.constants_nbytes(cache)} B constants per device); "
        f"sharded prefill+append+attention {t_sharded:.1f} s; max |diff| {err:.2g} (tol {tol:.2g})", flush=True)


def main() -> None:
  assert jax.device_count() == DEVICES, f"needs XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}"
  r = np.random.default_rng(0)
  if "--million" in sys.argv:
    check_million(r)
    return
  if "--kernel" in sys.argv:
    check_kernel(r)
    return
  ref_fns = {
      "write": jax.jit(unsharded_step),
      "rewrite": jax.jit(rewrite),
      "attend": jax.jit(lambda c, q: (ops.attention(c, q[:, :, 0], soft_cap=SOFT_CAP, implementation="xla"),
                                      ops.chunked_attention(c, q, soft_cap=SOFT_CAP, sliding_window=SLIDING,
                                                            implementation="xla"))),
  }
  if "--configs" in sys.argv:  # the other cache classes on the layouts that split slots
    cases = [(c, l) for l in ALL_CONFIG_LAYOUTS for c in CONFIGS if c != "mse"]
  else:  # every layout with the mse cache
    cases = [("mse", l) for l in LAYOUTS]
  for cfg_name, layout_name in cases:
    check(r, cfg_name, layout_name, ref_fns)


if __name__ == "__main__":
  main()
