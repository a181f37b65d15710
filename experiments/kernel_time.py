"""Kernel-only time of Mosaic GPU decode variants (`pallas_kernels.decode_mgpu`), by Nsight Compute.

  python -m experiments.kernel_time                       # the defaults, K3/V3 K4/V4 K3prod/V3
  python -m experiments.kernel_time --variants '[{}, {"stages": 3}, {"num_splits": 8}]'
  python -m experiments.kernel_time --metrics stalls      # + why warps stall (see STALLS)
  python -m experiments.kernel_time --check ...           # each variant vs the XLA reference
  git show main:pallas_kernels/decode_mgpu.py > /tmp/main.py
  python -m experiments.kernel_time --wall --variants '[{"source": "/tmp/main.py"}, {}]'

A variant is a dict of `decode_mgpu.DecodeTuning` fields (stages, tiles, num_splits, merge_unroll,
key_chains, edge_masks_only, max_slack), the others at their defaults, and optionally "source":
another version of decode_mgpu.py, loaded as a module of its own (`load_source`) and called
directly (with tuning fields only if it has `DecodeTuning`). Each variant's decode attention is
`tqjax.ops.attention` with that module's `decode_partial` as its partial (what the default path
runs on Hopper, with the variant's tuning). The script runs itself under
`ncu --metrics gpu__time_duration.sum -k regex:tq_decode_mgpu` (clocks left alone), which times every
launch of the decode kernel alone: XLA's work around it and the host's dispatch are not in it.
Launches of one variant move by about ±1 µs, against ±3 µs or more per call in bench_decode.py's
pipelined timing. Every variant runs `--reps` times in each of two rounds (variants interleaved);
the table gives min / median µs, and the median of each extra metric (--metrics: ncu metric
names, or "stalls" for STALLS: warps stalled per issued instruction, by reason, and the issue
rate; extra metrics replay each launch, which the duration does not mind). Shape: B = 8,
Hq = 32, Hkv = 8, --head-dim, --seq (default S = 32k). Writes
experiments/results/kernel_time_<device>_<date>.md. A run takes about a minute per variant and
config on an H200 (compiles included); `--help` starts nothing.

Nsight Compute has crashed (segfault at "Connected to process") on freshly started machines and
with `--csv` or `launch__*` metrics, and on 2026-11-29 (H200) hung on multi-launch runs of some
kernel builds; `--wall` times the variants without ncu (see `wall`): per call, with the XLA work
around the kernel, ±1-2 µs between rounds after the first. ncu over `experiments/decode_once.py`
(one launch per process, `-c 1`) ran in 15 s per config on the same kernels, stall metrics
included: profile the defaults that way. With --check the variants are compared with the float32
XLA reference instead, no ncu.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import functools
import importlib.util
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


from experiments import harness
from experiments.bench_decode import CONFIGS, random_cache, rel_err
from pallas_kernels import decode_mgpu as M
from tqjax import cache as C
from tqjax import ops as tq_ops

__all__ = ["attention_fn", "check", "load_source", "main", "parse", "partial_fn", "wall"]

ROUNDS = 2
UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
KERNEL = "tq_decode_mgpu"  # the Mosaic GPU kernel's name prefix (the Triton kernels are tq_decode_k…)
DURATION = "gpu__time_duration.sum"
WALL_CALLS, WALL_DISPATCHES = 20, 10  # --wall: decode calls per jitted call, jitted calls per sample
STALLS = ["smsp__issue_active.avg.per_cycle_active", "smsp__inst_executed.sum"] + [
    f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio"
    for reason in ("barrier", "branch_resolving", "dispatch_stall", "long_scoreboard", "math_pipe_throttle",
                   "membar", "mio_throttle", "no_instruction", "not_selected", "selected", "short_scoreboard",
                   "wait")]


@functools.cache
def load_source(path: str):
  """A decode_mgpu source file (e.g. `git show main:pallas_kernels/decode_mgpu.py > /tmp/main.py`)
  as a module of its own, named decode_mgpu_from_<file stem>: `pallas_kernels.decode_mgpu` stays
  what every other import finds."""
  name = f"decode_mgpu_from_{Path(path).stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the class is made
  spec.loader.exec_module(module)
  return module


def partial_fn(variant: dict):
  """The variant's `decode_partial` (the `partial_fn` of `chunked_attention`): decode_mgpu's, or
  the "source" module's, with a `DecodeTuning` of the variant's other entries. Raises ValueError
  for an entry that is not a tuning field (or any entry, for a source without `DecodeTuning`)."""
  module = load_source(variant["source"]) if "source" in variant else M
  fields = {name: value for name, value in variant.items() if name != "source"}
  if not hasattr(module, "DecodeTuning"):
    if fields:
      raise ValueError(f"{variant['source']} has no DecodeTuning: the variant sets {sorted(fields)}")
    return module.decode_partial
  try:
    return functools.partial(module.decode_partial, tuning=module.DecodeTuning(**fields))
  except TypeError as e:  # an unknown field
    raise ValueError(f"variant {variant}: {e}") from e


def attention_fn(variant: dict):
  """Jitted decode attention (cache, q [B, Hq, D]) → [B, Hq, D] through the variant's kernel."""
  fn = partial_fn(variant)
  return jax.jit(lambda cache, q: tq_ops.attention(cache, q, partial_fn=fn))


