"""The public face: every module of `tqjax` and `pallas_kernels` declares `__all__`, each name
in it exists and has a docstring, and `tqjax` re-exports the quantizer, cache and ops APIs."""

import importlib
import inspect
import pathlib

import pytest

import tqjax

pytestmark = pytest.mark.math

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_names():
  for pkg in ("tqjax", "pallas_kernels"):
    for path in sorted((ROOT / pkg).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      if parts[-1] == "__main__":
        continue
      yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("name", list(_module_names()))
def test_module_declares_documented_all(name):
  mod = importlib.import_module(name)
  assert inspect.getdoc(mod), f"{name} has no module docstring"
  if name == "pallas_kernels" or (name.startswith("tqjax.models") and name == "tqjax.models"):
    return  # package markers without names of their own
  assert hasattr(mod, "__all__"), f"{name} has no __all__"
  for public in mod.__all__:
    obj = getattr(mod, public)  # AttributeError: __all__ names something that does not exist
    if inspect.isfunction(obj) or inspect.isclass(obj):
      assert inspect.getdoc(obj), f"{name}.{public} has no docstring"


def test_tqjax_reexports_the_three_apis():
  for public in ("make_quantizer", "encode", "decode", "estimate_ip", "CacheConfig", "init_cache", "append",
                 "prefill", "attention", "chunked_attention", "scores", "nbytes", "partition_specs"):
    assert public in tqjax.__all__ and callable(getattr(tqjax, public)), public
