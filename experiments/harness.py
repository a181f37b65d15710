"""The command line and the output files every benchmark in experiments/ shares.

Run an experiment from the repository root as a module, after `pip install -e ".[experiments]"`:

    python -m experiments.<name> --help

Common flags (`parser`):
  --out DIR           where the md / json / png go (default: results-local/ in the repository
                      root, ignored by git)
  --update-results    write into experiments/results/ instead: the tracked current result

Every result carries a `stamp()`: the device (GPU/TPU kind, or the CPU model and core count),
the UTC date and time, the git commit (with "-dirty" when tracked files differ from it) and the
jax version. `pyplot()` imports matplotlib for the plots, or exits saying which extra to install.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["LOCAL_RESULTS", "TRACKED_RESULTS", "out_dir", "parser", "pyplot", "stamp", "stamp_line", "write"]

REPO = Path(__file__).resolve().parents[1]
TRACKED_RESULTS = REPO / "experiments" / "results"
LOCAL_RESULTS = REPO / "results-local"


def parser(doc: str) -> argparse.ArgumentParser:
  """An ArgumentParser whose --help prints the experiment's docstring, with --out/--update-results."""
  ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  where = ap.add_mutually_exclusive_group()
  where.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help=f"output directory (default: {LOCAL_RESULTS.relative_to(REPO)}/, ignored by git)")
  where.add_argument("--update-results", action="store_true",
                     help=f"write into {TRACKED_RESULTS.relative_to(REPO)}/ (the tracked current result)")
  return ap


def out_dir(args: argparse.Namespace) -> Path:
  """The directory `parser`'s flags chose, created."""
  out = TRACKED_RESULTS if args.update_results else (args.out or LOCAL_RESULTS)
  out.mkdir(parents=True, exist_ok=True)
  return out


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git_commit() -> str:
  def git(*a):
    return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=30, check=True).stdout

  try:
    commit = git("rev-parse", "--short=12", "HEAD").strip()
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown (not a git checkout)"
  return commit + ("-dirty" if dirty else "")


def stamp() -> dict:
  """Where and when: {"date", "device", "platform", "commit", "jax"} (starts the JAX backend)."""
  import jax  # noqa: PLC0415 (so that --help never starts a backend)

  dev = jax.devices()[0]
  device = dev.device_kind if dev.platform != "cpu" else f"CPU {_cpu_name()} ({os.cpu_count()} cores)"
  return {
      "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      "device": device,
      "platform": dev.platform,
      "commit": _git_commit(),
      "jax": jax.__version__,
  }


def stamp_line(st: dict) -> str:
  """One markdown line saying where and when a result was measured."""
  return f"Measured {st['date']} on {st['device']}, commit `{st['commit']}`, jax {st['jax']}."


def pyplot():
  """matplotlib.pyplot with the Agg backend; exits naming the extra when matplotlib is missing."""
  try:
    import matplotlib  # noqa: PLC0415
  except ImportError:
    raise SystemExit("matplotlib is missing; the experiments' plots need it: pip install -e '.[experiments]'") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def write(out: Path, stem: str, md: str, data: dict | None = None) -> list[Path]:
  """Writes <out>/<stem>.md (and .json from `data`); returns the paths written."""
  out.mkdir(parents=True, exist_ok=True)
  paths = [out / f"{stem}.md"]
  paths[0].write_text(md, encoding="utf-8")
  if data is not None:
    paths.append(out / f"{stem}.json")
    paths[1].write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
  return paths
