"""Executes every notebook top to bottom on CPU with small sizes (TQJAX_NOTEBOOK_SMALL=1), checks
their one install cell, and the package data they read.

Each notebook gets 180 s in all (kernel start included) and runs with notebooks/ as its working
directory, as a user would run it. Sections a notebook cannot run here (no Flax layer, no recorded
benchmark, no real data) print a line starting with "[skipped]"; those lines are reported as
warnings so a green run still says what it did not cover.
"""

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
TIMEOUT_S = 180

pytestmark = pytest.mark.notebooks


def _install_cells(nb) -> list[str]:
  """The code cells that install tqjax (a notebook may install a model's wheel in a cell of its own)."""
  return [c.source for c in nb.cells if c.cell_type == "code" and "TQJAX_SOURCE" in c.source]


def _stream_text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream":
        out.append(o.get("text", ""))
  return "".join(out)


def test_notebooks_found():
  assert len(NOTEBOOKS) >= 4, f"expected the four notebooks in {NOTEBOOKS_DIR}, found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:  # committed notebooks carry no outputs
    assert not cell.get("outputs"), f"{path.name}: cell {cell.get('id')} has stored outputs; clear them"
  # The kernel inherits this environment.
  monkeypatch.setenv("TQJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  deadline = time.monotonic() + TIMEOUT_S
  client = nbclient.NotebookClient(
      nb,
      kernel_name="python3",
      timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),  # one budget for the notebook
      allow_errors=False,
      resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
  )
  start = time.monotonic()
  try:
    client.execute()
  except nbclient.exceptions.CellTimeoutError:
    pytest.fail(f"{path.name} took longer than {TIMEOUT_S} s")
  elapsed = time.monotonic() - start
  text = _stream_text(nb)
  skipped = [line for line in text.splitlines() if line.startswith("[skipped]")]
  for line in skipped:
    warnings.warn(f"{path.name}: {line}", stacklevel=1)
  print(f"{path.name}: {elapsed:.1f} s, {len(skipped)} skipped section(s)")


def test_one_install_cell_installs_the_published_name_by_default():
  cells = {p.name: _install_cells(nbformat.read(p, as_version=4)) for p in NOTEBOOKS}
  for name, found in cells.items():
    assert len(found) == 1, f"{name}: {len(found)} cells install tqjax; expected the one install cell"
  first = next(iter(cells.values()))[0]
  assert all(found[0] == first for found in cells.values()), "the notebooks' install cells differ"
  assert 'TQJAX_SOURCE = ""' in first and '"--no-deps"' in first


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
  """A fresh venv's interpreter (pip, no tqjax, no jax) and a working directory outside any checkout."""
  venv = tmp_path_factory.mktemp("bare") / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
  return str(venv / "bin" / "python")


@pytest.mark.parametrize("source", ["", "/nonexistent/tqjax-0.1.0-py3-none-any.whl"])
def test_install_cell_stops_saying_what_to_set(bare_python, tmp_path, source):
  """Nothing installable (no index reachable, not inside a checkout, or a wrong TQJAX_SOURCE): the
  cell raises an error that names TQJAX_SOURCE instead of failing later on `import tqjax`."""
  (cell,) = _install_cells(nbformat.read(NOTEBOOKS[0], as_version=4))
  cell = cell.replace('TQJAX_SOURCE = ""', f"TQJAX_SOURCE = {source!r}")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
  env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
  run = subprocess.run([bare_python, "-c", cell], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode != 0, run.stdout
  assert "RuntimeError: could not install tqjax from" in run.stderr, run.stderr[-2000:]
  assert "Set TQJAX_SOURCE" in run.stderr, run.stderr[-2000:]
  assert repr(source or "tqjax") in run.stderr


def test_recorded_benchmarks_ship_as_package_data():
  """Notebook 04 plots these on CPU and on Colab: at least one decode table whose every row is a
  positive finite time on a named device."""
  from tqjax.data import recorded_benchmarks  # noqa: PLC0415

  tables = recorded_benchmarks("bench_decode")
  assert tables, "no bench_decode_*.json in tqjax/data"
  for t in tables:
    assert t["device"] and t["date"] and t["rows"], t["file"]
    assert all(math.isfinite(r["us"]) and r["us"] > 0 and r["impl"] and r["shape"] for r in t["rows"]), t["file"]


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
  from tqjax import data  # noqa: PLC0415

  monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
  assert data.data_path("minilm_l6_qkv.npz") == tmp_path / "minilm_l6_qkv.npz"
  monkeypatch.delenv(data.DATA_ENV)
  assert data.data_dir() == Path(__file__).resolve().parents[2] / "shared" / "data"
  with pytest.raises(ValueError, match="name="):
    data.data_path("../secrets")
