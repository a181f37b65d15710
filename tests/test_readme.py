"""The README as a user meets it: short enough to read, every ```python block runs as pasted, and
neither it nor docs/ narrates how the code was developed.

Each block runs in a fresh interpreter on CPU (a block that needs several devices sets XLA_FLAGS
itself before importing jax), with this checkout first on the path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.math

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_CHARS = 15_000
NARRATION = re.compile(r"\bsession\b|\bround \d|\bissue #?\d|time ran out", re.IGNORECASE)
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """(line number, code) of every ```python block of a markdown text."""
  return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_python_blocks_parser():
  # Two blocks, at lines 2 and 7; a bash block in between is not one of them.
  text = "x\n```python\na = 1\n```\n```bash\n```\n```python\nb = 2\n```\n"
  assert python_blocks(text) == [(2, "a = 1\n"), (7, "b = 2\n")]


def test_readme_length():
  n = len(README.read_text(encoding="utf-8"))
  assert n <= MAX_CHARS, f"README.md has {n} characters, more than {MAX_CHARS}"


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_the_api_tour():
  # The quantizer, the cache, the Flax layer and sharding each have a block.
  assert len(BLOCKS) >= 4, f"{len(BLOCKS)} python blocks in README.md"


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[f"line{n}" for n, _ in BLOCKS])
def test_readme_block_runs_as_pasted(code):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"README block failed (rc {proc.returncode}):\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"


DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_exist():
  names = {p.name for p in DOCS}
  assert {"architecture.md", "kernels.md", "benchmarks.md"} <= names, names


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_docs_do_not_narrate(path):
  text = path.read_text(encoding="utf-8")
  hits = [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in NARRATION.finditer(text)]
  assert not hits, f"{path.name}: narration at (line, text) {hits}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def relative_links(text: str) -> list[str]:
  """Targets of the markdown links of a text that are not URLs (anchors dropped)."""
  return [t for t in LINK.findall(text) if "://" not in t and not t.startswith("mailto:")]


def test_relative_links_parser():
  text = "[a](docs/x.md#part) [b](https://arxiv.org/abs/1) [c](../y.md) [d](#top)"
  assert relative_links(text) == ["docs/x.md", "../y.md"]


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_docs_links_resolve(path):
  missing = [t for t in relative_links(path.read_text(encoding="utf-8")) if not (path.parent / t).exists()]
  assert not missing, f"{path.name} links to missing files: {missing}"
