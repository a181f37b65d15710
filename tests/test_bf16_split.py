"""pallas_kernels.bf16.split: hi + lo reproduces float32 operands to ~2^-16, also where a compiler
may fold f32(bf16(x)) back to x (XLA:GPU fusions, Triton kernels), which silently zeroed the
remainder once (H200, 2026-11-27) and left the "hi + lo" dots at bfloat16 accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from pallas_kernels import bf16

pytestmark = pytest.mark.interpret

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
H100 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda"))


def _x():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 128)) * np.exp(rng.uniform(-20, 20, (64, 1)))
  return jnp.asarray(x, jnp.float32)


def _fused(x):
  """The split as XLA sees it inside a bigger jitted computation (fusion candidates around it)."""
  hi, lo = bf16.split(x * 1.0 + 0.0)
  return hi.astype(jnp.float32), lo.astype(jnp.float32)


def _in_kernel(x, interpret):
  def kernel(x_ref, hi_ref, lo_ref):
    hi, lo = bf16.split(x_ref[...])
    hi_ref[...] = hi.astype(jnp.float32)
    lo_ref[...] = lo.astype(jnp.float32)

  shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return pl.pallas_call(kernel, out_shape=(shape, shape), interpret=interpret)(x)


def _check(x, hi, lo):
  x, hi, lo = (np.asarray(a, np.float64) for a in (x, hi, lo))
  np.testing.assert_array_equal(hi, np.asarray(jnp.asarray(hi, jnp.bfloat16), np.float64))  # hi exact in bf16
  assert np.all(np.abs(hi + lo - x) <= 2.0**-16 * np.abs(x))
  assert np.mean(lo != 0) > 0.9, "the remainder was dropped"


def test_split_reconstructs_under_jit_and_in_interpret_kernel():
  x = _x()
  _check(x, *jax.jit(_fused)(x))
  _check(x, *_in_kernel(x, interpret=True))


def test_split_keeps_non_finite():
  x = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 0.0, -0.0], jnp.float32)
  hi, lo = bf16.split(x)
  s = np.asarray(hi, np.float32) + np.asarray(lo, np.float32)
  assert not np.isfinite(s[:3]).any()  # NaN stays NaN; ±Inf becomes Inf + NaN: non-finite either way
  np.testing.assert_array_equal(s[3:], 0.0)


@pytest.mark.lowering
def test_split_lowers_in_a_triton_kernel():
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  with use_abstract_mesh(H100):
    jax.jit(lambda x: _in_kernel(x, interpret=False)).trace(x).lower(lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
def test_split_survives_gpu_compilers():
  x = _x()
  _check(x, *jax.jit(_fused)(x))
  _check(x, *jax.jit(lambda x: _in_kernel(x, interpret=False))(x))
