"""Executes every notebook top to bottom on CPU with small sizes (TQJAX_NOTEBOOK_SMALL=1).

Each notebook gets 180 s in all (kernel start included) and runs with notebooks/ as its working
directory, as a user would run it. Sections a notebook cannot run here (no Flax layer, no recorded
benchmark, no real data) print a line starting with "[skipped]"; those lines are reported as
warnings so a green run still says what it did not cover.
"""

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
