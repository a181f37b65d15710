"""Decode-kernel design space on a GPU: every (form, dots, dtype, block) variant of
`pallas_kernels.decode_attention_gpu` checked against the XLA oracle and timed against cuDNN bf16
in one process, at B=8, Hq=32, Hkv=8, D=128, S=32k (the decode benchmark's shape).

  python -m experiments.kernel_variants [--only NAME,NAME] [--configs K3/V3,K4/V4]

Prints a table and writes experiments/results/kernel_variants_<device>_<date>.md. The kernel's
defaults are chosen from these tables.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import jax
import jax.numpy as jnp


from experiments import harness
from experiments.bench_decode import (
    CONFIGS, bench, cache_read_bytes, check_case, config_case, copy_bandwidth, cudnn_attention, pallas_attention,
    random_cache)
from tqjax import cache as C
from tqjax import partials as tq_partials

__all__ = ["VARIANTS", "main"]


VARIANTS = {  # forms measured on 2026-11-27 and not in the kernel are in the results files
    "tf32 st2": dict(num_stages=2),
    "tf32 st3": dict(num_stages=3),
    "tf32 st4": dict(num_stages=4),
    "bf16 st3": dict(dot_dtype="bfloat16", num_stages=3),
    "bf16 st4": dict(dot_dtype="bfloat16", num_stages=4),
    "bf16 st4 splits32": dict(dot_dtype="bfloat16", num_stages=4, num_splits=32),
}



def check(cname: str, options: dict) -> float:
  """Relative error of the compiled variant vs the float32 XLA oracle (NaN if it produced any)."""
  err, nan = check_case(config_case(cname, 128, 3001), 5, **options)
  return float("nan") if nan else err


def main(argv=None) -> None:
  ap = harness.parser(__doc__)
  ap.add_argument("--only", default="", help="comma list of variant names")
  ap.add_argument("--configs", default="K3/V3")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--seq", type=int, default=32768)
  ap.add_argument("--hlo", default="", help="write the compiled HLO of the first variant here and time its parts")
  ap.add_argument("--once", action="store_true", help="run each variant once, untimed (for ncu / IR dumps)")
  args = ap.parse_args(argv)
  names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
  dev = jax.devices()[0]
  date = datetime.date.today().isoformat()
  b, hq, kh, d, s = 8, 32, 8, 128, args.seq
  if args.hlo:  # what XLA runs around the kernel: compiled HLO of one decode step, and its parts timed
    cfg = C.CacheConfig(head_dim=d, **CONFIGS[args.configs.split(",")[0]])
    caches = [random_cache(cfg, b, kh, s, seed=i) for i in range(2)]
    qs = [jax.random.normal(jax.random.key(i), (b, hq, d), jnp.float32) for i in range(2)]
    opts = VARIANTS[names[0]]
    full = jax.jit(lambda c, q: pallas_attention(c, q, **opts))
    Path(args.hlo).write_text(full.lower(caches[0], qs[0]).compile().as_text())
    from pallas_kernels import decode_attention_gpu as K  # noqa: PLC0415

    def kernel_only(c, q):
      qg = q.reshape(b, kh, hq // kh, 1, d)
      pq = tq_partials.prepare_query(c, qg, 1.0 / math.sqrt(d))
      lo, hi = tq_partials.query_ranges(c, 1, None)
      return K.decode_partial(c, pq, lo, hi, **{k: v for k, v in opts.items()})

    for label, fn in (("full attention", full), ("decode_partial", kernel_only)):
      us = bench(fn, list(zip(caches, qs)), reps=args.reps)
      print(f"{names[0]}: {label} {us:.1f} µs", flush=True)
    return
  if args.once:
    for cname in args.configs.split(","):
      cache = random_cache(C.CacheConfig(head_dim=d, **CONFIGS[cname]), b, kh, s, seed=0)
      q = jax.random.normal(jax.random.key(0), (b, hq, d), jnp.float32)
      for name in names:
        jax.block_until_ready(jax.jit(lambda c, q, o=VARIANTS[name]: pallas_attention(c, q, **o))(cache, q))
        print(f"ran {cname} {name}", flush=True)
    return
  copy_us, copy_tbs = copy_bandwidth(2048 * 2**20, args.reps)
  print(f"{dev.device_kind}, jax {jax.__version__}, {date}: copy {copy_tbs:.3f} TB/s", flush=True)
  nbuf = 2
  key = jax.random.key(0)
  lengths = jnp.full((b,), s, jnp.int32)
  qs = [jax.random.normal(jax.random.fold_in(key, i), (b, hq, d), jnp.float32) for i in range(nbuf)]
  kv = [(jax.random.normal(jax.random.fold_in(key, 10 + i), (b, s, kh, d), jnp.bfloat16),
         jax.random.normal(jax.random.fold_in(key, 20 + i), (b, s, kh, d), jnp.bfloat16)) for i in range(nbuf)]
  cudnn_us = bench(cudnn_attention, [(q.astype(jnp.bfloat16), k, v, lengths) for q, (k, v) in zip(qs, kv)], reps=args.reps)
  del kv
  print(f"cuDNN bf16: {cudnn_us:.1f} µs", flush=True)
  rows = [("cuDNN bf16", "", cudnn_us, 2 * b * kh * s * d * 2, None)]
  for cname in args.configs.split(","):
    cfg = C.CacheConfig(head_dim=d, **CONFIGS[cname])
    caches = [random_cache(cfg, b, kh, s, seed=i) for i in range(nbuf)]
    nbytes = cache_read_bytes(caches[0])
    for name in names:
      opts = VARIANTS[name]
      try:
        err = check(cname, opts)
        us = bench(lambda c, q, o=opts: pallas_attention(c, q, **o), list(zip(caches, qs)), reps=args.reps)
      except Exception as e:  # noqa: BLE001 — a variant that fails to compile is a result too
        print(f"{cname} {name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        continue
      rows.append((name, cname, us, nbytes, err))
      print(f"{cname:10s} {name:28s} {us:8.1f} µs  {nbytes / us / 1e6:6.3f} TB/s  {cudnn_us / us:5.2f}× cuDNN  "
            f"err {err:.1e}", flush=True)
  md = [f"# Decode kernel variants — {dev.device_kind}, {date}", "",
        f"jax {jax.__version__}; B={b}, Hq={hq}, Hkv={kh}, D={d}, S={s}; median of {args.reps}; "
        f"copy bandwidth {copy_tbs:.3f} TB/s (x + 1, read + write).", "",
        "| variant | config | µs | bytes read (MB) | TB/s | % copy | × cuDNN bf16 | rel. err vs XLA oracle |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, cname, us, nbytes, err in rows:
    tbs = nbytes / us / 1e6
    md.append(f"| {name} | {cname} | {us:.1f} | {nbytes / 1e6:.1f} | {tbs:.3f} | {100 * tbs / copy_tbs:.1f} | "
              f"{cudnn_us / us:.2f} | {'' if err is None else f'{err:.1e}'} |")
  print("\n".join(md))
  out = harness.out_dir(args) / f"kernel_variants_{dev.device_kind.replace(' ', '_')}_{date}.md"
  with out.open("a") as f:
    f.write("\n".join(md) + "\n\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
