"""One decode step over a compressed cache whose slots are split over 1, 2, 4, ... devices
(`tqjax.sharding`, a `seq` layout): strong scaling (fixed total S), weak scaling (fixed S per
device), the cross-device merge (`merge_over_axis`: pmax + psum) timed on its own, and one
device's bf16 attention over the uncompressed cache as the baseline where it fits (cuDNN on a
GPU: `jax.nn.dot_product_attention(implementation="cudnn")`; XLA elsewhere).

  python -m experiments.bench_sharded            # the GPUs (or CPUs) jax sees; S up to 1M
  python -m experiments.bench_sharded --quick    # 8 fake CPU devices, small sizes: ~1-3 min on 2 cores

Writes a markdown table (device count, card, date, commit) where --out says and prints
it. The cache holds random codes (timing does not depend on their values); every slot is
attended. Per-shard partial: the fused kernel of `pallas_kernels.dispatch` where one serves the
cache on this backend (inside shard_map with check_vma off), else the XLA reference.
"""

from __future__ import annotations

import os
import sys
import statistics
import time

from experiments import harness


def parse_args(argv=None):
  p = harness.parser(__doc__)
  p.add_argument("--quick", action="store_true", help="8 fake CPU devices and small sizes (~1-3 min on 2 cores)")
  p.add_argument("--devices", type=int, nargs="+", help="device counts to run (default: 1, 2, 4, ... up to all)")
  p.add_argument("--strong-s", type=int, nargs="+", help="total slots for strong scaling (default 131072 1048576)")
  p.add_argument("--weak-s", type=int, help="slots per device for weak scaling (default 131072)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--q-heads", type=int, default=32)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--k-bits", type=int, default=4)
  p.add_argument("--v-bits", type=int, default=4)
  p.add_argument("--iters", type=int, default=20, help="timed calls per point (median reported)")
  p.add_argument("--implementation", choices=("auto", "xla", "pallas"), default="auto")
  args = p.parse_args(argv)
  if args.quick:
    args.devices = args.devices or [1, 2, 4, 8]
    args.strong_s = args.strong_s or [16384]
    args.weak_s = args.weak_s or 2048
    args.kv_heads, args.q_heads, args.head_dim, args.iters = 2, 8, 64, 5
  args.strong_s = args.strong_s or [131072, 1048576]
  args.weak_s = args.weak_s or 131072
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.quick:  # before jax starts: the device count is fixed then
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: PLC0415

  rows = run(jax, args)
  write(jax, args, rows)


def _time(fn, *xs, iters: int) -> float:
  """Median wall time (ms) of fn(*xs) over iters calls, after one warm-up (compile)."""
  import jax  # noqa: PLC0415

  jax.block_until_ready(fn(*xs))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*xs))
    ts.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(ts)


def random_cache(jax, cfg, args, s: int, layout):
  """A full cache (lengths = S) of random codes and unit norms, made sharded as `layout` says."""
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding  # noqa: PLC0415

  from tqjax import cache as C  # noqa: PLC0415
  from tqjax import sharding as sh  # noqa: PLC0415

  shape = jax.eval_shape(lambda: C.init_cache(cfg, args.batch, args.kv_heads, s))
  specs = sh.cache_specs(shape, layout)

  def make():
    cache = C.init_cache(cfg, args.batch, args.kv_heads, s)
    fill = lambda x: (jax.random.bits(jax.random.key(0), x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.unsignedinteger)
                      else jnp.ones_like(x))
    store = lambda st: type(st)(st.quantizer, jax.tree.map(fill, st.main), st.outlier_quantizer, st.outlier, st.perm)
    return type(cache)(cache.config, store(cache.k), store(cache.v), jnp.full_like(cache.lengths, s), cache.key_mean,
                       cache.window_k, cache.window_v)

  out = jax.tree.map(lambda sp: NamedSharding(layout.mesh, sp), specs)
  return jax.jit(make, out_shardings=out)()


def cache_bytes_per_device(jax, cache) -> int:
  per = {}
  for leaf in jax.tree.leaves(cache):
    for shard in leaf.addressable_shards:
      per[shard.device.id] = per.get(shard.device.id, 0) + shard.data.nbytes
  return max(per.values())


