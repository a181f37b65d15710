"""Where prefill encode time goes on a GPU: the full `tqjax.cache.prefill` and each encode stage,
against a bf16 read + write of the same K/V (the issue's target: encode ≤ 2× that copy).

Run: PYTHONPATH=. python experiments/bench_encode.py [--quick]
Writes experiments/results/bench_encode_<device>_<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_decode import bench  # noqa: E402
from tqjax import cache as C  # noqa: E402
from tqjax import codebook, packing, quantizer, rotation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
  ap.add_argument("--reps", type=int, default=20)
  args = ap.parse_args(argv)
  b, kh, t, d = (2, 2, 512, 64) if args.quick else (8, 8, 32768, 128)
  kk = jax.random.normal(jax.random.key(7), (b, kh, t, d), jnp.bfloat16)
  vv = jax.random.normal(jax.random.key(8), (b, kh, t, d), jnp.bfloat16)
  device = jax.devices()[0].device_kind
  rows = []

  def row(name, fn, sets):
    us = bench(fn, sets, reps=args.reps)
    rows.append((name, us))
    print(f"{name:55s} {us:10.1f} µs", flush=True)

  row("bf16 read+write of K and V (k + 1, v + 1)", lambda k, v: (k + 1, v + 1), [(kk, vv)])
  for bits in (4, 3):
    cfg = C.CacheConfig(head_dim=d, k_bits=bits, v_bits=bits)
    empty = C.init_cache(cfg, b, kh, t)
    row(f"prefill K{bits}/V{bits} (encode K and V, write the cache)", lambda c, k, v: C.prefill(c, k, v), [(empty, kk, vv)])
  tq = quantizer.make_quantizer(d, 3, "mse", norm_correction=True, norm_dtype="float16")
  row("encode K alone, 3-bit mse+nc", lambda x: quantizer.encode(tq, x), [(kk,)])
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
  md = [f"# Prefill encode breakdown — {device}, {date}", "",
        f"jax {jax.__version__}; K, V bf16 [B={b}, Hkv={kh}, T={t}, D={d}]; median µs over {args.reps} reps.", "",
        "| stage | µs | × bf16 read+write |", "| --- | ---: | ---: |"]
  md += [f"| {n} | {us:.1f} | {us / copy:.2f} |" for n, us in rows]
  print("\n".join(md))
  if not args.quick:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_encode_{device.replace(' ', '_')}_{date}.md"
    out.write_text("\n".join(md) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
