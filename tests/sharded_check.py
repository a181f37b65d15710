"""tqjax under shard_map and under jit with sharded inputs, on 4 CPU devices (run by
tests/test_sharding.py in a process of its own: the device count is fixed when jax starts): the
quantizer, the cache's XLA paths, the Triton decode kernel (interpret mode) and the Flax layer.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_check.py

Each check compares a sharded computation with the same one unsharded: codes bit for bit, floats
within float32 rounding (1e-5 relative, or one unit of a float16 / bfloat16 leaf: sharding
changes only how XLA fuses, not the math). Exits
non-zero (an AssertionError) on the first difference; prints one line per check.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


import tqjax
from flax import nnx
from pallas_kernels import dispatch
from kernel_paths import pallas_attention
from tqjax import cache as C
from tqjax import ops as tq_ops
from tqjax import nn as tnn

DEVICES = 4
CONFIGS = [  # centred keys (a per-sequence key mean); prod keys with outlier channels and a window
    C.CacheConfig(head_dim=64, k_bits=3, v_bits=2),
    C.CacheConfig(head_dim=64, k_bits=4, v_bits=3, k_variant="prod", outlier_channels=4, window=16),
]
RTOL = 1e-5


def same(name: str, got, want) -> None:
  """Equal pytrees: integer leaves bit for bit, float leaves within RTOL (and NaN-free)."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
    if np.issubdtype(g.dtype, np.integer):
      np.testing.assert_array_equal(g, w, err_msg=name)
    else:  # float16 / bfloat16 leaves (norms) may round a float32 that moved by an ulp to the next value
      assert not np.isnan(g).any(), name
      rtol = max(RTOL, float(jnp.finfo(g.dtype).eps))
      g, w = g.astype(np.float64), w.astype(np.float64)
      np.testing.assert_allclose(g, w, rtol=rtol, atol=RTOL * float(np.abs(w).max()), err_msg=name)
  print(f"ok {name}", flush=True)


def put(mesh, x, spec):
  """x placed on the mesh as spec says."""
  return jax.device_put(x, NamedSharding(mesh, spec))


def check_quantizer(mesh, r) -> None:
  """encode / decode / estimate_ip over a leading axis sharded 4 ways, mse and prod."""
  x = jnp.asarray(r.standard_normal((8, 5, 64)), jnp.float32)
  q = jnp.asarray(r.standard_normal((8, 1, 64)), jnp.float32)
  for variant, bits in (("mse", 3), ("prod", 4)):
    tq = tqjax.make_quantizer(64, bits, variant, seed=1)

    def f(x, q, tq=tq):
      code = tqjax.encode(tq, x)
      return code, tqjax.decode(tq, code), tqjax.estimate_ip(tq, q, code)

    sharded = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x")))
    got = sharded(put(mesh, x, P("x")), put(mesh, q, P("x")))
    same(f"shard_map encode/decode/estimate_ip {variant}{bits}", got, jax.jit(f)(x, q))