def run(jax, args) -> list[dict]:
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  from pallas_kernels import dispatch  # noqa: PLC0415
  from tqjax import cache as C  # noqa: PLC0415
  from tqjax import sharding as sh  # noqa: PLC0415

  n_all = jax.device_count()
  counts = args.devices or [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= n_all]
  cfg = C.CacheConfig(head_dim=args.head_dim, k_bits=args.k_bits, v_bits=args.v_bits)
  g = args.q_heads // args.kv_heads
  q = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, args.q_heads, args.head_dim)), jnp.float32)
  rows, baselines = [], {}
  points = [("strong", s, n) for s in args.strong_s for n in counts] + [("weak", args.weak_s * n, n) for n in counts]
  for mode, s, n in points:
    layout = sh.CacheLayout(jax.make_mesh((n,), ("s",), devices=jax.devices()[:n]), seq="s")
    cache = random_cache(jax, cfg, args, s, layout)
    impl = args.implementation
    if impl == "auto":
      impl = "pallas" if dispatch.supports(cache)[0] else "xla"
    fn = dispatch.decode_partial_fn(cache, g) if impl == "pallas" else None
    step = jax.jit(lambda c, q, layout=layout, fn=fn: sh.attention(c, q, layout=layout, partial_fn=fn))
    t_step = _time(step, cache, q, iters=args.iters)
    # the merge alone: partials of one decode step's shape on each device
    shape = (args.batch, args.kv_heads, g, 1)
    mesh = layout.mesh
    merge = jax.jit(jax.shard_map(lambda a, m, l: sh.merge_over_axis((a,), m, l, "s"), mesh=mesh,
                                  in_specs=(P("s"),) * 3, out_specs=((P(),), P(), P())))
    part = lambda *tail: jax.device_put(jnp.ones((n * shape[0], *shape[1:], *tail), jnp.float32),
                                        jax.sharding.NamedSharding(mesh, P("s")))
    t_merge = _time(merge, part(args.head_dim), part(), part(), iters=args.iters)
    if s not in baselines:
      baselines[s] = baseline(jax, args, s)
    rows.append(dict(mode=mode, devices=n, s=s, s_per_device=s // n, impl=impl, step_ms=t_step, merge_ms=t_merge,
                     bytes_per_device=cache_bytes_per_device(jax, cache), baseline_ms=baselines[s]))
    print(rows[-1], flush=True)
  return rows


def baseline(jax, args, s: int) -> float | None:
  """One device's bf16 attention of one query per sequence over S uncompressed tokens (ms), or
  None where the bf16 cache does not fit in 80% of the device's memory."""
  import jax.numpy as jnp  # noqa: PLC0415

  dev = jax.devices()[0]
  kv_bytes = 2 * args.batch * s * args.kv_heads * args.head_dim * 2
  limit = (dev.memory_stats() or {}).get("bytes_limit") if dev.platform == "gpu" else None
  if limit is not None and kv_bytes > 0.8 * limit:
    return None
  impl = "cudnn" if dev.platform == "gpu" else "xla"
  key = jax.random.key(1)
  k = jax.random.normal(key, (args.batch, s, args.kv_heads, args.head_dim), jnp.bfloat16)
  q = jax.random.normal(key, (args.batch, 1, args.q_heads, args.head_dim), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl))
  try:
    return _time(fn, q, k, k, iters=args.iters)
  except Exception as e:  # noqa: BLE001  (cuDNN refuses some shapes; the table shows — and this says why)
    print(f"baseline {impl} at S={s} did not run: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return None


def write(jax, args, rows) -> None:
  """Prints the table and writes bench_sharded_<device>.{md,json} where the harness says."""
  st = harness.stamp()
  dev = jax.devices()[0]
  card = "CPU (fake devices)" if args.quick else st["device"]
  base = "cuDNN bf16" if dev.platform == "gpu" else "XLA bf16"
  lines = [
      f"# Sequence-sharded decode: {card}, up to {max(r['devices'] for r in rows)} devices",
      "",
      harness.stamp_line(st),
      "",
      f"One decode step (q [B={args.batch}, N={args.q_heads}, H={args.head_dim}]) over a K{args.k_bits}/V{args.v_bits} "
      f"mse cache of {args.kv_heads} kv heads, every slot attended, slots split over the devices "
      f"(`tqjax.sharding`, seq layout). Median of {args.iters} calls. merge: `merge_over_axis` alone (pmax + psum). "
      f"baseline: one device's {base} attention over the uncompressed cache (— where it does not fit).",
      "",
      "| scaling | devices | S total | S / device | partial | step ms | merge ms | cache bytes / device | 1-device baseline ms |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    b = "—" if r["baseline_ms"] is None else f"{r['baseline_ms']:.3f}"
    lines.append(f"| {r['mode']} | {r['devices']} | {r['s']} | {r['s_per_device']} | {r['impl']} | {r['step_ms']:.3f} | "
                 f"{r['merge_ms']:.3f} | {r['bytes_per_device']} | {b} |")
  if args.quick:
    lines += ["", f"{jax.device_count()} fake CPU devices share the host's {os.cpu_count()} cores: these "
              "numbers test the script, not the scaling."]
  text = "\n".join(lines) + "\n"
  print(text)
  name = "CPU_fake_devices" if args.quick else card.replace(" ", "_")
  harness.write(harness.out_dir(args), f"bench_sharded_{name}", text, {"stamp": st, "rows": rows})

if __name__ == "__main__":
  main()
