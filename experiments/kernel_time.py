"""Kernel-only time of Mosaic GPU decode variants (`pallas_kernels.decode_mgpu`), by Nsight Compute.

  PYTHONPATH=. python experiments/kernel_time.py                       # the defaults, K3/V3 K4/V4 K3prod/V3
  PYTHONPATH=. python experiments/kernel_time.py --variants '[{}, {"STAGES": 3}, {"num_splits": 8}]'
  PYTHONPATH=. python experiments/kernel_time.py --metrics stalls      # + why warps stall (see STALLS)
  PYTHONPATH=. python experiments/kernel_time.py --check ...           # each variant vs the XLA reference
  git show main:pallas_kernels/decode_mgpu.py > /tmp/main.py
  PYTHONPATH=. python experiments/kernel_time.py --wall --variants '[{"source": "/tmp/main.py"}, {}]'

A variant is a dict of `decode_mgpu` module constants to set (STAGES, TILES, KEY_CHAINS, ...),
optionally "num_splits" (replaces `default_num_splits`) and "source", another version of the
module's file to run instead; the others keep their defaults. The script runs itself under
`ncu --metrics gpu__time_duration.sum -k regex:tq_decode_mgpu` (clocks left alone), which times every
launch of the decode kernel alone: XLA's work around it and the host's dispatch are not in it.
Launches of one variant move by about ±1 µs, against ±3 µs or more per call in bench_decode.py's
pipelined timing. Every variant runs `--reps` times in each of two rounds (variants interleaved);
the table gives min / median µs, and the median of each extra metric (--metrics: ncu metric
names, or "stalls" for STALLS: warps stalled per issued instruction, by reason, and the issue
rate; extra metrics replay each launch, which the duration does not mind). Shape: B = 8,
Hq = 32, Hkv = 8, --head-dim, --seq (default the issue's S = 32k). Writes
experiments/results/kernel_time_<device>_<date>.md.

Nsight Compute crashed (segfault at "Connected to process") in about half of the first runs on a
freshly started machine and with `--csv` or `launch__*` metrics; this form ran. With --check the
variants are compared with the float32 XLA reference (bench_decode.check_case) instead, no ncu.
In session 12 (2026-11-29) every ncu run of a branch's variants hung or crashed while the
defaults of main ran in 15 s; `--wall` times the variants without ncu (see `wall`): per call,
with the XLA work around the kernel, ±1-2 µs between rounds after the first. In session 13 ncu
over `experiments/decode_once.py` (one launch per process, `-c 1`) ran in 15 s per config on the
same kernels, stall metrics included: profile the defaults that way.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_decode import CONFIGS, check_case, config_case, random_cache, pallas_attention  # noqa: E402
import pallas_kernels  # noqa: E402
from pallas_kernels import decode_mgpu as M  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from tqjax import cache as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
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


def constants(module) -> dict:
  """What a variant may set: a decode_mgpu module's public constants (upper-case names) and its
  `default_num_splits`, with their values."""
  return {name: value for name, value in vars(module).items() if name.isupper() and name[0] != "_"} | {
      "default_num_splits": module.default_num_splits}


DEFAULTS = constants(M)


@functools.cache
def load_source(path: str):
  """(module, its `constants`): a decode_mgpu source file (e.g. `git show
  main:pallas_kernels/decode_mgpu.py > /tmp/main.py`) as a module of its own."""
  spec = importlib.util.spec_from_file_location(f"decode_mgpu_from_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, constants(module)


def apply(variant: dict) -> None:
  """Makes a variant the decode kernel `dispatch` runs, and drops compiled kernels: "source" (a
  file, `load_source`) replaces the module; the other entries set its constants, or num_splits;
  all else takes that module's defaults."""
  module, defaults = load_source(variant["source"]) if "source" in variant else (M, DEFAULTS)
  for name, value in defaults.items():
    setattr(module, name, value)
  sys.modules[M.__name__] = module  # what `dispatch` imports at each call
  pallas_kernels.decode_mgpu = module
  for name, value in variant.items():
    if name == "num_splits":
      module.default_num_splits = lambda *args, n=value, **kw: n
    elif name in defaults:
      setattr(module, name, value)
    elif name != "source":
      raise ValueError(f"unknown variant attribute {name!r} (one of {sorted(defaults)}, num_splits or source)")
  jax.clear_caches()


def order(variants: list[dict], configs: list[str], reps: int):
  """(variant index, config) of every timed decode launch, in launch order: ROUNDS × variants ×
  configs × reps (`child` runs them so, `parse` reads them so)."""
  for _ in range(ROUNDS):
    for i in range(len(variants)):
      for c in configs:
        yield from [(i, c)] * reps


