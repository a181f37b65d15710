"""Test-wide JAX settings and shared fixtures.

Runs at collection time, before any test touches a JAX backend: four fake CPU devices for the
sharding tests (the device count is fixed once the backend starts) and strict dtype promotion,
so an accidental float32 × bfloat16 or int × float mix is an error in every test, not a silent
upcast.
"""

from pathlib import Path

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_dtype_promotion", "strict")

MINILM_QKV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "minilm_l6_qkv.npz"


@pytest.fixture(scope="session")
def minilm_qkv_path() -> Path:
  """Path of the shared real MiniLM q/k/v capture (see shared/data/README.md); skips if absent."""
  if not MINILM_QKV.is_file():
    pytest.skip(f"shared data {MINILM_QKV} not present")
  return MINILM_QKV
