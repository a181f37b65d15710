"""The experiments' command lines and their shared harness, run as a user runs them: as modules
from the repository root (`python -m experiments.<name>`), in subprocesses with a timeout, so the
tests themselves import nothing from experiments/."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = {"harness"}  # modules the scripts import; every other experiments/*.py is a script
SCRIPTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if p.stem not in LIBRARIES)

# One interpreter for all of them (jax is imported once): each script's main parses ["--help"].
_HELP_ALL = r"""
import contextlib, io, json, runpy, sys, time
for name in sys.argv[1:]:
    sys.argv = [f"{name}.py", "--help"]
    sys.modules.pop(f"experiments.{name}", None)  # imported by an earlier script: run it afresh
    out, start = io.StringIO(), time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module(f"experiments.{name}", run_name="__main__")
        code = "returned without exiting"
    except SystemExit as e:
        code = e.code
    print(json.dumps(dict(name=name, code=code, text=out.getvalue(), s=time.monotonic() - start)), flush=True)
"""


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # the same answers on a GPU machine
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_scripts_found():
  assert {"bench_decode", "distortion", "kv_fidelity"} <= set(SCRIPTS), SCRIPTS


def test_every_experiment_answers_help_without_starting():
  run = _python(_HELP_ALL, *SCRIPTS, timeout=240)
  results = {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}
  assert run.returncode == 0 and set(results) == set(SCRIPTS), (run.stdout[-2000:], run.stderr[-2000:])
  bad = {n: (r["code"], r["text"][:300]) for n, r in results.items()
         if r["code"] not in (0, None) or not r["text"].startswith("usage:")}
  assert not bad, f"--help failed or started work: {bad}"


def test_no_experiment_edits_sys_path():
  edits = [p.name for p in sorted((REPO / "experiments").glob("*.py")) if re.search(r"sys\.path\.(insert|append)", p.read_text())]
  assert not edits, f"run experiments as modules (python -m experiments.<name>) instead of editing sys.path: {edits}"


def test_harness_flags_stamp_and_files(tmp_path):
  code = """
import json, sys
from pathlib import Path
from experiments import harness
ap = harness.parser("doc")
local = harness.LOCAL_RESULTS if ap.parse_args([]).out is None else None
tracked = ap.parse_args(["--update-results"])
out = harness.out_dir(ap.parse_args(["--out", sys.argv[1]]))
st = harness.stamp()
paths = harness.write(out, "x", "# x\\n\\n" + harness.stamp_line(st) + "\\n", {"stamp": st})
print(json.dumps(dict(local=str(local), tracked=tracked.update_results, out=str(out), stamp=st, paths=list(map(str, paths)))))
"""
  run = _python(code, str(tmp_path / "res"))
  assert run.returncode == 0, run.stderr[-2000:]
  r = json.loads(run.stdout)
  assert r["local"] == str(REPO / "results-local") and r["tracked"] is True and r["out"] == str(tmp_path / "res")
  head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
  if head.returncode == 0:
    assert r["stamp"]["commit"].removesuffix("-dirty") == head.stdout.strip()
  assert r["stamp"]["device"].startswith("CPU ") and r["stamp"]["date"].endswith(" UTC")
  md, js = (Path(p) for p in r["paths"])
  assert r["stamp"]["commit"] in md.read_text() and json.loads(js.read_text())["stamp"] == r["stamp"]
  both = _python("from experiments import harness; harness.parser('doc').parse_args(['--out', 'x', '--update-results'])")
  assert both.returncode == 2 and "not allowed with" in both.stderr


def test_missing_matplotlib_names_the_extra():
  run = _python("import sys; sys.modules['matplotlib'] = None\nfrom experiments import harness\nharness.pyplot()")
  assert run.returncode == 1
  assert "pip install -e '.[experiments]'" in run.stderr, run.stderr[-2000:]
