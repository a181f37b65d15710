"""Decode-attention benchmark: TurboQuant fused kernel vs bf16 / int8 / cuDNN baselines.

  python -m experiments.bench_decode            # GPU: checks + full table (minutes per shape)
  python -m experiments.bench_decode --quick    # CPU smoke run (XLA paths, tiny shapes, ~1 min)
  python -m experiments.bench_decode --pipelined 20  # dispatch 20 calls per sample, sync once
  python -m experiments.bench_decode --pipelined 20 --headline --only S=32k  # baselines + default kernel
  python -m experiments.bench_decode --plot-from results-local/bench_decode_X.json  # re-plot a run

In one process: the card's copy bandwidth (x + 1 on a large array, read + write), XLA dense bf16
attention, cuDNN bf16 (`jax.nn.dot_product_attention(implementation="cudnn")`), an int8-KV XLA
baseline (per-token scales), our XLA reference path and our Pallas kernels for K4/V4, K3/V3 (mse)
and K3 prod/V3: the default one (`decode_mgpu`, Mosaic GPU, on Hopper where it applies; else the
Triton kernel with tf32 dots) and the Triton kernel with bf16 dot operands. Prefill encode is
timed by bench_encode.py.

Timing: each sample runs one jitted call over `per_jit` input sets, distinct queries over `nbuf`
distinct K/V buffers or caches taken in turn (so L2 never holds the working set), synchronizes,
and divides by `per_jit`; the median of many samples after warm-up is reported. `per_jit` puts
≥ CALL_BYTES of bf16 K/V behind each jitted call (≥ ~0.75 ms of cuDNN's time), so that short
calls (S = 4k, B = 1, D = 64) are not timed by the host's dispatch of the jitted call (~120 µs
with a Mosaic GPU kernel), which two calls per jitted call did not cover. Each call's inputs pass
an optimization barrier, so XLA cannot share query-independent work (an int8 → bf16 convert, a
cache's dequantization) between calls on the same buffer. Bytes are what each
implementation must read: codes, norms (+ QJL signs and residual norms) and lengths for ours;
K/V (+ scales) for the baselines.
Writes bench_decode_<device>_<date>.{md,json,png} into --out (see experiments/harness.py).
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import harness
from pallas_kernels import dispatch
from tqjax import cache as C
from tqjax import ops as tq_ops

CALL_BYTES = 3e9  # bf16 K/V bytes of the baselines behind one jitted call (see Timing above)


# ----------------------------------------------------------------------------- timing


PIPELINE = 0  # --pipelined N: time N jitted calls dispatched back to back per sample


def pallas_attention(cache, q, *, soft_cap=None, sliding_window=None, **kernel_options):
  """`tqjax.ops.attention` of q [B, N, H] through the fused kernel `dispatch.decode_partial_fn`
  picks (kernel options select the Triton kernel)."""
  fn = dispatch.decode_partial_fn(cache, q.shape[1] // cache.num_kv_heads, **kernel_options)
  return tq_ops.attention(cache, q, soft_cap=soft_cap, sliding_window=sliding_window, partial_fn=fn)


def bench(fn, sets, *, reps: int, warmup: int = 3) -> float:
  """Median µs per call of fn over input sets (one jitted call runs them all, each set's inputs
  through its own optimization barrier: no work shared between calls).

  By default each sample synchronizes after its jitted call, so the host's dispatch of the
  call (~120 µs with a Mosaic GPU kernel on an H200) is inside the time; with PIPELINE = N a
  sample dispatches N jitted calls back to back, as a decode loop does, and synchronizes once.
  """
  multi = jax.jit(lambda sets: [fn(*jax.lax.optimization_barrier(s)) for s in sets])
  for _ in range(warmup):
    jax.block_until_ready(multi(sets))
  calls = max(1, PIPELINE)
  samples = []
  for _ in range(reps if not PIPELINE else max(3, reps // 5)):
    t0 = time.perf_counter()
    jax.block_until_ready([multi(sets) for _ in range(calls)])
    samples.append((time.perf_counter() - t0) / (calls * len(sets)))
  return statistics.median(samples) * 1e6


def copy_bandwidth(nbytes: int, reps: int) -> tuple[float, float]:
  """(µs, TB/s counting read + write) of x + 1 on float32 arrays of nbytes each."""
  n = nbytes // 4
  xs = [(jax.random.normal(jax.random.key(i), (n,), jnp.float32),) for i in range(2)]
  us = bench(lambda x: x + 1, xs, reps=reps)
  return us, 2 * nbytes / (us * 1e-6) / 1e12


# ----------------------------------------------------------------------------- baselines


def dense_attention(q, k, v, lengths):
  """XLA bf16 decode attention. q [B, Hq, D], k/v [B, K, S, D] bf16 → [B, Hq, D]."""
  b, hq, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  qg = q.reshape(b, kh, hq // kh, d)
  logits = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  logits = jnp.where(jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None], logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bkgs,bksd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(b, hq, d).astype(q.dtype)


def cudnn_attention(q, k, v, lengths):
  """cuDNN bf16. q [B, Hq, D]; k/v [B, S, K, D] (BTNH) → [B, Hq, D]."""
  out = jax.nn.dot_product_attention(
      q[:, None], k, v, key_value_seq_lengths=lengths, implementation="cudnn")
  return out[:, 0]


def int8_attention(q, k8, ks, v8, vs, lengths):
  """XLA int8 K/V with per-token scales. k8/v8 [B, K, S, D] int8, ks/vs [B, K, S] f32."""
  b, hq, d = q.shape
  kh, s = k8.shape[1], k8.shape[2]
  qg = q.reshape(b, kh, hq // kh, d)
  logits = jnp.einsum("bkgd,bksd->bkgs", qg, k8.astype(q.dtype), preferred_element_type=jnp.float32)
  logits = logits * ks[:, :, None, :] / math.sqrt(d)
  logits = jnp.where(jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None], logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1) * vs[:, :, None, :]
  o = jnp.einsum("bkgs,bksd->bkgd", p.astype(q.dtype), v8.astype(q.dtype), preferred_element_type=jnp.float32)
  return o.reshape(b, hq, d).astype(q.dtype)


# ----------------------------------------------------------------------------- our caches


CONFIGS = {
    "K4/V4": dict(k_bits=4, v_bits=4, k_variant="mse"),
    "K3/V3": dict(k_bits=3, v_bits=3, k_variant="mse"),
    "K3prod/V3": dict(k_bits=3, v_bits=3, k_variant="prod"),
}


def random_cache(cfg: C.CacheConfig, b: int, kh: int, s: int, seed: int) -> C.KVCache:
  """A full cache of random codes (every word pattern is a valid code) and plausible norms.

  Much faster than prefilling S random tokens and reads exactly the same bytes.
  """
  cache = jax.eval_shape(lambda: C.init_cache(cfg, b, kh, s))
  keys = iter(jax.random.split(jax.random.key(seed), 16))

  def fill(x):
    if x is None:
      return None
    if x.dtype == jnp.uint32:
      return jax.random.bits(next(keys), x.shape, jnp.uint32)
    return (1.0 + 0.1 * jax.random.uniform(next(keys), x.shape, jnp.float32)).astype(x.dtype)

  real = C.init_cache(cfg, b, kh, 16)  # the quantizer constants

  def store(shape_store, real_store):
    main = jax.tree_util.tree_map(fill, shape_store.main)
    return C.Store(real_store.quantizer, main)

  return C.KVCache(
      config=cfg,
      k=store(cache.k, real.k),
      v=store(cache.v, real.v),
      lengths=jnp.full((b,), s, jnp.int32),
      key_mean=None if cache.key_mean is None else 0.1 * jax.random.normal(next(keys), cache.key_mean.shape),
  )


def cache_read_bytes(cache: C.KVCache) -> int:
  """Bytes the decode kernel reads: per-token arrays up to the lengths (all full here) + lengths."""
  leaves = jax.tree_util.tree_leaves([cache.k.main, cache.v.main])
  return sum(int(x.nbytes) for x in leaves) + int(cache.lengths.nbytes)


# ----------------------------------------------------------------------------- correctness


def rel_err(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def config_case(cname: str, d: int, s: int, g: int = 4) -> dict:
  """`check_case`'s case c for the cache configuration CONFIGS[cname] at head_dim d, S = s."""
  opts = CONFIGS[cname]
  return dict(d=d, kb=opts["k_bits"], vb=opts["v_bits"], var=opts["k_variant"], g=g, s=s)


