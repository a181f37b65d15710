"""Where prefill encode time goes on a GPU: the full `tqjax.ops.prefill` (XLA encode and the fused
Pallas encode kernel) and each XLA encode stage, against a bf16 read + write of the same K/V (the
target: encode ≤ 2× that copy).

Run: python -m experiments.bench_encode [--quick] [--sweep] [--pipelined N]   (GPU: a few minutes;
--quick: a CPU smoke run of about a minute)
--sweep adds kernel-option rows (block_t, num_warps, num_stages, precision) for tuning,
on centred keys (the heavier path: x − mean is split into two bf16 dot operands).
--pipelined N: each sample is N jitted calls issued back to back, so it measures the device and
hides the host's per-call overhead (~120 µs with a Mosaic GPU kernel; see `bench_decode.bench`).
On CPU (--quick) the kernel runs in Pallas interpret mode: its rows check plumbing, not speed.
Writes bench_encode_<device>_<date>[_quick][_pipelinedN].{md,json} into --out (see experiments/harness.py).
"""

from __future__ import annotations

import datetime

import jax
import jax.numpy as jnp

from experiments import bench_decode, harness
from pallas_kernels import dispatch, encode_gpu, encode_mgpu
from tqjax import cache as C
from tqjax import ops as tq_ops
from tqjax import codebook, packing, quantizer, rotation


def pallas_prefill(cache, k, v, **kernel_options):
  """`tqjax.cache.prefill_with_encoder` with the fused encoder `dispatch.prefill_encoder` picks."""
  return C.prefill_with_encoder(cache, k, v, encoder=dispatch.prefill_encoder(cache, (k.dtype, v.dtype), **kernel_options))


