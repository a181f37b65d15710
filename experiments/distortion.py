"""Distortion vs bits (the paper's Fig. 3): TurboQuant_mse and TurboQuant_prod on unit vectors.

For bits b = 1..5 at dimension d (default 128):
* mse:  D_mse = E‖x − x̂‖² for x uniform on the unit sphere, against the Lloyd–Max optimum for
  this d (`tqjax.distortion`), the lower bound 4^−b and the paper's upper bound (√3·π/2)·4^−b.
* prod: D_prod = E(⟨q, x⟩ − est)² for x, q independent and uniform on the unit sphere (so
  D_prod = variance·d/‖q‖² ÷ d with ‖q‖ = 1), against the paper's bounds (1/d)·4^−b and
  (√3·π²/d)·4^−b, and the QJL bound of the Gaussian sketch, (π/(2d))·D_mse(b − 1) with
  D_mse(0) = 1. Shown for the default orthogonal sketch and the paper's Gaussian sketch; the
  mean error (bias) is reported with its standard error.

The randomness of TurboQuant is in Π and S, so samples are split over `--seeds` quantizer seeds.
Standard errors: per-sample errors are i.i.d. (fresh x, q per sample), SE = sd/√N.

Run: python -m experiments.distortion [--dim 128] [--samples 65536] [--seeds 8]   (about a minute
on a 2-core CPU at the defaults). Writes distortion.{md,json,png} into --out (see experiments/harness.py).
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import tqjax
from experiments import harness

BITS = (1, 2, 3, 4, 5)
QJL_KINDS = ("orthogonal", "gaussian")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _mean_se(e: np.ndarray) -> tuple[float, float]:
  return float(e.mean()), float(e.std(ddof=1) / math.sqrt(e.size))


def measure(dim: int, samples: int, seeds: int, key: jax.Array) -> list[dict]:
  """One row per bit width: measured distortions (mean, SE) and the theory next to them."""
  per_seed = -(-samples // seeds)
  kx, kq = jax.random.split(key)
  # Eager on purpose: a quantizer's seed is static, so a jit would recompile for every seed.
  xs = _unit(jax.random.normal(kx, (seeds, per_seed, dim)))
  qs = _unit(jax.random.normal(kq, (seeds, per_seed, dim)))
  rows = []
  for bits in BITS:
    t0 = time.perf_counter()
    row = dict(bits=bits)
    sq_err = []
    for s in range(seeds):
      tq = tqjax.make_quantizer(dim, bits, "mse", seed=s)
      sq_err.append(np.asarray(jnp.sum((tqjax.decode(tq, tqjax.encode(tq, xs[s])) - xs[s]) ** 2, axis=-1)))
    row["mse"] = _mean_se(np.concatenate(sq_err).astype(np.float64))
    for kind in QJL_KINDS:
      ip_err = []
      for s in range(seeds):
        tq = tqjax.make_quantizer(dim, bits, "prod", seed=s, qjl_kind=kind)
        est = tqjax.estimate_ip(tq, qs[s], tqjax.encode(tq, xs[s]))  # [per_seed]: pairs (q_i, x_i)
        ip_err.append(np.asarray(est - jnp.sum(qs[s] * xs[s], axis=-1)))
      e = np.concatenate(ip_err).astype(np.float64)
      row[f"prod_{kind}"] = _mean_se(e * e)
      row[f"bias_{kind}"] = _mean_se(e)
    d_prev = tqjax.distortion(bits - 1, dim) if bits > 1 else 1.0
    row.update(
        mse_theory=tqjax.distortion(bits, dim),
        mse_lower=4.0**-bits,
        mse_upper=math.sqrt(3) * math.pi / 2 * 4.0**-bits,
        prod_lower=4.0**-bits / dim,
        prod_upper=math.sqrt(3) * math.pi**2 / dim * 4.0**-bits,
        prod_qjl_bound=math.pi / (2 * dim) * d_prev,
    )
    rows.append(row)
    _log(
        f"bits={bits}: D_mse={row['mse'][0]:.4g} (Lloyd–Max {row['mse_theory']:.4g}), "
        f"D_prod orth={row['prod_orthogonal'][0]:.3g} gauss={row['prod_gaussian'][0]:.3g} "
        f"[{time.perf_counter() - t0:.1f} s]"
    )
  return rows


def _pm(m_se: tuple[float, float], digits: int = 4) -> str:
  return f"{m_se[0]:.{digits}g} ± {m_se[1]:.1g}"


def markdown(rows: list[dict], dim: int, samples: int, seeds: int, device: str, date: str, stamp: str) -> str:
  lines = [
      f"# Distortion vs bits — d = {dim}, {samples} unit vectors over {seeds} quantizer seeds, "
      f"device: {device}, {date}",
      "",
      stamp,
      "",
      "TurboQuant_mse: D_mse = E‖x − x̂‖² (mean ± SE) against the Lloyd–Max optimum for this d and the "
      "paper's bounds 4^−b ≤ D_mse ≤ (√3π/2)·4^−b.",
      "",
      "| bits | D_mse measured | Lloyd–Max D_mse(b, d) | lower 4^−b | upper √3π/2·4^−b |",
      "| ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    lines.append(
        f"| {r['bits']} | {_pm(r['mse'])} | {r['mse_theory']:.4g} | {r['mse_lower']:.4g} | {r['mse_upper']:.4g} |"
    )
  lines += [
      "",
      "TurboQuant_prod (b − 1 codebook bits + 1 QJL bit): D_prod = E(⟨q, x⟩ − est)² for independent unit "
      "q, x (mean ± SE), and the same times d (= error variance·d/‖q‖²). Bounds (paper): "
      "(1/d)·4^−b ≤ D_prod ≤ (√3π²/d)·4^−b. QJL bound: (π/(2d))·D_mse(b − 1), D_mse(0) = 1, the "
      "variance of the Gaussian sketch with m = d rows. Bias: mean of est − ⟨q, x⟩ (± SE).",
      "",
      "| bits | D_prod orthogonal S | ·d | D_prod Gaussian S | ·d | lower (1/d)·4^−b | upper (√3π²/d)·4^−b "
      "| QJL bound π/(2d)·D_mse(b−1) | bias orthogonal | bias Gaussian |",
      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    po, pg = r["prod_orthogonal"], r["prod_gaussian"]
    lines.append(
        f"| {r['bits']} | {_pm(po)} | {po[0] * dim:.4g} | {_pm(pg)} | {pg[0] * dim:.4g} | "
        f"{r['prod_lower']:.3g} | {r['prod_upper']:.3g} | {r['prod_qjl_bound']:.3g} | "
        f"{_pm(r['bias_orthogonal'], 2)} | {_pm(r['bias_gaussian'], 2)} |"
    )
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], dim: int, device: str, date: str, path: Path) -> None:
  plt = harness.pyplot()
  b = np.array([r["bits"] for r in rows])
  fig, (ax_m, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
  ax_m.errorbar(b, [r["mse"][0] for r in rows], yerr=[r["mse"][1] for r in rows], fmt="o", label="measured")
  ax_m.plot(b, [r["mse_theory"] for r in rows], "-", label=f"Lloyd–Max optimum (d={dim})")
  ax_m.plot(b, [r["mse_upper"] for r in rows], "--", label=r"upper $\frac{\sqrt{3}\pi}{2}4^{-b}$")
  ax_m.plot(b, [r["mse_lower"] for r in rows], ":", label=r"lower $4^{-b}$")
  ax_m.set(title="TurboQuant_mse", xlabel="bits per coordinate", ylabel="D_mse = E‖x − x̂‖²", yscale="log")
  for kind, fmt in (("orthogonal", "o"), ("gaussian", "s")):
    ax_p.errorbar(
        b, [r[f"prod_{kind}"][0] for r in rows], yerr=[r[f"prod_{kind}"][1] for r in rows], fmt=fmt,
        label=f"measured, {kind} S",
    )
  ax_p.plot(b, [r["prod_qjl_bound"] for r in rows], "-", label=r"QJL bound $\frac{\pi}{2d}D_{mse}(b-1)$")
  ax_p.plot(b, [r["prod_upper"] for r in rows], "--", label=r"upper $\frac{\sqrt{3}\pi^2}{d}4^{-b}$")
  ax_p.plot(b, [r["prod_lower"] for r in rows], ":", label=r"lower $4^{-b}/d$")
  ax_p.set(title="TurboQuant_prod (unit q)", xlabel="bits per coordinate", ylabel="D_prod = E(⟨q,x⟩ − est)²",
           yscale="log")
  for ax in (ax_m, ax_p):
    ax.set_xticks(b)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Distortion vs bits, d = {dim} — {device}, {date}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  ap = harness.parser(__doc__)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--samples", type=int, default=65536, help="unit vectors (and query pairs) per bit width")
  ap.add_argument("--seeds", type=int, default=8, help="quantizer seeds the samples are split over")
  args = ap.parse_args(argv)
  if args.samples < 2 * args.seeds:
    ap.error(f"--samples={args.samples} must be at least 2·--seeds={2 * args.seeds}")

  out = harness.out_dir(args)
  st = harness.stamp()
  device = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  _log(f"d={args.dim}, samples={args.samples}, seeds={args.seeds}, device: {device}, jax {jax.__version__}")
  t0 = time.perf_counter()
  rows = measure(args.dim, args.samples, args.seeds, jax.random.key(0))
  samples = -(-args.samples // args.seeds) * args.seeds
  md = markdown(rows, args.dim, samples, args.seeds, device, date, harness.stamp_line(st))
  print(md)
  data = dict(stamp=st, dim=args.dim, samples=samples, seeds=args.seeds, rows=rows)
  paths = harness.write(out, "distortion", md, data)
  plot(rows, args.dim, device, date, out / "distortion.png")
  _log(f"wrote {', '.join(map(str, paths))} and {out / 'distortion.png'} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
