"""Test-wide JAX settings, the tier-marker check and shared fixtures.

Runs at collection time, before any test touches a JAX backend: four fake CPU devices for the
sharding tests (the device count is fixed once the backend starts) and strict dtype promotion,
so an accidental float32 × bfloat16 or int × float mix is an error in every test, not a silent
upcast. Every test carries a tier marker (pyproject's `markers`, set per file with `pytestmark`):
a test that needs more (a GPU, a lowering target) adds its own marker. Collection fails naming
the files whose tests have none.
"""

import tomllib
from pathlib import Path

import jax
import pytest

from tqjax.data import DATA_ENV, data_path

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_collection_modifyitems(config, items):
  with open(config.rootpath / "pyproject.toml", "rb") as f:  # the tiers are the markers declared there
    tiers = {m.split(":", 1)[0].strip() for m in tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]}
  untiered = sorted({item.path.name for item in items if not tiers & {m.name for m in item.iter_markers()}})
  if untiered:
    raise pytest.UsageError(f"tests without a tier marker ({', '.join(sorted(tiers))}) in: {', '.join(untiered)}; "
                            "add `pytestmark = pytest.mark.<tier>` to the file")


@pytest.fixture(scope="session")
def minilm_qkv_path() -> Path:
  """Path of the real MiniLM q/k/v capture (`tqjax.data.data_dir()`, env TQJAX_DATA); skips if absent."""
  path = data_path("minilm_l6_qkv.npz")
  if not path.is_file():
    pytest.skip(f"real data {path} not present (set {DATA_ENV} to the directory holding it)")
  return path
