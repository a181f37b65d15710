"""KV-cache fidelity: tqjax (TurboQuant) against integer baselines, through attention.

Two data sets:
* real: MiniLM-L6 q/k/v (minilm_l6_qkv.npz in `tqjax.data.data_dir()`, env TQJAX_DATA), 2 segments x 6 layers x 12 heads x
  512 tokens x head_dim 32, bidirectional attention softmax(q·kᵀ/√32)·v over all 512 tokens.
* synthetic: `tqjax.synthetic.decoder_like_kv` (B=2, 8 heads, 1024 tokens, head_dim 128,
  4 key outlier channels x20), also attended bidirectionally (its queries favour a uniformly
  random key of the whole sequence, so a causal mask would cut that structure).

Each row quantizes K and V; queries stay float32. tqjax rows go through the cache: prefill all
tokens, logits from `tqjax.ops.scores` (query tokens folded into the query-head axis, GQA
style: q [B, H·T, D] against K = H kv heads), outputs from `tqjax.ops.chunked_attention(...,
causal=False)`, so values are only ever consumed by the cache's own attention path. Baselines
are dequantized and attended densely.

Metrics, per (sequence, head) unit, then mean ± standard error over units:
* logit RMSE / logit std: sqrt(mean_{t,s}(l̂ − l)²) / sqrt(mean_t var_s l).
* KL(p‖p̂): mean over queries of Σ_s p log(p/p̂), p = exact attention row.
* out rel err: ‖O − Ô‖_F / ‖O‖_F over the unit's queries.
* top-1: fraction of queries whose argmax key is unchanged.
Bits: K and V bits per coordinate from the formulas (`bits_per_coordinate_kv`, baselines' own);
"nbytes bits" = 8·(bytes of every stored array) / (2·tokens·heads·D), per-sequence side data
(key mean, channel permutations, lengths) included, amortized over the tokens. The script
asserts that the per-token arrays reproduce the formulas exactly and `nbytes == expected_nbytes`.
The metrics, both paths and the accounting live in `tqjax.fidelity`.

Run: python -m experiments.kv_fidelity   (about 10 minutes on a 2-core CPU; writes
kv_fidelity.{md,json,png} into --out, see experiments/harness.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments import harness
from tqjax import cache as tqc
from tqjax.data import data_path
from tqjax.fidelity import (
    METRICS,
    attention_metrics,
    baseline_quantizers,
    cache_accounting,
    dense_attention,
    evaluate_baseline,
    load_minilm_qkv,
    not_worse,
    paired,
    prefill_and_attend,
    summarize,
)
from tqjax.synthetic import decoder_like_kv

SYNTH = dict(batch=2, heads=8, tokens=1024, head_dim=128, n_outlier_channels=4, outlier_scale=20.0, seed=0)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


def load_synthetic(cfg=SYNTH):
  c = dict(cfg)
  key = jax.random.key(c.pop("seed"))
  q, k, v = decoder_like_kv(key, c["batch"], c["heads"], c["tokens"], c["head_dim"],
                            c["n_outlier_channels"], c["outlier_scale"])
  return q, k, v, 1.0 / math.sqrt(c["head_dim"])


# ----------------------------------------------------------------------------- core metrics


# ----------------------------------------------------------------------------- baselines


# ----------------------------------------------------------------------------- tqjax


VARIANTS = {
    # name: CacheConfig options (values are always mse; they follow norm_correction)
    "mse": dict(k_variant="mse", norm_correction=False, center_keys=False),
    "mse+nc": dict(k_variant="mse", norm_correction=True, center_keys=False),
    "prod, Gaussian S (V mse+nc)": dict(k_variant="prod", qjl_kind="gaussian", norm_correction=True, center_keys=False),
    "prod, orthogonal S (V mse+nc)": dict(k_variant="prod", qjl_kind="orthogonal", norm_correction=True, center_keys=False),
    "mse+nc+centre": dict(k_variant="mse", norm_correction=True, center_keys=True),
    "mse+nc+centre, fp16 norms": dict(k_variant="mse", norm_correction=True, center_keys=True, norm_dtype="float16"),
    "mse+nc+centre+outliers": dict(k_variant="mse", norm_correction=True, center_keys=True, outlier_channels=-1),
}


def tqjax_configs(head_dim: int):
  """(row name, variant name, CacheConfig) for every tqjax row at this head_dim."""
  rows = []
  for vname, opts in VARIANTS.items():
    for bits in (2, 3, 4):
      o = {"norm_dtype": "float32", **opts}  # float32 norms unless the variant names float16
      label = f"tqjax {vname} {bits}b"
      if o.get("outlier_channels") == -1:
        o["outlier_channels"] = head_dim // 4  # the paper's split: a quarter of channels at bits+1
        label = f"tqjax {vname} ({head_dim // 4} ch @ {bits + 1}b) {bits}b"
      rows.append((label, vname, tqc.CacheConfig(head_dim=head_dim, k_bits=bits, v_bits=bits, **o)))
  for kb, vb in ((4, 3), (3, 2)):
    rows.append((f"tqjax mse+nc+centre, fp16 norms K{kb}/V{vb}", "asym K/V",
                 tqc.CacheConfig(head_dim=head_dim, k_bits=kb, v_bits=vb, k_variant="mse",
                                 norm_correction=True, center_keys=True, norm_dtype="float16")))
  return rows


@functools.partial(jax.jit, static_argnames="scale")
def _tq_eval(cache0, q, k, v, scale, logits_ref, out_ref):
  cache, logits, out = prefill_and_attend(cache0, q, k, v, scale)
  return cache, attention_metrics(logits_ref, out_ref, logits, out)


def evaluate_tqjax(config: tqc.CacheConfig, q, k, v, scale, ref):
  b, h, t, _ = k.shape
  cache0 = tqc.init_cache(config, b, h, t)
  cache, per_unit = _tq_eval(cache0, q, k, v, scale, *ref)
  return per_unit, cache_accounting(cache)


# ----------------------------------------------------------------------------- driver


def run_dataset(name, q, k, v, scale, groups: dict, t0: float):
  """All rows on one data set → list of row dicts with per-group summaries."""
  ref = dense_attention(q, k, v, scale)
  jax.block_until_ready(ref)
  rows = []
  todo = [(n, "baseline", None, (fk, fv)) for n, fk, fv in baseline_quantizers()]
  todo += [(n, vn, cfg, None) for n, vn, cfg in tqjax_configs(k.shape[-1])]
  for i, (label, family, cfg, fns) in enumerate(todo):
    t1 = time.perf_counter()
    if cfg is None:
      per_unit, acct = evaluate_baseline(*fns, q, k, v, scale, ref)
    else:
      per_unit, acct = evaluate_tqjax(cfg, q, k, v, scale, ref)
    per_unit = {m: np.asarray(a) for m, a in per_unit.items()}
    row = {"name": label, "family": family, **acct,
           "config": dataclasses.asdict(cfg) if cfg is not None else None,
           "summary": {g: summarize(per_unit, sel) for g, sel in groups.items()},
           "per_unit": {m: a.tolist() for m, a in per_unit.items()}}
    rows.append(row)
    s = row["summary"]["all"]
    _log(f"[{time.perf_counter() - t0:6.1f}s] {name} {i + 1:2d}/{len(todo)} {label:<55s} "
         f"KL {s['kl']['mean']:.2e} out {s['out_rel_err']['mean']:.3f} top1 {s['top1']['mean']:.3f} "
         f"({time.perf_counter() - t1:.1f}s)")
  return rows


def _fmt(x, se=None, kind="g"):
  if kind == "pct":
    return f"{100 * x:.1f}%"
  if kind == "kl":
    s = f"{x:.2e}" if x < 0.01 else f"{x:.4f}"
    return s if se is None else s + f" ± {se:.1e}"
  return f"{x:.4f}"


def table(rows, group: str, with_bits: bool = True) -> str:
  head = ["method"]
  if with_bits:
    head += ["K bits", "V bits", "nbytes bits"]
  head += ["logit RMSE / std", "KL(p‖p̂) ± SE", "out rel err", "top-1"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    s = r["summary"][group]
    cells = [r["name"]]
    if with_bits:
      cells += [f"{r['k_bits']:.3f}", f"{r['v_bits']:.3f}", f"{r['nbytes_bits']:.3f}"]
    cells += [_fmt(s["logit_rel_rmse"]["mean"]), _fmt(s["kl"]["mean"], s["kl"]["se"], "kl"),
              _fmt(s["out_rel_err"]["mean"]), _fmt(s["top1"]["mean"], kind="pct")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- recommendation


def row_id(r) -> str:
  """A name that is the same on both data sets (outlier row labels name the channel count)."""
  c = r["config"]
  return r["name"] if c is None else f"{r['family']} K{c['k_bits']}/V{c['v_bits']}"


def _row(rows, rid):
  return next(r for r in rows if row_id(r) == rid)


def _kl(r, group="all"):
  return r["summary"][group]["kl"]["mean"]


REFERENCE = "int4 per token, group 32"  # the quality bar: the common 4-bit (5.0 b/coord) KV cache


def _key_setting(cfg):
  return tuple(cfg[f] for f in ("k_bits", "k_variant", "norm_correction", "center_keys", "qjl_kind", "outlier_channels"))


def recommend(real, synth) -> dict:
  """The default key and value settings, derived from the rows by a stated rule.

  Keys: the cheapest tqjax key setting (mean K bits over both data sets) whose KL and top-1
  are not worse than the int4-per-token (group 32) baseline by more than 2 paired SE on both
  data sets (KL and top-1 depend on the keys alone). Values: with that key setting, the fewest
  value bits whose output error passes the same test. Ties go to the lower summed KL.
  """
  refs = {"real": _row(real, REFERENCE), "synthetic": _row(synth, REFERENCE)}
  data = {"real": real, "synthetic": synth}
  tq_names = [row_id(r) for r in real if r["config"] is not None]

  def key_ok(name):
    return all(not_worse(_row(data[d], name), refs[d], "kl") and
               not_worse(_row(data[d], name), refs[d], "top1", higher_is_better=True) for d in data)

  key_pass = [n for n in tq_names if key_ok(n)]
  if not key_pass:
    return {"rule_met": False, "key_row": None, "value_row": None}
  cost = lambda n: (sum(_row(data[d], n)["k_bits"] for d in data), sum(_kl(_row(data[d], n)) for d in data))
  key_row = min(key_pass, key=cost)
  setting = _key_setting(_row(real, key_row)["config"])
  same_keys = [n for n in tq_names if _key_setting(_row(real, n)["config"]) == setting]
  val_ok = [n for n in same_keys if all(not_worse(_row(data[d], n), refs[d], "out_rel_err") for d in data)]
  vcost = lambda n: (sum(_row(data[d], n)["v_bits"] for d in data), sum(_row(data[d], n)["summary"]["all"]["out_rel_err"]["mean"] for d in data))
  value_row = min(val_ok, key=vcost) if val_ok else None
  return {"rule_met": value_row is not None, "key_row": key_row, "value_row": value_row,
          "key_candidates": key_pass, "value_candidates": val_ok,
          "rule": "cheapest tqjax setting not worse than int4 per token (group 32) by > 2 paired SE on both data "
                  "sets: keys on KL and top-1, values (given those keys) on output error"}


def resident_bytes(config: tqc.CacheConfig, tokens=32768, batch=1, kv_heads=8, layers=32) -> dict:
  """Resident bytes of a cache (one layer, and `layers` layers) against bf16; checked on a real cache."""
  exp = tqc.expected_nbytes(config, batch, kv_heads, tokens)
  real = tqc.nbytes(tqc.init_cache(config, batch, kv_heads, tokens))
  small = tqc.init_cache(config, batch, kv_heads, 256)
  assert real == exp and tqc.nbytes(small) == tqc.expected_nbytes(config, batch, kv_heads, 256)
  bf16 = 2 * batch * kv_heads * tokens * config.head_dim * 2
  return {"tokens": tokens, "batch": batch, "kv_heads": kv_heads, "head_dim": config.head_dim,
          "layer_bytes": exp, "layer_bytes_nbytes": real, "bf16_layer_bytes": bf16,
          "layers": layers, "model_bytes": exp * layers, "bf16_model_bytes": bf16 * layers,
          "ratio": bf16 / exp}


# ----------------------------------------------------------------------------- main


def main(argv=None):
  args = harness.parser(__doc__).parse_args(argv)
  out = harness.out_dir(args)
  st = harness.stamp()
  t0 = time.perf_counter()
  dev = jax.devices()[0]
  _log(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind})")

  q, k, v, scale, (n_seg, n_lay) = load_minilm_qkv()
  units = np.arange(n_seg * n_lay)  # batch index = segment·L + layer
  layer0 = (units % n_lay == 0)
  real_groups = {"all": None, "layer0": layer0}
  real = run_dataset("real", q, k, v, scale, real_groups, t0)
  del q, k, v

  qs, ks, vs, sscale = load_synthetic()
  synth = run_dataset("synth", qs, ks, vs, sscale, {"all": None}, t0)
  del qs, ks, vs

  rec = recommend(real, synth)
  runtime = time.perf_counter() - t0
  write_outputs(real, synth, rec, runtime, st, out)
  plot(real, synth, dev.device_kind, datetime.date.today().isoformat(), out / "kv_fidelity.png")
  _log(f"done in {runtime:.1f}s")


def write_outputs(real, synth, rec, runtime, st, out):
  rec_cfg, rec_text, rb = recommendation_text(real, synth, rec)
  md = [
      "# KV-cache fidelity: tqjax vs baselines",
      "",
      f"{harness.stamp_line(st)} "
      f"Runtime: {runtime:.0f} s (`python -m experiments.kv_fidelity`).",
      "",
      "**Real data**: MiniLM-L6 (all-MiniLM-L6-v2, BERT encoder, no RoPE) q/k/v from "
      "`shared/data/minilm_l6_qkv.npz`: 2 segments x 6 layers x 12 heads x 512 tokens, head_dim 32, "
      "scale 1/√32, bidirectional attention over all 512 tokens. Units = 144 (segment, layer, head); "
      "layer 0 = 24 units (it holds head 2 with ~3x the key/query norms of the other heads).",
      "",
      f"**Synthetic data**: `experiments.synthetic.decoder_like_kv` (B={SYNTH['batch']}, "
      f"{SYNTH['heads']} heads, {SYNTH['tokens']} tokens, head_dim {SYNTH['head_dim']}, "
      f"{SYNTH['n_outlier_channels']} key outlier channels x{SYNTH['outlier_scale']:g}, seed {SYNTH['seed']}), "
      "bidirectional attention over all tokens (its queries favour a uniformly random key). Units = 16.",
      "",
      "Method: queries stay float32; K and V are quantized. tqjax rows go through the compressed "
      "cache: `prefill` of all tokens, logits from `tqjax.ops.scores` (query tokens folded into "
      "the query-head axis), outputs from `tqjax.ops.chunked_attention(causal=False)`; values are "
      "never decoded outside the cache's attention path. Baselines (`tqjax/baselines.py`) are "
      "dequantized and attended densely. tqjax `Nb` = k_bits = v_bits = N unless K/V named; "
      "`nc` = norm correction (keys and values), `centre` = per-head key mean subtracted at prefill, "
      "prod rows use (N−1)-bit codebook + 1-bit QJL keys with mse+nc values; norms are float32 unless "
      "noted; outlier rows quantize the D/4 highest-RMS channels separately at N+1 bits.",
      "",
      "Columns: K/V bits per coordinate from the formulas (`bits_per_coordinate_kv`; baselines' own), "
      "asserted equal to the bytes of the per-token arrays; `nbytes bits` = 8·(all stored bytes, "
      "per-sequence key mean / channel permutations / lengths included) / (2·tokens·heads·D), with "
      "`nbytes(cache) == expected_nbytes` asserted. logit RMSE / std = sqrt(mean (l̂−l)²) / sqrt(mean_t var_s l); "
      "KL(p‖p̂) mean over queries (nats); out rel err = ‖O−Ô‖_F/‖O‖_F per unit; top-1 = argmax agreement. "
      "All are means over units; ± is the standard error over units.",
      "",
      "## Real MiniLM q/k/v: all layers and heads",
      "",
      table(real, "all"),
      "",
      "## Real MiniLM q/k/v: layer 0 only",
      "",
      table(real, "layer0", with_bits=False),
      "",
      "## Synthetic decoder-like keys (head_dim 128, outlier channels)",
      "",
      table(synth, "all"),
      "",
      "## Recommendation",
      "",
      rec_text,
      "",
  ]
  md_text = "\n".join(md)
  payload = {
      "date": st["date"], "jax": st["jax"], "device": {"platform": st["platform"], "kind": st["device"]},
      "commit": st["commit"],
      "runtime_s": runtime,
      "data": {"real": {"path": data_path("minilm_l6_qkv.npz").name, "shape": "[2 seg, 6 layers, 12 heads, 512 tokens, 32]",
                        "attention": "bidirectional", "unit_order": "per_unit arrays are [segment*6 + layer, head]"},
               "synthetic": {**SYNTH, "attention": "bidirectional"}},
      "metric_definitions": {
          "logit_rel_rmse": "sqrt(mean_{t,s}(l_hat-l)^2) / sqrt(mean_t var_s l) per unit",
          "kl": "mean over queries of KL(p || p_hat), nats", "out_rel_err": "||O-O_hat||_F / ||O||_F per unit",
          "top1": "fraction of queries with unchanged argmax"},
      "real": real, "synthetic": synth,
      "recommendation": {**rec, "text": rec_text,
                         "config": dataclasses.asdict(rec_cfg) if rec_cfg else None, "resident_bytes": rb},
  }
  harness.write(out, "kv_fidelity", md_text, payload)
  print("\n".join(md))


# (family, legend label, marker) per tqjax curve; "mse+nc+centre" (float32 norms) lies on the fp16
# row's KL, and the asymmetric K/V rows share their keys (so their KL) with the K=V rows.
PLOT_FAMILIES = (
    ("mse", "tqjax mse", "o"),
    ("mse+nc", "tqjax mse+nc", "s"),
    ("mse+nc+centre, fp16 norms", "tqjax mse+nc+centre (fp16 norms)", "D"),
    ("prod, orthogonal S (V mse+nc)", "tqjax prod, orthogonal S", "^"),
    ("prod, Gaussian S (V mse+nc)", "tqjax prod, Gaussian S", "v"),
    ("mse+nc+centre+outliers", "tqjax mse+nc+centre+outliers (D/4 ch)", "P"),
)
PLOT_BASELINES = {
    "bf16": "bf16", "int8 per token": "int8", "int4 per token, group 32": "int4 g32",
    "KIVI-2 (K per channel, V per token)": "KIVI-2", "KIVI-4 (K per channel, V per token)": "KIVI-4",
    "rand. Hadamard + int4 group 32": "Hadamard+int4",
}


def plot(real, synth, device: str, date: str, path: Path) -> None:
  """KL(exact‖quantized) vs stored bits per coordinate (mean of K and V), one panel per data set."""
  plt = harness.pyplot()
  from matplotlib.ticker import NullFormatter  # noqa: PLC0415

  bits = lambda r: (r["k_bits"] + r["v_bits"]) / 2
  kl = lambda r: (r["summary"]["all"]["kl"]["mean"], r["summary"]["all"]["kl"]["se"])
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
  titles = ("Real MiniLM-L6 q/k/v (head_dim 32)", "Synthetic decoder-like K/V (head_dim 128)")
  for ax, rows, title in zip(axes, (real, synth), titles):
    for family, label, marker in PLOT_FAMILIES:
      fr = sorted((r for r in rows if r["family"] == family), key=bits)
      ax.errorbar([bits(r) for r in fr], [kl(r)[0] for r in fr], yerr=[kl(r)[1] for r in fr], fmt=marker + "-",
                  ms=5, capsize=2, label=label)
    labels = []  # [x, y, text]; baselines that sit on the same point share one label
    for r in sorted((r for r in rows if r["family"] == "baseline"), key=lambda r: (bits(r), -kl(r)[0])):
      x, (y, _) = bits(r), kl(r)
      ax.plot(x, y, "k*", ms=9, label="baselines" if not labels else None)
      name = PLOT_BASELINES.get(r["name"], r["name"])
      if labels and labels[-1][0] == x and abs(math.log(labels[-1][1] / y)) < 0.15:
        labels[-1][2] += " / " + name
      else:
        labels.append([x, y, name])
    for x, y, text in labels:
      ax.annotate(text, (x, y), xytext=(6, 2), textcoords="offset points", fontsize=8)
    ax.set(title=title, xscale="log", yscale="log", xlabel="stored bits per coordinate (mean of K and V)",
           ylabel="KL(exact ‖ quantized), nats")
    ticks = [2, 3, 4, 5, 6, 8, 10, 16]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8, loc="lower left")
  fig.suptitle(f"KV-cache fidelity: attention KL vs bits (mean ± SE over units) — {device}, {date}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _bytes_fmt(rb):
  mib = lambda x: f"{x / 2**20:.1f} MiB"
  gib = lambda x: f"{x / 2**30:.2f} GiB"
  return {"layer": mib(rb["layer_bytes"]), "bf16_layer": mib(rb["bf16_layer_bytes"]),
          "model": gib(rb["model_bytes"]), "bf16_model": gib(rb["bf16_model_bytes"]),
          "ratio": f"{rb['ratio']:.2f}x", "layer_exact": f"{rb['layer_bytes']:,}"}


def _find(rows, family, k_bits, v_bits=None):
  v_bits = k_bits if v_bits is None else v_bits
  return next(r for r in rows if r["family"] == family and r["config"]["k_bits"] == k_bits
              and r["config"]["v_bits"] == v_bits)


def _m(r, metric="kl", group="all"):
  return r["summary"][group][metric]["mean"]


def recommended_config(real, rec, head_dim: int) -> tqc.CacheConfig:
  kc = _row(real, rec["key_row"])["config"]
  vb = _row(real, rec["value_row"])["config"]["v_bits"]
  fields = {f: kc[f] for f in ("k_bits", "k_variant", "norm_correction", "norm_dtype", "rotation", "qjl_kind",
                               "center_keys", "outlier_bits", "window", "window_dtype", "seed")}
  n_out = head_dim // 4 if kc["outlier_channels"] else 0
  return tqc.CacheConfig(head_dim=head_dim, v_bits=vb, outlier_channels=n_out, **fields)


def recommendation_text(real, synth, rec) -> tuple[tqc.CacheConfig | None, str, dict]:
  """The Recommendation paragraph, every number read from the rows."""
  if not rec["rule_met"]:
    return None, ("No tqjax configuration met the rule (" + rec["rule"] + "); see the tables.", {})
  cfg = recommended_config(real, rec, 128)
  alt = dataclasses.replace(cfg, v_bits=cfg.v_bits - 1)
  rb, rb_alt = resident_bytes(cfg), resident_bytes(alt)
  kb, vb = cfg.k_bits, cfg.v_bits
  R, S = real, synth
  ref_r, ref_s = _row(R, REFERENCE), _row(S, REFERENCE)
  fam = lambda rows, f, b=3: _find(rows, f, b)
  kr, ks = _row(R, rec["key_row"]), _row(S, rec["key_row"])
  vr, vs = _row(R, rec["value_row"]), _row(S, rec["value_row"])
  low_r = _find(R, "asym K/V", kb, vb - 1) if vb - 1 >= 2 else None
  low_s = _find(S, "asym K/V", kb, vb - 1) if vb - 1 >= 2 else None
  dk_r, sk_r = paired(kr, ref_r, "kl")
  dk_s, sk_s = paired(ks, ref_s, "kl")
  k_lower = _find(R, "mse+nc+centre", kb - 1) if kb > 2 else None
  out3_r, out3_s = _find(R, "mse+nc+centre+outliers", 3), _find(S, "mse+nc+centre+outliers", 3)
  base4_s = _find(S, "mse+nc+centre", 4)
  f = lambda x: f"{x:.3g}"
  pct = lambda x: f"{100 * x:.1f}%"
  norm = cfg.norm_dtype
  # How much float16 norms move any metric (fp16 rows vs the same rows with float32 norms).
  fp16_shift = max(abs(_m(r16, m) - _m(_find(rows, "mse+nc+centre", b), m))
                   for rows in (R, S) for b in (2, 3, 4) for r16 in [_find(rows, "mse+nc+centre, fp16 norms", b)]
                   for m in METRICS)
  kivi_r, kivi_s = _row(R, "KIVI-2 (K per channel, V per token)"), _row(S, "KIVI-2 (K per channel, V per token)")
  tq2_r, tq2_s = _find(R, "mse+nc+centre, fp16 norms", 2), _find(S, "mse+nc+centre, fp16 norms", 2)
  lines = [
      f"Rule: {rec['rule']}. "
      f"**Keys: {kb}-bit TurboQuant-mse with norm correction and key centring, {norm} norms** "
      f"(`CacheConfig(k_bits={kb}, k_variant=\"mse\", norm_correction=True, center_keys=True, "
      f"norm_dtype=\"{cfg.norm_dtype}\")`). "
      f"At 3 bits each ingredient lowers KL on real data: mse {f(_m(fam(R, 'mse')))} → +nc "
      f"{f(_m(fam(R, 'mse+nc')))} → +centring {f(_m(fam(R, 'mse+nc+centre')))} (synthetic: "
      f"{f(_m(fam(S, 'mse')))} → {f(_m(fam(S, 'mse+nc')))} → {f(_m(fam(S, 'mse+nc+centre')))}); "
      f"prod keys are worse at the same nominal bits although they store more (real 3b: orthogonal S "
      f"{f(_m(fam(R, 'prod, orthogonal S (V mse+nc)')))}, Gaussian S {f(_m(fam(R, 'prod, Gaussian S (V mse+nc)')))}): "
      f"the QJL term is unbiased but its variance costs more under softmax than the mse bias, and a Gaussian "
      f"sketch is noisier than an orthogonal one. float16 norms move no metric by more than {fp16_shift:.1e} and save "
      f"16 bits per vector (0.5 b/coord at D=32, 0.125 at D=128); they overflow only for ‖x‖ > 65504. "
      f"Outlier channels help a little per nominal bit (synthetic 3b KL {f(_m(fam(S, 'mse+nc+centre')))} → "
      f"{f(_m(out3_s))} for +{out3_s['k_bits'] - fam(S, 'mse+nc+centre')['k_bits']:.2f} b/coord) but less than "
      f"one more bit everywhere ({f(_m(base4_s))} at 4b), and at D=32 the split costs "
      f"+{out3_r['k_bits'] - fam(R, 'mse+nc+centre')['k_bits']:.1f} b/coord because each part's codes and norm "
      f"are stored padded to 32-lane words, so they are off by default. Per stored bit tqjax is ahead of KIVI-2 "
      f"(3.0 b/coord) on the decoder-like keys (2-bit tqjax, {tq2_s['k_bits']:.3g} b: KL {f(_m(tq2_s))} vs "
      f"{f(_m(kivi_s))}) and close on MiniLM ({tq2_r['k_bits']:.3g} b: {f(_m(tq2_r))} vs {f(_m(kivi_r))}).",
      "",
      f"{kb}-bit keys are the fewest that match the int4-per-token (group 32, 5.0 b/coord) baseline: KL "
      f"{f(_m(kr))} vs {f(_m(ref_r))} real (paired Δ {dk_r:+.1e} ± {sk_r:.1e}), {f(_m(ks))} vs {f(_m(ref_s))} "
      f"synthetic (Δ {dk_s:+.1e} ± {sk_s:.1e}); top-1 {pct(_m(kr, 'top1'))} vs {pct(_m(ref_r, 'top1'))} and "
      f"{pct(_m(ks, 'top1'))} vs {pct(_m(ref_s, 'top1'))}; layer 0 real KL {f(_m(kr, 'kl', 'layer0'))} vs "
      f"{f(_m(ref_r, 'kl', 'layer0'))}."
      + (f" {kb - 1}-bit keys do not (real KL {f(_m(k_lower))}, top-1 {pct(_m(k_lower, 'top1'))})." if k_lower else ""),
      "",
      f"**Values: {vb}-bit mse with norm correction** ({norm} norms): output error {f(_m(vr, 'out_rel_err'))} real / "
      f"{f(_m(vs, 'out_rel_err'))} synthetic vs int4's {f(_m(ref_r, 'out_rel_err'))} / {f(_m(ref_s, 'out_rel_err'))}."
      + (f" {vb - 1}-bit values (the K{kb}/V{vb - 1} row) raise it to {f(_m(low_r, 'out_rel_err'))} / "
         f"{f(_m(low_s, 'out_rel_err'))} while KL and top-1 are unchanged (they depend on keys only); "
         f"K{kb}/V{vb - 1} is the memory-saving option when {_m(low_r, 'out_rel_err') / _m(ref_r, 'out_rel_err'):.1f}–"
         f"{_m(low_s, 'out_rel_err') / _m(ref_s, 'out_rel_err'):.1f}x int4's output error is acceptable." if low_r else ""),
      "",
      f"**Memory** of a 32k-token cache (B=1, 8 kv heads, D=128, K{kb}/V{vb}, {norm} norms, key mean included; "
      f"`expected_nbytes` = `nbytes` of a real 32k and a 256-token cache): {{layer}} per layer "
      f"({{layer_exact}} B) vs {{bf16_layer}} in bf16, {{ratio}} smaller; 32 layers: {{model}} vs {{bf16_model}}. "
      f"K{kb}/V{vb - 1}: {rb_alt['layer_bytes'] / 2**20:.1f} MiB per layer, {rb_alt['model_bytes'] / 2**30:.2f} GiB "
      f"for 32 layers ({rb_alt['ratio']:.2f}x). Quantizer constants (rotations, codebooks) are shared and not counted.",
  ]
  return cfg, "\n".join(lines).format(**_bytes_fmt(rb)), {"default": rb, "alternative_v_minus_1": rb_alt}


if __name__ == "__main__":
  main()