def check_case(c: dict, seed: int, **options) -> tuple[float, bool]:
  """(relative error, any NaN) of the compiled kernel (with `options`) vs the float32 XLA reference
  on freshly prefilled random data. c: d, kb, vb, var, g, s and optionally nd, cap, win."""
  cfg = C.CacheConfig(head_dim=c["d"], k_bits=c["kb"], v_bits=c["vb"], k_variant=c["var"],
                      norm_dtype=c.get("nd", "float32"), seed=seed)
  b, kh = 3, 2
  r = np.random.default_rng(100 + seed)
  k = jnp.asarray(r.standard_normal((b, kh, c["s"], c["d"])) + 0.3, jnp.float32)
  v = jnp.asarray(r.standard_normal((b, kh, c["s"], c["d"])), jnp.float32)
  lengths = jnp.asarray([c["s"], c["s"] // 3 + 1, 1], jnp.int32)
  cache = tq_ops.prefill(C.init_cache(cfg, b, kh, c["s"]), k, v, lengths)
  q = jnp.asarray(r.standard_normal((b, kh * c["g"], c["d"])) * 2, jnp.float32)
  kw = dict(soft_cap=c.get("cap"), sliding_window=c.get("win"))
  ref = jax.jit(lambda cache, q: tq_ops.attention(cache, q, implementation="xla", **kw))(cache, q)
  got = np.asarray(jax.jit(lambda cache, q: pallas_attention(cache, q, **kw, **options))(cache, q))
  return rel_err(got, ref), bool(np.isnan(got).any())


def check_kernel(log) -> list[dict]:
  """`check_case` over a spread of configurations (the kernel's defaults)."""
  cases = [
      dict(d=128, kb=3, vb=3, var="mse", g=4, s=4133),
      dict(d=128, kb=4, vb=4, var="mse", g=4, s=4096),
      dict(d=128, kb=3, vb=3, var="prod", g=4, s=3001),
      dict(d=128, kb=2, vb=2, var="prod", g=8, s=1000, cap=30.0),
      dict(d=64, kb=4, vb=2, var="mse", g=16, s=777, nd="bfloat16"),
      dict(d=64, kb=3, vb=3, var="mse", g=4, s=4133),
      dict(d=256, kb=3, vb=4, var="mse", g=2, s=2049, nd="float16", win=100),
      dict(d=256, kb=3, vb=3, var="prod", g=4, s=3001),
      dict(d=32, kb=2, vb=3, var="mse", g=1, s=513),
      dict(d=128, kb=4, vb=3, var="prod", g=16, s=50, cap=20.0),
  ]
  out = []
  for i, c in enumerate(cases):
    e, nan = check_case(c, i)
    log(f"check {c}: rel_err={e:.2e} nan={nan}")
    out.append(dict(case=c, rel_err=e, nan=nan))
  return out


# ----------------------------------------------------------------------------- plot


def plot(results: dict, path: Path) -> None:
  """Per shape: effective TB/s per implementation (grouped bars, the copy bandwidth as a line) and
  speedup vs cuDNN bf16 (vs XLA bf16 where a run has no cuDNN row, e.g. --quick on CPU)."""
  plt = harness.pyplot()
  rows = results["rows"]
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  by = {(r["shape"], r["impl"]): r for r in rows}
  base = "cudnn bf16" if any(r["impl"] == "cudnn bf16" for r in rows) else "xla bf16"
  x = np.arange(len(shapes))
  w = 0.85 / len(impls)
  fig, (ax_t, ax_s) = plt.subplots(2, 1, figsize=(max(8, 2.4 * len(shapes)), 8), sharex=True)
  for i, impl in enumerate(impls):
    have = [j for j, sh in enumerate(shapes) if (sh, impl) in by]
    xs = x[have] + (i - (len(impls) - 1) / 2) * w
    tbs = [by[shapes[j], impl]["tbs"] for j in have]
    sp = [by[shapes[j], base]["us"] / by[shapes[j], impl]["us"] if (shapes[j], base) in by else np.nan for j in have]
    ax_t.bar(xs, tbs, w, color=f"C{i}", label=impl)
    ax_s.bar(xs, sp, w, color=f"C{i}")
  ax_t.axhline(results["copy_tbs"], color="k", ls="--", lw=1, label=f"copy bandwidth {results['copy_tbs']:.3g} TB/s")
  ax_t.set(ylabel="effective bandwidth (TB/s, log)", yscale="log",
           title="Effective bandwidth = bytes each implementation must read / time")
  ax_s.axhline(1.0, color="k", lw=1)
  ax_s.set(ylabel=f"speedup vs {base} (log)", yscale="log", title=f"Speedup vs {base} (same shape; >1 = faster)")
  ax_s.set_xticks(x, shapes)
  for ax in (ax_t, ax_s):
    ax.grid(True, axis="y", which="both", alpha=0.3)
  ax_t.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.02))
  fig.suptitle(f"Decode attention benchmark — {results['device']}, {results['date']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv=None):
  ap = harness.parser(__doc__)
  ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run: XLA paths only")
  ap.add_argument("--no-check", action="store_true")
  ap.add_argument("--reps", type=int, default=30)
  ap.add_argument("--only", default="", help="comma list of shape names to run")
  ap.add_argument("--pipelined", type=int, default=0, metavar="N",
                  help="time N jitted calls dispatched back to back per sample (default: sync each call)")
  ap.add_argument("--headline", action="store_true",
                  help="only the baselines and the default kernel: no 'ours xla' and Triton bf16-dots rows")
  ap.add_argument("--plot-from", metavar="JSON", help="only plot an existing results JSON to <same stem>.png")
  args = ap.parse_args(argv)
  if args.plot_from:
    src = Path(args.plot_from)
    plot(json.loads(src.read_text()), src.with_suffix(".png"))
    print(f"wrote {src.with_suffix('.png')}")
    return

  global PIPELINE
  PIPELINE = args.pipelined
  dev = jax.devices()[0]
  device = dev.device_kind
  on_gpu = dev.platform == "gpu"
  date = datetime.date.today().isoformat()
  st = harness.stamp()
  out = harness.out_dir(args)
  lines: list[str] = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)

  log(f"device: {device} ({dev.platform}), jax {jax.__version__}, date {date}")
  results = dict(device=device, date=date, jax=jax.__version__, stamp=st, rows=[], checks=[])
  use_kernel = on_gpu and not args.quick
  if use_kernel and not args.no_check:
    results["checks"] = check_kernel(log)

  reps = 3 if args.quick else args.reps
  copy_us, copy_tbs = copy_bandwidth((16 if args.quick else 2048) * 2**20, reps)
  log(f"copy bandwidth (x + 1, read + write): {copy_tbs:.3f} TB/s ({copy_us:.1f} µs)")
  results["copy_tbs"] = copy_tbs

  if args.quick:
    shapes = [("quick", 2, 8, 2, 64, 256)]
  else:
    shapes = [
        ("S=32k", 8, 32, 8, 128, 32768),
        ("S=4k", 8, 32, 8, 128, 4096),
        ("S=16k", 8, 32, 8, 128, 16384),
        ("S=128k B=1", 1, 32, 8, 128, 131072),
        ("D=256 S=16k", 8, 32, 8, 256, 16384),
        ("D=64 S=32k", 8, 32, 8, 64, 32768),
    ]
  if args.only:
    keep = set(args.only.split(","))
    shapes = [s for s in shapes if s[0] in keep]

  def write() -> None:
    """Writes the table so far (after every shape, so a run cut short still leaves its rows)."""
    md = [f"# Decode attention benchmark — {device}, {date}", "", harness.stamp_line(st), "",
          f"jax {jax.__version__}; copy bandwidth (x + 1, read + write): **{copy_tbs:.3f} TB/s**.",
          "Median µs per call over distinct input buffers"
          + (f" ({PIPELINE} jitted calls dispatched back to back per sample)" if PIPELINE else
             " (synchronized after every jitted call)") + "; bytes = what each implementation must read;",
          "% copy = effective bandwidth / copy bandwidth; speedup vs cuDNN bf16 on the same shape.", "",
          "| shape | impl | µs | MB read | TB/s | % copy | × vs cuDNN | rel err |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["rows"]:
      sp = "" if r.get("speedup_vs_cudnn") is None else f"{r['speedup_vs_cudnn']:.2f}"
      err = "" if r["err"] is None else f"{r['err']:.1e}"
      md.append(f"| {r['shape']} | {r['impl']} | {r['us']:.1f} | {r['bytes'] / 1e6:.1f} | {r['tbs']:.3f} | "
                f"{r['pct_copy']:.1f} | {sp} | {err} |")
    if results["checks"]:
      md += ["", "Kernel vs float32 XLA reference (compiled, fresh prefilled data):", ""]
      for c in results["checks"]:
        md.append(f"- {c['case']}: rel err {c['rel_err']:.2e}, NaN {c['nan']}")
    text = "\n".join(md) + "\n"
    print(text)
    stem = (f"bench_decode_{device.replace(' ', '_').replace('/', '_')}_{date}" + ("_quick" if args.quick else "")
            + (f"_pipelined{PIPELINE}" if PIPELINE else "") + ("_headline" if args.headline else ""))
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out / f"{stem}.png")
    log(f"wrote {out / stem}.md/.json/.png")


  for name, b, hq, kh, d, s in shapes:
    bf16_bytes = 2 * b * kh * s * d * 2
    nbuf = max(2, min(8, math.ceil(400e6 / bf16_bytes))) if not args.quick else 2
    per_jit = max(nbuf, math.ceil(CALL_BYTES / bf16_bytes)) if not args.quick else nbuf + 1  # quick: cycles too
    cycle = lambda bufs: [bufs[i % nbuf] for i in range(per_jit)]  # the buffers in turn, one per call
    key = jax.random.key(s + d)
    lengths = jnp.full((b,), s, jnp.int32)
    qs = [jax.random.normal(jax.random.fold_in(key, i), (b, hq, d), jnp.float32) for i in range(per_jit)]
    rows = []

    def add(impl, us, nbytes, err=None):
      tbs = nbytes / (us * 1e-6) / 1e12
      row = dict(shape=name, impl=impl, us=us, bytes=nbytes, tbs=tbs, pct_copy=100 * tbs / copy_tbs, err=err)
      rows.append(row)
      log(f"  {name:12s} {impl:28s} {us:10.1f} µs  {nbytes / 1e6:9.1f} MB  {tbs:6.3f} TB/s  {row['pct_copy']:5.1f}%"
          + ("" if err is None else f"  err={err:.1e}"))

    # bf16 dense (XLA) and cuDNN, int8
    kv = []
    for i in range(nbuf):
      kk = jax.random.normal(jax.random.fold_in(key, 100 + i), (b, kh, s, d), jnp.bfloat16)
      vv = jax.random.normal(jax.random.fold_in(key, 200 + i), (b, kh, s, d), jnp.bfloat16)
      kv.append((kk, vv))
    q16 = [q.astype(jnp.bfloat16) for q in qs]
    sets = [(q, k, v, lengths) for q, (k, v) in zip(q16, cycle(kv))]
    add("xla bf16", bench(dense_attention, sets, reps=reps), bf16_bytes)
    if on_gpu:
      ckv = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) for k, v in kv]
      try:
        csets = [(q, k, v, lengths) for q, (k, v) in zip(q16, cycle(ckv))]
        add("cudnn bf16", bench(cudnn_attention, csets, reps=reps), bf16_bytes)
      except Exception as e:  # noqa: BLE001
        log(f"  cudnn failed: {type(e).__name__}: {str(e)[:300]}")
      del ckv
    i8 = []
    for k, v in kv:
      ks = jnp.max(jnp.abs(k.astype(jnp.float32)), axis=-1) / 127
      vs = jnp.max(jnp.abs(v.astype(jnp.float32)), axis=-1) / 127
      k8 = jnp.round(k.astype(jnp.float32) / ks[..., None]).astype(jnp.int8)
      v8 = jnp.round(v.astype(jnp.float32) / vs[..., None]).astype(jnp.int8)
      i8.append((k8, ks, v8, vs))
    del sets, kv
    i8sets = [(q, *x, lengths) for q, x in zip(q16, cycle(i8))]
    add("xla int8 (per-token scale)", bench(int8_attention, i8sets, reps=reps), b * kh * s * (2 * d + 8))
    jax.clear_caches()
    del i8, i8sets

    for cname, opts in CONFIGS.items():
      cfg = C.CacheConfig(head_dim=d, **opts)
      caches = [random_cache(cfg, b, kh, s, seed=1000 * i + s) for i in range(nbuf)]
      nbytes = cache_read_bytes(caches[0])
      xla = lambda cache, q: tq_ops.attention(cache, q, implementation="xla")
      if (s <= 32768 or args.quick) and not args.headline:
        add(f"ours xla {cname}", bench(xla, list(zip(cycle(caches), qs)), reps=max(3, reps // 3)), nbytes)
      if use_kernel:
        # The default kernel (Mosaic GPU on Hopper where it applies, else Triton tf32 dots), and the
        # Triton kernel with bf16 dots (kernel options always select Triton).
        kernel = "mosaic" if dispatch._mosaic_decode(caches[0], hq // kh) else "triton"
        pal = lambda cache, q: pallas_attention(cache, q)
        ref = np.asarray(jax.jit(xla)(caches[0], qs[0]))
        err = rel_err(jax.jit(pal)(caches[0], qs[0]), ref)
        add(f"ours pallas {kernel} {cname}", bench(pal, list(zip(cycle(caches), qs)), reps=reps), nbytes, err)
        if not args.headline:
          pal16 = lambda cache, q: pallas_attention(cache, q, dot_dtype="bfloat16")
          err = rel_err(jax.jit(pal16)(caches[0], qs[0]), ref)
          add(f"ours pallas triton bf16-dots {cname}", bench(pal16, list(zip(cycle(caches), qs)), reps=reps),
              nbytes, err)
      del caches
    cud = [r for r in rows if r["impl"] == "cudnn bf16"]
    for r in rows:
      r["speedup_vs_cudnn"] = (cud[0]["us"] / r["us"]) if cud else None
    results["rows"] += rows
    write()


if __name__ == "__main__":
  main()