def _require_kernel(cache, rows: int, c: str, head_dim: int) -> None:
  ok, why = M.supported(cache)
  if not ok or rows > M.MAX_ROWS:
    raise ValueError(f"{c} at head_dim {head_dim} does not run the Mosaic GPU kernel: {why or f'{rows=}'}")


def check(variant: dict, cname: str, d: int, s: int, seed: int = 3) -> tuple[float, bool]:
  """(relative error, any NaN) of the variant's decode attention vs the float32 XLA reference on a
  prefilled random cache (3 sequences of s, s // 3 + 1 and 1 tokens, G = 4)."""
  cfg = C.CacheConfig(head_dim=d, seed=seed, **CONFIGS[cname])
  b, kh, g = 3, 2, 4
  r = np.random.default_rng(100 + seed)
  k = jnp.asarray(r.standard_normal((b, kh, s, d)) + 0.3, jnp.float32)
  v = jnp.asarray(r.standard_normal((b, kh, s, d)), jnp.float32)
  cache = tq_ops.prefill(C.init_cache(cfg, b, kh, s), k, v, jnp.asarray([s, s // 3 + 1, 1], jnp.int32),
                        implementation="xla")
  q = jnp.asarray(r.standard_normal((b, kh * g, d)) * 2, jnp.float32)
  want = jax.jit(lambda cache, q: tq_ops.attention(cache, q, implementation="xla"))(cache, q)
  got = np.asarray(attention_fn(variant)(cache, q))
  return rel_err(got, want), bool(np.isnan(got).any())


def order(variants: list[dict], configs: list[str], reps: int):
  """(variant index, config) of every timed decode launch, in launch order: ROUNDS × variants ×
  configs × reps (`child` runs them so, `parse` reads them so)."""
  for _ in range(ROUNDS):
    for i in range(len(variants)):
      for c in configs:
        yield from [(i, c)] * reps


def child(args, variants: list[dict]) -> None:
  """Under ncu: the decode calls of `order`, each through its variant's kernel."""
  b, hq, kh = 8, 32, 8
  caches = {c: random_cache(C.CacheConfig(head_dim=args.head_dim, **CONFIGS[c]), b, kh, args.seq, seed=0)
            for c in args.configs}
  for c, cache in caches.items():
    _require_kernel(cache, hq // kh, c, args.head_dim)
  q = jax.random.normal(jax.random.key(0), (b, hq, args.head_dim), jnp.float32)
  fns = [attention_fn(variant) for variant in variants]
  for i, c in order(variants, args.configs, args.reps):
    jax.block_until_ready(fns[i](caches[c], q))


def wall(args, variants: list[dict]) -> dict:
  """{(variant index, config): [{DURATION: µs per call}]} without ncu, in this process: each
  variant's jitted function of WALL_CALLS decode calls (distinct queries, each through an
  optimization barrier; the cache is shared, so XLA may share query-independent work between
  them) runs WALL_DISPATCHES times back to back per sample, variants interleaved over ROUNDS ×
  reps samples. The time includes the XLA work around the kernel (~20 µs at S = 32k) and the
  host's dispatch spread over the calls."""
  b, hq, kh = 8, 32, 8
  out = {}
  for c in args.configs:
    cache = random_cache(C.CacheConfig(head_dim=args.head_dim, **CONFIGS[c]), b, kh, args.seq, seed=0)
    qs = [jax.random.normal(jax.random.key(i), (b, hq, args.head_dim), jnp.float32) for i in range(WALL_CALLS)]
    _require_kernel(cache, hq // kh, c, args.head_dim)
    compiled = []
    for variant in variants:
      attend = attention_fn(variant)
      calls = lambda cache, qs, attend=attend: [attend(cache, jax.lax.optimization_barrier(q)) for q in qs]
      compiled.append(jax.jit(calls).lower(cache, qs).compile())
      jax.block_until_ready(compiled[-1](cache, qs))
    for _ in range(ROUNDS * args.reps):
      for i, f in enumerate(compiled):
        t0 = time.perf_counter()
        jax.block_until_ready([f(cache, qs) for _ in range(WALL_DISPATCHES)])
        us = (time.perf_counter() - t0) / (WALL_DISPATCHES * WALL_CALLS) * 1e6
        out.setdefault((i, c), []).append({DURATION: us})
  return out


def launches(text: str) -> list[dict]:
  """ncu's plain report → per decode launch {metric: value} (the duration in µs)."""
  out = []
  for block in re.split(rf"\n  {KERNEL}\S* \(", text)[1:]:
    metrics = {}
    for name, unit, value in re.findall(r"^    ([a-z]\w*__\S+)\s+(?:(\S+)\s+)??([-\d.,]+)$", block, re.M):
      metrics[name] = float(value.replace(",", "")) * (UNITS[unit] if name == DURATION else 1.0)
    out.append(metrics)
  return out


def parse(text: str, variants: list[dict], configs: list[str], reps: int) -> dict:
  """{(variant index, config): [{metric: value} per launch]} from ncu's report, launches in
  `child`'s order."""
  found = launches(text)
  want = ROUNDS * len(variants) * len(configs) * reps
  if len(found) != want or not all(DURATION in x for x in found):
    raise RuntimeError(f"ncu reported {len(found)} decode launches, expected {want}:\n{text[-3000:]}")
  out = {}
  for key, launch in zip(order(variants, configs, reps), found):
    out.setdefault(key, []).append(launch)
  return out


def main(argv=None) -> None:
  ap = harness.parser(__doc__)
  ap.add_argument("--variants", default="[{}]", help="a Python literal list of dicts (see above)")
  ap.add_argument("--configs", default="K3/V3,K4/V4,K3prod/V3")
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--seq", type=int, default=32768)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--metrics", default="", help='extra ncu metrics, comma-separated, or "stalls"')
  ap.add_argument("--check", action="store_true", help="compare each variant with the reference, no timing")
  ap.add_argument("--wall", action="store_true", help="µs per call by the host's clock, no ncu (see `wall`)")
  ap.add_argument("--ncu-timeout", type=float, default=240.0, help="seconds before giving up on ncu")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  args.configs = args.configs.split(",")
  variants = ast.literal_eval(args.variants)
  if args.child:
    return child(args, variants)
  for variant in variants:
    partial_fn(variant)  # refuses unknown entries before any work
  if args.check:
    for i, variant in enumerate(variants):
      for c in args.configs:
        for s in (3001, args.seq):  # an odd capacity (one token per TMA row) and the timed one
          err, nan = check(variant, c, args.head_dim, s)
          print(f"variant {i} {variant} {c} S={s}: rel err {err:.2e}, NaN {nan}", flush=True)
    return
  extra = STALLS if args.metrics == "stalls" else [m for m in args.metrics.split(",") if m]
  if args.wall:
    if extra:
      raise ValueError("--metrics needs ncu: not with --wall")
    got = wall(args, variants)
  else:
    cmd = ["ncu", "--clock-control", "none", "--metrics", ",".join([DURATION, *extra]), "-k", f"regex:{KERNEL}",
           sys.executable, "-m", "experiments.kernel_time", "--child", "--variants", args.variants, "--configs", ",".join(args.configs),
           "--head-dim", str(args.head_dim), "--seq", str(args.seq), "--reps", str(args.reps)]
    try:
      run = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.ncu_timeout)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"ncu did not finish in {args.ncu_timeout} s (--wall times without it)") from e
    if run.returncode:
      raise RuntimeError(f"ncu exited with {run.returncode}:\n{(run.stdout + run.stderr)[-3000:]}")
    got = parse(run.stdout, variants, args.configs, args.reps)
  dev = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  how = (f"{ROUNDS} × {args.reps} samples of {WALL_DISPATCHES} × {WALL_CALLS} calls per row; µs per call by the "
         "host's clock (the kernel and the XLA work around it)" if args.wall else
         f"{ROUNDS} × {args.reps} launches per row; µs of the decode kernel alone")
  md = [f"# Decode kernel time ({'wall clock' if args.wall else 'Nsight Compute'}) — {dev}, {date}", "",
        harness.stamp_line(harness.stamp()), "",
        f"jax {jax.__version__}; B = 8, Hq = 32, Hkv = 8, D = {args.head_dim}, S = {args.seq}; {how}.", "",
        "| variant | config | min µs | median µs |" + "".join(f" {m} |" for m in extra),
        "| --- | --- | ---: | ---: |" + " ---: |" * len(extra)]
  for (i, c), runs in sorted(got.items()):
    ts = [x[DURATION] for x in runs]
    cols = "".join(f" {statistics.median(x.get(m, float('nan')) for x in runs):.3g} |" for m in extra)
    md.append(f"| {variants[i] or 'defaults'} | {c} | {min(ts):.1f} | {statistics.median(ts):.1f} |" + cols)
  text = "\n".join(md) + "\n"
  print(text)
  path = harness.out_dir(args) / f"kernel_time_{dev.replace(' ', '_')}_{date}{'_wall' if args.wall else ''}.md"
  path.write_text(text)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
