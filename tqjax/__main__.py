"""`python -m tqjax`: the demo and self-check table.

For d = 128 and 256, random unit vectors and Gaussian queries, bits 1–4 × {mse, prod}: total
squared error, cosine, inner-product correlation and bias, stored bits per coordinate and the
compression against bf16, beside the paper's bounds. Runs in well under 30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp

import tqjax


def _row(dim: int, bits: int, variant: str, x: jax.Array, q: jax.Array) -> dict:
  tq = tqjax.make_quantizer(dim, bits, variant, seed=bits)
  x_hat = tqjax.decode(tq, tqjax.encode(tq, x))
  ip_hat = tqjax.estimate_ip(tq, q, tqjax.encode(tq, x))
  ip = jnp.sum(q * x, axis=-1)
  err = ip_hat - ip
  cos = jnp.sum(x * x_hat, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(x_hat, axis=-1))
  n = x.shape[0]
  d_mse_prev = 1.0 if bits == 1 else tqjax.distortion(bits - 1, dim)
  return {
      "mse": float(jnp.mean(jnp.sum((x - x_hat) ** 2, -1))),
      "cos": float(jnp.mean(cos)),
      "corr": float(jnp.corrcoef(ip, ip_hat)[0, 1]),
      "bias": float(jnp.mean(err)),
      "bias_se": float(jnp.std(err) / math.sqrt(n)),
      "ip_var": float(jnp.var(err)),
      "bpc": tqjax.bits_per_coordinate(tq.config),
      "ratio": tqjax.compression_ratio(tq.config),
      # Paper: D_mse ≤ √3π/2·4^−b; prod: Var ≤ (π/2d)·D_mse(b−1)·‖q‖² (here E‖q‖² = d).
      "bound": math.sqrt(3) * math.pi / 2 * 4.0**-bits if variant == "mse" else math.pi / 2 * d_mse_prev,
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=4096, help="vectors per row")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  print(f"tqjax {tqjax.__version__} on {jax.devices()[0].device_kind} — {args.samples} random unit vectors per row")
  print("mse: total squared error of unit vectors vs the paper's upper bound √3π/2·4^-b.")
  print("prod: inner-product error variance vs the bound (π/2d)·D_mse(b-1)·‖q‖² (q ~ N(0, I_d)).")
  print()
  header = "|   d | variant | bits | bits/coord | vs bf16 | sq. error | cosine | ip corr | ip bias (±SE) | ip err var | bound |"
  print(header)
  print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  for dim in (128, 256):
    kx, kq = jax.random.split(jax.random.key(dim))
    x = jax.random.normal(kx, (args.samples, dim))
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = jax.random.normal(kq, (args.samples, dim))
    for variant in ("mse", "prod"):
      for bits in (1, 2, 3, 4):
        r = _row(dim, bits, variant, x, q)
        bound_of = r["mse"] if variant == "mse" else r["ip_var"]
        print(
            f"| {dim:3d} | {variant:7s} | {bits:4d} | {r['bpc']:10.3f} | {r['ratio']:6.2f}x | {r['mse']:9.4f} | "
            f"{r['cos']:6.4f} | {r['corr']:7.4f} | {r['bias']:+.4f} (±{r['bias_se']:.4f}) | {r['ip_var']:10.4f} | "
            f"{r['bound']:.4f}{' ok' if bound_of <= r['bound'] else ' OVER'} |"
        )
  print("\nLloyd–Max optimum at d=128 (total squared error): "
        + ", ".join(f"b={b}: {tqjax.distortion(b, 128):.4f}" for b in (1, 2, 3, 4))
        + f"  (paper, d→∞: 0.3634, 0.1175, 0.0345, 0.0095). Took {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
  main()
