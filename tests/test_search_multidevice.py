"""tqjax.search.sharded_search on 4 fake CPU devices, in a process of its own (the device count is
fixed when jax starts): each device scans its quarter of the slots, one top-k merge; the result
must equal the single-device search."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.search, pytest.mark.multidevice]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tqjax import search as S

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("x",))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 48)).astype(np.float32)
    q = rng.standard_normal((6, 48)).astype(np.float32)
    for metric, store, rerank in (("ip", None, None), ("cosine", "int8", 30), ("l2", "float32", 12)):
      ix = S.add(S.init_index(S.IndexConfig(48, 3, metric=metric, rerank_store=store), 1200), x)
      ix = S.remove(ix, np.arange(0, 1000, 9))
      sharded = S.shard_index(ix, mesh, "x")
      assert sharded.codes.sharding.spec == P("x") and sharded.quantizer.rotation.matrix.sharding.spec == P()
      s, i = S.sharded_search(sharded, q, 7, mesh, "x", rerank=rerank, block_size=128)
      s_ref, i_ref = S.search(ix, q, 7, rerank=rerank, block_size=128)
      np.testing.assert_array_equal(np.asarray(i), np.asarray(i_ref))
      np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=1e-5, atol=1e-4)
      assert not np.isin(np.asarray(i), np.arange(0, 1000, 9)).any()
      print("ok", metric, flush=True)
""")


def test_sharded_search_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
  assert [line for line in run.stdout.splitlines() if line.startswith("ok ")] == ["ok ip", "ok cosine", "ok l2"]