def main(argv=None) -> None:
  ap = harness.parser(__doc__)
  ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--sweep", action="store_true", help="also time kernel options (block_t, warps, ...)")
  ap.add_argument("--pipelined", type=int, default=0, metavar="N", help="N calls back to back per sample")
  args = ap.parse_args(argv)
  out = harness.out_dir(args)
  st = harness.stamp()
  bench_decode.PIPELINE = args.pipelined
  interpret = jax.default_backend() != "gpu"
  if interpret:
    print("note: no GPU; the fused-kernel rows run in Pallas interpret mode (not a speed measurement)")
  tag = " [interpret]" if interpret else ""
  b, kh, t, d = (2, 2, 512, 64) if args.quick else (8, 8, 32768, 128)
  kk = jax.random.normal(jax.random.key(7), (b, kh, t, d), jnp.bfloat16)
  vv = jax.random.normal(jax.random.key(8), (b, kh, t, d), jnp.bfloat16)
  device = jax.devices()[0].device_kind
  rows = []

  def row(name, fn, sets):
    us = bench_decode.bench(fn, sets, reps=args.reps)
    rows.append((name, us))
    print(f"{name:55s} {us:10.1f} µs", flush=True)

  row("bf16 read+write of K and V (k + 1, v + 1)", lambda k, v: (k + 1, v + 1), [(kk, vv)])
  count = jnp.full((b,), t, jnp.int32)
  row("key mean alone (prefill's centring: a float32 sum over tokens)",
      lambda k: C._masked_mean(k.astype(jnp.float32), count), [(kk,)])
  for bits in (4, 3):
    cfg = C.CacheConfig(head_dim=d, k_bits=bits, v_bits=bits)
    empty = C.init_cache(cfg, b, kh, t)
    row(f"prefill K{bits}/V{bits} (encode K and V, write the cache), xla",
        lambda c, k, v: tq_ops.prefill(c, k, v, implementation="xla"), [(empty, kk, vv)])
    row(f"prefill K{bits}/V{bits} (encode K and V, write the cache), pallas{tag}",
        lambda c, k, v: pallas_prefill(c, k, v, interpret=interpret), [(empty, kk, vv)])
    # The rows above write into a cache passed in (not donated: XLA copies it); a prefill that
    # starts the cache in the same call writes the codes straight into the new buffers.
    row(f"prefill K{bits}/V{bits} into a cache made in the same call, pallas{tag}",
        lambda k, v, cfg=cfg: pallas_prefill(C.init_cache(cfg, b, kh, t), k, v, interpret=interpret), [(kk, vv)])
    if not interpret:  # kernel options select the Triton kernel (the default above is Mosaic GPU on Hopper)
      row(f"prefill K{bits}/V{bits}, pallas with the Triton encode",
          lambda c, k, v: pallas_prefill(c, k, v, num_warps=4), [(empty, kk, vv)])
  cfg = C.CacheConfig(head_dim=d, k_bits=3, v_bits=3, k_variant="prod")
  empty = C.init_cache(cfg, b, kh, t)
  row("prefill K3 prod/V3, xla", lambda c, k, v: tq_ops.prefill(c, k, v, implementation="xla"), [(empty, kk, vv)])
  row(f"prefill K3 prod/V3, pallas{tag}", lambda c, k, v: pallas_prefill(c, k, v, interpret=interpret),
      [(empty, kk, vv)])
  tq = quantizer.make_quantizer(d, 3, "mse", norm_correction=True, norm_dtype="float16")
  row("encode K alone, 3-bit mse+nc, xla", lambda x: quantizer.encode(tq, x), [(kk,)])
  row(f"encode K alone, 3-bit mse+nc, fused kernel{tag}",
      lambda x: encode_gpu.encode(tq, x, interpret=interpret), [(kk,)])
  mean = jnp.mean(kk.astype(jnp.float32), axis=2)
  row(f"encode K alone, 3-bit mse+nc, fused kernel, centred (mean input){tag}",
      lambda x, m: encode_gpu.encode(tq, x, m, interpret=interpret), [(kk, mean)])
  row(f"encode V alone, 3-bit mse+nc, fused kernel{tag}", lambda x: encode_gpu.encode(tq, x, interpret=interpret),
      [(vv,)])
  if not interpret:
    row("encode K alone, 3-bit mse+nc, Mosaic GPU kernel, centred", lambda x, m: encode_mgpu.encode(tq, x, m),
        [(kk, mean)])
    row("encode V alone, 3-bit mse+nc, Mosaic GPU kernel", lambda x: encode_mgpu.encode(tq, x), [(vv,)])
  code = encode_gpu.encode(tq, kk, mean, interpret=interpret)
  store = C.init_cache(C.CacheConfig(head_dim=d, k_bits=3, v_bits=3), b, kh, t).k.main
  ok = jnp.ones((b, t), bool)
  row("write K's codes and scales into the cache (prefill's slice update)",
      lambda c, n, src: jax.tree_util.tree_map(lambda dst, x: C.write_prefix(dst, x, ok), (c, n), src),
      [(store.codes, store.norms, (code.codes, code.norms))])
  if args.sweep:
    tq4 = quantizer.make_quantizer(d, 4, "mse", norm_correction=True, norm_dtype="float16")
    for bt in (64, 128):  # 32 rows would leave half of each 64-row wgmma idle with 4 warps
      for nw in (4, 8):
        for stages in (2, 3):
          for prec in ("high", "tf32"):
            opts = dict(block_t=bt, num_warps=nw, num_stages=stages, precision=prec)
            name = ", ".join(f"{k}={v}" for k, v in opts.items())
            try:
              row(f"encode K alone, 4-bit, centred, kernel {name}{tag}",
                  lambda x, m, o=opts: encode_gpu.encode(tq4, x, m, interpret=interpret, **o), [(kk, mean)])
            except jax.errors.JaxRuntimeError as e:  # e.g. shared memory exceeded: a result, not a crash
              print(f"kernel {name}: failed to run: {str(e).splitlines()[0][:200]}", flush=True)
    if not interpret:
      for bits_, t_ in ((3, tq), (4, tq4)):
        for wgs, stages in ((2, 2), (2, 3), (3, 2), (3, 3), (4, 2)):  # 4 x 3 stages: > 227 KB of SMEM
          row(f"encode K alone, {bits_}-bit, centred, Mosaic GPU wgs={wgs} stages={stages}",
              lambda x, m, w=wgs, s=stages, q=t_: encode_mgpu.encode(q, x, m, wgs=w, stages=s), [(kk, mean)])
  kf = kk.astype(jnp.float32)
  for prec in ("HIGHEST", "HIGH", "DEFAULT"):
    p = getattr(jax.lax.Precision, prec)
    row(f"rotate K alone (f32 einsum, precision {prec})",
        lambda x, p=p: jnp.einsum("...j,ij->...i", x, tq.rotation.matrix, precision=p), [(kf,)])
  y = rotation.rotate(tq.rotation, kf / jnp.linalg.norm(kf, axis=-1, keepdims=True))
  for method in ("compare_all", "scan_unrolled"):
    row(f"searchsorted K alone ({method})",
        lambda y, m=method: jnp.searchsorted(tq.codebook.boundaries, y, method=m).astype(jnp.uint8), [(y,)])
  idx = codebook.quantize(tq.codebook, y)
  row("pack K alone (3-bit)", lambda i: packing.pack(i, 3), [(idx,)])

  copy = rows[0][1]
  date = datetime.date.today().isoformat()
  md = [f"# Prefill encode breakdown — {device}, {date}", "", harness.stamp_line(st), "",
        f"jax {jax.__version__}; K, V bf16 [B={b}, Hkv={kh}, T={t}, D={d}]; median µs per call"
        + (f" ({args.pipelined} calls dispatched back to back per sample)." if args.pipelined else
           f" over {args.reps} reps, each synchronized (host dispatch included)."), "",
        "| stage | µs | × bf16 read+write |", "| --- | ---: | ---: |"]
  md += [f"| {n} | {us:.1f} | {us / copy:.2f} |" for n, us in rows]
  print("\n".join(md))
  suffix = ("_quick" if args.quick else "") + (f"_pipelined{args.pipelined}" if args.pipelined else "")
  stem = f"bench_encode_{device.replace(' ', '_')}_{date}{suffix}"
  data = dict(stamp=st, shape=dict(B=b, K=kh, S=t, H=d), pipelined=args.pipelined, reps=args.reps,
              rows=[dict(stage=n, us=us, vs_copy=us / copy) for n, us in rows])
  for path in harness.write(out, stem, "\n".join(md) + "\n", data):
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
