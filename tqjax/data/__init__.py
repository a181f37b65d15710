"""Data that ships with tqjax, and where the optional real-activation data lives.

`recorded_benchmarks()` loads the decode-attention benchmark tables measured on GPUs with
`experiments/bench_decode.py`. They are package data, so an installed wheel (e.g. on Colab) has
them too; notebook 04 plots them.

`data_dir()` is the one place that says where the real MiniLM q/k/v capture
(`minilm_l6_qkv.npz`) lives: the directory named by the environment variable `TQJAX_DATA`, else
`../shared/data` beside the root of a source checkout. Tests, experiments and notebooks that
need it skip or fall back to synthetic data when it is absent.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

__all__ = ["DATA_ENV", "data_dir", "data_path", "recorded_benchmarks"]

DATA_ENV = "TQJAX_DATA"


def data_dir() -> Path:
  """The real-data directory: `$TQJAX_DATA`, else `<checkout>/../shared/data` (may not exist)."""
  env = os.environ.get(DATA_ENV)
  if env:
    return Path(env).expanduser()
  return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_path(name: str) -> Path:
  """Path of the file `name` in `data_dir()`; the caller checks `.is_file()`."""
  if not name or Path(name).name != name:
    raise ValueError(f"{name=} must be a plain file name inside the data directory")
  return data_dir() / name


def recorded_benchmarks(prefix: str = "bench_decode") -> list[dict]:
  """The recorded benchmark tables whose file name starts with `prefix`, sorted by file name.

  Each is the JSON that the experiment wrote (`device`, `date`, `jax`, `copy_tbs`, `rows`, ...)
  plus `file`, the name it ships under.
  """
  tables = []
  for entry in sorted(importlib.resources.files(__name__).iterdir(), key=lambda e: e.name):
    if entry.name.startswith(prefix) and entry.name.endswith(".json"):
      table = json.loads(entry.read_text(encoding="utf-8"))
      table["file"] = entry.name
      tables.append(table)
  return tables