def child(args, variants: list[dict]) -> None:
  """Under ncu: the decode calls of `order`, each variant's module constants set before its own."""
  b, hq, kh = 8, 32, 8
  caches = {c: random_cache(C.CacheConfig(head_dim=args.head_dim, **CONFIGS[c]), b, kh, args.seq, seed=0)
            for c in args.configs}
  q = jax.random.normal(jax.random.key(0), (b, hq, args.head_dim), jnp.float32)
  f = jax.jit(lambda cache, q: pallas_attention(cache, q))
  current = None
  for i, c in order(variants, args.configs, args.reps):
    if i != current:
      apply(variants[i])
      current = i
    if not dispatch._mosaic_decode(caches[c], hq // kh):
      raise ValueError(f"{c} at head_dim {args.head_dim} does not run the Mosaic GPU kernel")
    jax.block_until_ready(f(caches[c], q))


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
    calls = lambda cache, qs: [pallas_attention(cache, jax.lax.optimization_barrier(q)) for q in qs]
    compiled = []
    for variant in variants:
      apply(variant)
      if not dispatch._mosaic_decode(cache, hq // kh):
        raise ValueError(f"{c} at head_dim {args.head_dim} does not run the Mosaic GPU kernel")
      compiled.append(jax.jit(calls).lower(cache, qs).compile())  # keeps this variant's kernel
      jax.block_until_ready(compiled[-1](cache, qs))
    for _ in range(ROUNDS * args.reps):
      for i, f in enumerate(compiled):
        t0 = time.perf_counter()
        jax.block_until_ready([f(cache, qs) for _ in range(WALL_DISPATCHES)])
        us = (time.perf_counter() - t0) / (WALL_DISPATCHES * WALL_CALLS) * 1e6
        out.setdefault((i, c), []).append({DURATION: us})
  apply({})
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
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args(argv)
  args.configs = args.configs.split(",")
  variants = ast.literal_eval(args.variants)
  if args.child:
    return child(args, variants)
  if args.check:
    for i, variant in enumerate(variants):
      apply(variant)
      for c in args.configs:
        for s in (3001, args.seq):  # an odd capacity (one token per TMA row) and the timed one
          err, nan = check_case(config_case(c, args.head_dim, s), 3)
          print(f"variant {i} {variant} {c} S={s}: rel err {err:.2e}, NaN {nan}", flush=True)
    return
  extra = STALLS if args.metrics == "stalls" else [m for m in args.metrics.split(",") if m]
  if args.wall:
    if extra:
      raise ValueError("--metrics needs ncu: not with --wall")
    got = wall(args, variants)
  else:
    cmd = ["ncu", "--clock-control", "none", "--metrics", ",".join([DURATION, *extra]), "-k", f"regex:{KERNEL}",
           sys.executable, __file__, "--child", "--variants", args.variants, "--configs", ",".join(args.configs),
           "--head-dim", str(args.head_dim), "--seq", str(args.seq), "--reps", str(args.reps)]
    try:
      run = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.ncu_timeout)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"ncu did not finish in {args.ncu_timeout} s (it hung on every run of session 12's "
                         "kernel; --wall times without it)") from e
    if run.returncode:
      raise RuntimeError(f"ncu exited with {run.returncode}:\n{(run.stdout + run.stderr)[-3000:]}")
    got = parse(run.stdout, variants, args.configs, args.reps)
  dev = jax.devices()[0].device_kind
  date = datetime.date.today().isoformat()
  how = (f"{ROUNDS} × {args.reps} samples of {WALL_DISPATCHES} × {WALL_CALLS} calls per row; µs per call by the "
         "host's clock (the kernel and the XLA work around it)" if args.wall else
         f"{ROUNDS} × {args.reps} launches per row; µs of the decode kernel alone")
  md = [f"# Decode kernel time ({'wall clock' if args.wall else 'Nsight Compute'}) — {dev}, {date}", "",
        f"jax {jax.__version__}; B = 8, Hq = 32, Hkv = 8, D = {args.head_dim}, S = {args.seq}; {how}.", "",
        "| variant | config | min µs | median µs |" + "".join(f" {m} |" for m in extra),
        "| --- | --- | ---: | ---: |" + " ---: |" * len(extra)]
  for (i, c), runs in sorted(got.items()):
    ts = [x[DURATION] for x in runs]
    cols = "".join(f" {statistics.median(x.get(m, float('nan')) for x in runs):.3g} |" for m in extra)
    md.append(f"| {variants[i] or 'defaults'} | {c} | {min(ts):.1f} | {statistics.median(ts):.1f} |" + cols)
  text = "\n".join(md) + "\n"
  print(text)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"kernel_time_{dev.replace(' ', '_')}_{date}{'_wall' if args.wall else ''}.md"
  path.write_text(text)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