def check_cache(mesh, r, cfg: C.CacheConfig) -> None:
  """prefill, append and decode attention (XLA, and the Triton kernel in interpret mode where it
  supports the cache) of a cache whose sequences are sharded 4 ways, under shard_map and under
  jit with NamedSharding."""
  b, kh, hq, s, d = 8, 2, 4, 300, cfg.head_dim
  k = jnp.asarray(r.standard_normal((b, kh, s, d)) + 0.3, jnp.float32)
  v = jnp.asarray(r.standard_normal((b, kh, s, d)), jnp.float32)
  lengths = jnp.asarray(r.integers(1, s - 20, b), jnp.int32)
  k1 = jnp.asarray(r.standard_normal((b, kh, 1, d)), jnp.float32)
  v1 = jnp.asarray(r.standard_normal((b, kh, 1, d)), jnp.float32)
  q = jnp.asarray(r.standard_normal((b, hq, d)), jnp.float32)
  empty = C.init_cache(cfg, b, kh, s)
  specs = C.partition_specs(empty)
  name = f"K{cfg.k_bits}{cfg.k_variant}/V{cfg.v_bits} outliers {cfg.outlier_channels} window {cfg.window}"

  def step(cache, k, v, lengths, k1, v1, q):  # the XLA paths
    cache = C.append(tq_ops.prefill(cache, k, v, lengths), k1, v1)
    return cache, tq_ops.attention(cache, q, implementation="xla", soft_cap=30.0)

  kernel = lambda cache, q: pallas_attention(cache, q, soft_cap=30.0, interpret=True)
  want = jax.jit(step)(empty, k, v, lengths, k1, v1, q)
  kernel_runs = dispatch.supports(empty, "gpu")[0]
  if kernel_runs:
    same(f"{name}: kernel (interpret) vs XLA, unsharded", jax.jit(kernel)(want[0], q), want[1])
  args = (jax.tree.map(lambda x, spec: put(mesh, x, spec), empty, specs),) + tuple(
      put(mesh, x, P("x")) for x in (k, v, lengths, k1, v1, q))
  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs,) + (P("x"),) * 6, out_specs=(specs, P("x"))))
  got = sharded(*args)
  same(f"{name}: shard_map prefill/append/attention", got, want)
  if kernel_runs:  # a Pallas kernel's outputs carry no mesh axes: shard_map needs check_vma=False around it
    sharded = jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=(specs, P("x")), out_specs=P("x"), check_vma=False))
    same(f"{name}: shard_map kernel (interpret, check_vma=False)", sharded(got[0], args[-1]), want[1])
  got = jax.jit(step)(*args)
  assert got[1].sharding.spec[0] == "x", got[1].sharding  # the output stays sharded over sequences
  same(f"{name}: jit with NamedSharding inputs", got, want)


def check_flax(mesh, r, cfg: C.CacheConfig) -> None:
  """The Flax NNX layer, data-parallel: prefill (ragged lengths) then a decode step under jit, its
  parameters replicated and its cache (`partition_specs`) and inputs sharded over the batch."""
  b, t, f = 8, 12, 128
  layer = tnn.TurboQuantAttention(f, 4, 2, cfg.head_dim, cache_config=cfg, rope_base=1e4, soft_cap=30.0,
                                  rngs=nnx.Rngs(0))
  layer.init_cache(batch_size=b, capacity=32)
  x = jnp.asarray(r.standard_normal((b, t, f)), jnp.float32)
  x1 = jnp.asarray(r.standard_normal((b, 1, f)), jnp.float32)
  lengths = jnp.asarray(r.integers(1, t + 1, b), jnp.int32)
  graphdef, params, cache = nnx.split(layer, nnx.Param, nnx.Cache)

  def run(params, cache, x, lengths, x1):
    model = nnx.merge(graphdef, params, cache)
    y = model(x, mode="prefill", lengths=lengths)
    y1 = model(x1, mode="decode")
    return y, y1, nnx.state(model, nnx.Cache)

  want = jax.jit(run)(params, cache, x, lengths, x1)
  layer.kv_cache.set_value(jax.tree.map(lambda a, spec: put(mesh, a, spec), layer.cache, C.partition_specs(layer.cache)))
  _, params, cache = nnx.split(layer, nnx.Param, nnx.Cache)
  params = jax.tree.map(lambda a: put(mesh, a, P()), params)
  got = jax.jit(run)(params, cache, *(put(mesh, a, P("x")) for a in (x, lengths, x1)))
  assert got[1].sharding.spec[0] == "x", got[1].sharding  # the decode output stays sharded over the batch
  same(f"flax layer K{cfg.k_bits}{cfg.k_variant}/V{cfg.v_bits}: jit with NamedSharding inputs", got, want)


def main() -> None:
  assert jax.device_count() == DEVICES, f"needs XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}"
  for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
    print(f"mesh axis type {axis_type}", flush=True)
    mesh = jax.make_mesh((DEVICES,), ("x",), axis_types=(axis_type,))
    r = np.random.default_rng(0)
    check_quantizer(mesh, r)
    for cfg in CONFIGS:
      check_cache(mesh, r, cfg)
      check_flax(mesh, r, cfg)


if __name__ == "__main__":
  main()
