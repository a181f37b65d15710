"""Nearest-neighbour search over TurboQuant codes (`tqjax.search`) against faiss, in one run.

Data. Real: all-MiniLM-L6-v2 sentence embeddings (d = 384, the project's Flax port) of distinct
prose sentences cut from the docstrings of the CPython standard library and of a fixed list of
installed Python packages (parsed with `ast`, nothing imported; package versions are recorded in
the JSON). Queries are held-out sentences, never in the base set. The embeddings are cached under
~/.cache/tqjax/ (not committed). Synthetic (d = 1536, 3072, the paper's high-dimensional regime;
no installable real source exists): x = A·g with g ~ N(0, I_r), r = d/8, and a random A [d, r]
whose column i is scaled by 1/√(1+i/8), x = A·g/√r + 0.2·N(0, I_d), unit-normalized: clustered,
low-rank-ish like text embeddings. Said so in every table.

Peers (faiss-cpu 1.15.1, same process, same cores): IndexFlatIP (exact ground truth), IndexPQ
(8- or 6-bit sub-quantizers; real data only: its training dominates the run time at d ≥ 1536) and
IndexPQFastScan (4-bit sub-quantizers, where bits·d/4 divides d), IndexRaBitQ (1 bit, plus `nb_bits` multi-bit), and faiss's
own TurboQuant scalar quantizer (factory "SQtqmse{b}"). Every method is put at equal *stored*
bits per coordinate: bytes per vector count codes, norms and any per-vector side data.

Measured: recall@1@k (k = 1, 2, 4, …, 64: the true nearest neighbour is among the k returned)
and recall@10@10, at 2, 3, 4 bits; indexing time (tqjax `add` vs faiss train + add); queries/s on
this CPU; the distortion cross-check of tqjax codes vs SQtqmse; against RaBitQ, what a short
exact re-rank buys. GPU queries/s are not measured here (no GPU on the benchmark machine).

    python -m experiments.bench_search [--num 101000] [--queries 1000] [--synthetic 5000] [--update-results]

Runtime: embedding is the long part: MiniLM ran 20–30 sentences/s on 2 busy CPU cores (up to
~300/s when idle); new embeddings stop after --embed-minutes (cached chunks are reused). The
comparison took 36 minutes on 2 shared cores at the defaults, most of it IndexPQ training.
`--embed-only` stops after caching the embeddings.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from experiments import harness

CACHE = Path.home() / ".cache" / "tqjax"
# Packages whose docstrings feed the sentence corpus, after the standard library (fixed order).
PACKAGES = ("numpy", "scipy", "jax", "flax", "matplotlib", "pip", "IPython", "optax", "orbax", "pygments",
            "rich", "tornado", "prompt_toolkit", "fontTools", "PIL", "jedi", "parso", "huggingface_hub",
            "_pytest", "tensorstore", "treescope", "jsonschema", "requests", "urllib3", "tqdm")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "testing", "_vendor", "vendor"}


# ----------------------------------------------------------------------------- data


def _docstrings(root: Path):
  """Every module/class/function docstring of the .py files under `root`, in path order."""
  for path in sorted(root.rglob("*.py")):
    if _SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
      continue
    try:
      tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
          yield doc


def corpus_sources() -> list[tuple[str, str, Path]]:
  """(name, version, folder) of each source: the stdlib, then `PACKAGES` that are installed."""
  paths = sysconfig.get_paths()
  out = [("CPython stdlib", sys.version.split()[0], Path(paths["stdlib"]))]
  for name in PACKAGES:
    folder = Path(paths["purelib"]) / name
    if folder.is_dir():
      dist = {"PIL": "pillow", "_pytest": "pytest", "IPython": "ipython", "fontTools": "fonttools"}.get(name, name)
      try:
        version = importlib.metadata.version(dist)
      except importlib.metadata.PackageNotFoundError:
        version = "?"
      out.append((name, version, folder))
  return out


def sentences(limit: int | None = None) -> list[str]:
  """Distinct prose sentences (6–40 words, ≥ 85 % letters and spaces) from `corpus_sources()`."""
  out, seen = [], set()
  for _, _, folder in corpus_sources():
    for doc in _docstrings(folder):
      for para in re.split(r"\n\s*\n", doc):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
          s = s.strip()
          if not 6 <= len(s.split()) <= 40 or s.lower() in seen:
            continue
          if sum(c.isalpha() or c == " " for c in s) < 0.85 * len(s):  # skip code, tables, signatures
            continue
          seen.add(s.lower())
          out.append(s)
          if limit is not None and len(out) >= limit:
            return out
  return out


def embed_sentences(texts: list[str], batch: int = 128) -> np.ndarray:
  """MiniLM unit embeddings [N, 384] float32, batched by token length (less padding)."""
  from tqjax.models import minilm

  model = minilm.MiniLM.from_pretrained()
  order = np.argsort([len(t) for t in texts], kind="stable")
  out = np.zeros((len(texts), 384), np.float32)
  for i in range(0, len(texts), batch):
    idx = order[i : i + batch]
    out[idx] = np.asarray(model.embed([texts[j] for j in idx]))
  return out


def real_embeddings(num: int, minutes: float, chunk: int = 5000) -> tuple[np.ndarray, list[str], dict]:
  """(embeddings [n, 384] float32, their sentences, provenance), n ≤ num.

  The corpus is shuffled once (fixed seed) and embedded in chunks of `chunk` sentences, each
  cached under ~/.cache/tqjax/; new chunks are computed while the elapsed embedding time is below
  `minutes`, so n is `num` or the number that fits the time budget (an unbiased subset either
  way: every chunk is a uniform sample of the corpus).
  """
  texts = sentences()
  order = np.random.default_rng(20260).permutation(len(texts))[:num]
  texts = [texts[i] for i in order]
  key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
  CACHE.mkdir(parents=True, exist_ok=True)
  parts, spent, t0 = [], 0.0, time.time()
  for c0 in range(0, len(texts), chunk):
    path = CACHE / f"minilm_docstrings_{key}_{c0}_{chunk}.npy"
    if not path.is_file():
      if time.time() - t0 > 60 * minutes:
        break
      t = time.time()
      np.save(path, embed_sentences(texts[c0 : c0 + chunk]))
      spent += time.time() - t
      print(f"  embedded {c0 + chunk} sentences ({chunk / (time.time() - t):.0f}/s)", flush=True)
    parts.append(np.load(path))
  emb = np.concatenate(parts)
  info = dict(sources=[f"{n} {v}" for n, v, _ in corpus_sources()],
              count=len(emb), asked=num, embed_seconds_this_run=round(spent, 1))
  return emb, texts[: len(emb)], info


def synthetic_embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
  """The stated generator: unit rows of A·g/√r + 0.2·e, g ~ N(0, I_r), e ~ N(0, I_d), r = d/8,
  A [d, r] Gaussian with column i scaled by 1/√(1 + i/8)."""
  rng = np.random.default_rng((seed, d, 0x5EA5C))
  r = d // 8
  a = rng.standard_normal((d, r)) / np.sqrt(1 + np.arange(r) / 8)
  x = rng.standard_normal((n, r)) @ a.T / np.sqrt(r) + 0.2 * rng.standard_normal((n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- methods

KS = (1, 2, 4, 8, 16, 32, 64)


def recall_at(gt: np.ndarray, ids: np.ndarray) -> dict:
  """recall@1@k for k in KS (the true nearest neighbour is among the first k) and recall@10@10."""
  hit = ids == gt[:, :1]
  out = {f"r1@{k}": float(np.mean(np.any(hit[:, :k], axis=1))) for k in KS}
  out["r10@10"] = float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(gt, ids)]))
  return out


def _timed(fn, repeat: int = 1):
  """(result, best wall seconds over `repeat` runs)."""
  best, out = float("inf"), None
  for _ in range(repeat):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return out, best


def run_tqjax(base, queries, bits: int, estimator: str, rerank: int | None = None, k: int = 64) -> dict:
  """tqjax.search at `bits`: add time (compile excluded, reported apart), search time, results."""
  import jax

  from tqjax import search as S

  d = base.shape[1]
  cfg = S.IndexConfig(d, bits, metric="ip", estimator=estimator, rerank_store="int8" if rerank else None)
  xb = jax.device_put(base)
  t = time.perf_counter()
  S.add(S.init_index(cfg, len(base)), xb).codes.block_until_ready()  # compiles add for this shape
  compile_add = time.perf_counter() - t
  ix, add_s = _timed(lambda: jax.block_until_ready(S.add(S.init_index(cfg, len(base)), xb)), repeat=2)
  run = lambda: jax.block_until_ready(S.search(ix, queries, k, rerank=rerank))
  run()
  (scores, ids), search_s = _timed(run, repeat=2)
  nbytes_vec = S.bits_per_coordinate(cfg) * d / 8 + (d + 4 if rerank else 0)  # int8 store + its scale
  name = f"tqjax {estimator}" + (f" + int8 re-rank {rerank}" if rerank else "")
  return dict(method=name, bits=bits, bytes_per_vector=nbytes_vec, index_s=add_s, compile_s=compile_add,
              qps=len(queries) / search_s, ids=np.asarray(ids))


def faiss_factories(d: int, bits: int, pq: bool = True) -> list[tuple[str, str]]:
  """(label, factory string) of the faiss peers at `bits` per coordinate on d dims (IndexPQ with
  8-bit sub-quantizers only if `pq`: its training dominates the run time at d ≥ 1536)."""
  out = [(f"faiss SQtqmse{bits}", f"SQtqmse{bits}")]
  # IndexPQ: M sub-quantizers of nbits each with M·nbits = bits·d and M | d.
  for nbits in (8, 6, 4) if pq else ():
    m = bits * d // nbits
    if bits * d % nbits == 0 and d % m == 0:
      out.append((f"faiss PQ{m}x{nbits}", f"PQ{m}x{nbits}"))
      break
  m = bits * d // 4  # fast scan: 4-bit sub-quantizers only
  if d % m == 0:
    out.append((f"faiss PQ{m}x4fs", f"PQ{m}x4fs"))
  suffix = "" if bits == 1 else str(bits)
  out += [(f"faiss RaBitQ{suffix}", f"RaBitQ{suffix}"), (f"faiss RaBitQfs{suffix}", f"RaBitQfs{suffix}")]
  return out


def run_faiss(base, queries, label: str, factory: str, k: int = 64, train_max: int = 10_000) -> dict:
  """A faiss index: train on at most `train_max` base vectors (a fixed random subset), add all."""
  import faiss

  ix = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
  train = base[np.sort(np.random.default_rng(1).permutation(len(base))[:train_max])]
  t = time.perf_counter()
  ix.train(train)
  ix.add(base)
  index_s = time.perf_counter() - t
  ix.search(queries[:8], k)
  (_, ids), search_s = _timed(lambda: ix.search(queries, k), repeat=2)
  return dict(method=label, bytes_per_vector=float(ix.code_size), index_s=index_s, qps=len(queries) / search_s, ids=ids)


def distortion_check(base: np.ndarray, bits: int) -> dict:
  """Mean ‖x − x̂‖² over unit vectors: tqjax mse codes vs faiss SQtqmse, with standard errors."""
  import faiss
  import jax.numpy as jnp

  from tqjax import codebook, quantizer

  x = base / np.linalg.norm(base, axis=1, keepdims=True)
  tq = quantizer.make_quantizer(x.shape[1], bits)
  err_t = np.sum((np.asarray(quantizer.decode(tq, quantizer.encode(tq, jnp.asarray(x)))) - x) ** 2, axis=1)
  ix = faiss.index_factory(x.shape[1], f"SQtqmse{bits}", faiss.METRIC_INNER_PRODUCT)
  ix.train(x)
  err_f = np.sum((ix.sa_decode(ix.sa_encode(x)) - x) ** 2, axis=1)
  se = lambda e: float(np.std(e) / np.sqrt(len(e)))
  return dict(bits=bits, tqjax=float(err_t.mean()), tqjax_se=se(err_t), faiss=float(err_f.mean()), faiss_se=se(err_f),
              theory=codebook.distortion(bits, x.shape[1]))


def bench_dataset(name: str, base: np.ndarray, queries: np.ndarray, bits_list, estimators, rerank: int,
                  pq: bool = True, report=lambda ds: None) -> dict:
  """All methods on one dataset: ground truth, recalls, bytes, indexing time, queries/s."""
  import faiss

  gt_ix = faiss.IndexFlatIP(base.shape[1])
  gt_ix.add(base)
  (_, gt), flat_s = _timed(lambda: gt_ix.search(queries, 64))
  rows = [dict(method="faiss IndexFlatIP (exact)", bits=32, bytes_per_vector=4.0 * base.shape[1], index_s=0.0,
               qps=len(queries) / flat_s, **recall_at(gt, gt))]
  ds = dict(name=name, n=len(base), queries=len(queries), d=base.shape[1], rows=rows, distortion=[])
  for bits in bits_list:
    runs = [lambda e=e: run_tqjax(base, queries, bits, e) for e in estimators]
    if rerank:
      runs.append(lambda: run_tqjax(base, queries, bits, estimators[-1], rerank=rerank))
    runs += [lambda lf=lf: run_faiss(base, queries, *lf) for lf in faiss_factories(base.shape[1], bits, pq)]
    for fn in runs:
      r = fn()
      r["bits"] = bits
      r.update(recall_at(gt, r.pop("ids")))
      rows.append(r)
      print(f"  [{name}] {bits}b {r['method']:<34} {r['bytes_per_vector']:7.1f} B  r1@1 {r['r1@1']:.3f} "
            f"r1@16 {r['r1@16']:.3f} r10@10 {r['r10@10']:.3f}  index {r['index_s']:.2f} s  {r['qps']:.0f} q/s",
            flush=True)
      report(ds)  # partial results survive an interrupted run
  ds["distortion"] = [distortion_check(base[:20000], b) for b in bits_list]
  report(ds)
  return ds


# ----------------------------------------------------------------------------- report


def machine() -> dict:
  """`harness.stamp()` plus the faiss version and the load average (the CPU is shared)."""
  import os

  import faiss

  return dict(harness.stamp(), faiss=faiss.__version__, load=os.getloadavg()[0])


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [
      "# Nearest-neighbour search: tqjax.search vs faiss (CPU)", "",
      f"{m['date']}, {m['device']} (shared: load average {m['load']:.1f} at the end), "
      f"commit {m['commit']}, jax {m['jax']}, faiss-cpu {m['faiss']}. "
      f"`python -m experiments.bench_search {result['argv']}`.", "",
      "Bytes per vector count everything the scan reads per vector (codes, norms/scales, RaBitQ factors); "
      "ids are implicit for faiss and not counted for tqjax either (+4 B int32 each when stored). The int8 "
      "re-rank rows also hold an int8 copy of the vector (d + 4 B), read only for the re-ranked candidates. "
      "Indexing = faiss train (on at most 10,000 base vectors) + add, tqjax `add` (its one-off jit compile in the JSON). Queries/s: all queries "
      "in one batch, k = 64, same process and cores for every method. recall@1@k: the exact nearest neighbour "
      "(IndexFlatIP) is among the k returned; recall@10@10: overlap of the 10 returned with the true 10.", "",
  ]
  for ds in result["datasets"]:
    lines += [f"## {ds['name']}: {ds['n']} base vectors, {ds['queries']} held-out queries, d = {ds['d']}", "",
              "| bits | method | B/vector | bits/coord | r@1@1 | r@1@2 | r@1@4 | r@1@8 | r@1@16 | r@1@32 | r@1@64 | r@10@10 | index s | queries/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ds["rows"]:
      lines.append(f"| {r['bits']} | {r['method']} | {r['bytes_per_vector']:.0f} | {8 * r['bytes_per_vector'] / ds['d']:.2f} | "
                   + " | ".join(f"{r[f'r1@{k}']:.3f}" for k in KS)
                   + f" | {r['r10@10']:.3f} | {r['index_s']:.3g} | {r['qps']:.0f} |")
    lines += ["", "Distortion cross-check, mean ‖x − x̂‖² of unit vectors (± standard error; theory = "
              "the Lloyd–Max D_mse at this d):", "", "| bits | tqjax mse | faiss SQtqmse | theory |", "|---|---|---|---|"]
    for dd in ds["distortion"]:
      lines.append(f"| {dd['bits']} | {dd['tqjax']:.5f} ± {dd['tqjax_se']:.5f} | {dd['faiss']:.5f} ± {dd['faiss_se']:.5f} "
                   f"| {dd['theory']:.5f} |")
    lines.append("")
  return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
  plt = harness.pyplot()
  sets = result["datasets"]
  bits_list = sorted({r["bits"] for r in sets[0]["rows"] if r["bits"] != 32})
  fig, axes = plt.subplots(len(sets), len(bits_list), figsize=(5 * len(bits_list), 4 * len(sets)), squeeze=False)
  for row, ds in zip(axes, sets):
    for ax, bits in zip(row, bits_list):
      for r in ds["rows"]:
        if r["bits"] == bits:
          style = "-o" if r["method"].startswith("tqjax") else "--s"
          ax.plot(KS, [r[f"r1@{k}"] for k in KS], style, ms=3, label=f"{r['method']} ({r['bytes_per_vector']:.0f} B)")
      ax.set(xscale="log", xlabel="k", ylabel="recall@1@k", title=f"{ds['name']}, {bits} bits", ylim=(0, 1.01))
      ax.set_xticks(KS, [str(k) for k in KS])
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6, loc="lower right")
  m = result["machine"]
  fig.suptitle(f"tqjax.search vs faiss-cpu {m['faiss']}: {m['device']}, {m['date']}, commit {m['commit']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  ap = harness.parser(__doc__)
  ap.add_argument("--num", type=int, default=101_000, help="real sentences asked for (base + queries)")
  ap.add_argument("--queries", type=int, default=1000, help="held-out query sentences")
  ap.add_argument("--embed-minutes", type=float, default=15.0, help="time budget for new embeddings")
  ap.add_argument("--embed-only", action="store_true", help="cache the real embeddings and stop")
  ap.add_argument("--synthetic", type=int, default=5_000, help="synthetic base size at d=1536/3072 (0: skip)")
  ap.add_argument("--limit", type=int, default=None, help="use only the first LIMIT cached embeddings (quick runs)")
  ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
  ap.add_argument("--rerank", type=int, default=100, help="int8 re-rank candidates for the re-rank rows (0: none)")
  args = ap.parse_args(argv)
  emb, texts, info = real_embeddings(args.num, args.embed_minutes)
  emb = emb[: args.limit]
  print(f"real embeddings: {emb.shape}", flush=True)
  if args.embed_only:
    return
  estimators = ("norm", "unit", "ratio")
  argv_s = " ".join(argv if argv is not None else sys.argv[1:])
  m = machine()
  cpu = re.sub(r"[^A-Za-z0-9]+", "_", m["device"].split("(")[0].removeprefix("CPU ")).strip("_")
  stem = harness.out_dir(args) / f"bench_search_{cpu}_{m['date'][:10]}"
  done: list[dict] = []

  def report(ds: dict, final: bool = False) -> None:
    result = dict(machine=machine(), argv=argv_s, corpus=info, datasets=[*done, ds] if ds else done)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    Path(f"{stem}.md").write_text(markdown(result))
    if final:
      plot(result, Path(f"{stem}.png"))
      print(markdown(result))
      print(f"wrote {stem}.md/.json/.png")

  q, base = emb[: args.queries], emb[args.queries :]
  done.append(bench_dataset("MiniLM-L6 docstrings (real, d=384)", base, q, args.bits, estimators, args.rerank,
                            report=report))
  for d in (1536, 3072) if args.synthetic else ():
    x = synthetic_embeddings(args.synthetic + 200, d)
    done.append(bench_dataset(f"synthetic low-rank+noise (d={d})", x[200:], x[:200], args.bits, estimators,
                              args.rerank, pq=False, report=report))
  report(None, final=True)


if __name__ == "__main__":
  main()
