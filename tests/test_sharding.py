"""tqjax on a mesh of 4 CPU devices: tests/sharded_check.py in a process of its own (the device
count is fixed when jax starts), under shard_map and under jit with sharded inputs (also the Flax
layer), for mesh axes of both types (Explicit, jax's default, and Auto)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multidevice

SCRIPT = Path(__file__).with_name("sharded_check.py")


def test_sharded_matches_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
  checks = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
  # per axis type: 2 quantizer checks, 4 for the cache the Triton kernel supports, 2 for the other,
  # 1 for the Flax layer with each cache
  assert len(checks) == 2 * (2 + 4 + 2 + 2), run.stdout
