"""`tqjax.sharding` on 8 fake CPU devices: tests/seq_sharded_check.py in a process of its own (the
device count is fixed when jax starts) compares every layout (batch, kv heads, slots and their
combinations) and cache class (mse, prod, outlier channels, window) with the unsharded ops; the
Triton kernel (interpret mode) as the per-shard partial; a 2^20-slot cache. Layout errors are
checked here, in-process, on the 4 devices conftest.py sets up."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from seq_sharded_check import reassociation_tol
from tqjax import cache as C
from tqjax import ops
from tqjax import sharding as sh

pytestmark = pytest.mark.multidevice

SCRIPT = Path(__file__).with_name("seq_sharded_check.py")


def _run(*flags: str) -> list[str]:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
  return [line for line in run.stdout.splitlines() if line.startswith("ok ")]


def test_every_layout_matches_unsharded():
  # batch, heads, seq, batch x seq, heads x seq, batch x heads x seq
  assert len(_run()) == 6


def test_every_cache_class_matches_unsharded_under_slot_sharding():
  # prod, outliers, window on seq and batch x heads x seq
  assert len(_run("--configs")) == 6


@pytest.mark.interpret
@pytest.mark.slow
def test_triton_kernel_as_the_per_shard_partial():
  assert len(_run("--kernel")) == 1


def test_million_slots_over_8_devices():
  lines = _run("--million")
  assert len(lines) == 1 and "bytes per device" in lines[0]
  print(lines[0])


def _mesh():
  return jax.make_mesh((2, 2), ("a", "b"))


def test_layout_names_an_axis_of_its_mesh():
  with pytest.raises(ValueError, match="'z' is not in the mesh"):
    sh.CacheLayout(_mesh(), seq="z")
  with pytest.raises(ValueError, match="splits two dims"):
    sh.CacheLayout(_mesh(), batch="a", seq=("a", "b"))


def test_cache_dims_must_divide_over_their_shards():
  cfg = C.CacheConfig(head_dim=16)
  with pytest.raises(ValueError, match="capacity=6 must be divisible by the 4 shards"):
    sh.shard_cache(C.init_cache(cfg, 2, 2, 6), sh.CacheLayout(_mesh(), seq=("a", "b")))
  with pytest.raises(ValueError, match="num_kv_heads=1 must be divisible by the 2 shards"):
    sh.shard_cache(C.init_cache(cfg, 2, 1, 8), sh.CacheLayout(_mesh(), heads="b"))


def test_append_fits_one_shard_and_inputs_are_checked_as_unsharded():
  cfg = C.CacheConfig(head_dim=16)
  layout = sh.CacheLayout(_mesh(), seq=("a", "b"))
  cache = sh.shard_cache(C.init_cache(cfg, 1, 1, 8), layout)
  x = jnp.zeros((1, 1, 3, 16), jnp.float32)
  with pytest.raises(ValueError, match="T=3 tokens exceed the 2 slots of one seq shard"):
    sh.append(cache, x, x, layout=layout)
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=3\]"):
    sh.prefill(cache, x, x, jnp.asarray([4], jnp.int32), layout=layout)
  with pytest.raises(ValueError, match="q must be"):
    sh.attention(cache, jnp.zeros((1, 2, 8), jnp.float32), layout=layout)


# ----------------------------------------------------------------------------- GPU kernels, lowered

def _h100_mesh(n: int):
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType  # noqa: PLC0415

  return AbstractMesh((n,), ("s",), (AxisType.Explicit,),
                      abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda"))


def _lower(mesh, f, *args) -> None:
  with jax.sharding.use_abstract_mesh(mesh):
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.lowering
@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
@pytest.mark.parametrize("devices", [1, 2])
def test_decode_kernel_per_shard_lowers_for_h100(kernel, devices):
  """Each GPU decode kernel as the per-shard partial of a slot-sharded decode (one device: the
  one-GPU check; two: the multi-GPU program), lowered for an abstract H100 mesh."""
  from pallas_kernels import decode_attention_gpu, decode_mgpu  # noqa: PLC0415

  fn = decode_mgpu.decode_partial if kernel == "mosaic" else decode_attention_gpu.decode_partial
  mesh = _h100_mesh(devices)
  layout = sh.CacheLayout(mesh, seq="s")
  cache = jax.eval_shape(lambda: C.init_cache(C.CacheConfig(head_dim=128), 2, 2, 4096))
  q = jax.ShapeDtypeStruct((2, 8, 128), jnp.float32)
  _lower(mesh, lambda c, q: sh.attention(c, q, layout=layout, partial_fn=fn), cache, q)


@pytest.mark.lowering
def test_mosaic_kernels_lower_under_check_vma_and_triton_kernels_do_not():
  """check_vma=True needs each pallas_call to say which mesh axes its outputs vary over: the
  Mosaic GPU decode and encode kernels lower so, the Triton ones are refused."""
  from pallas_kernels import decode_attention_gpu, decode_mgpu, encode_gpu, encode_mgpu  # noqa: PLC0415

  mesh = _h100_mesh(2)
  layout = sh.CacheLayout(mesh, seq="s")
  cache = jax.eval_shape(lambda: C.init_cache(C.CacheConfig(head_dim=128), 2, 2, 4096))
  q = jax.ShapeDtypeStruct((2, 8, 128), jnp.float32)
  k = jax.ShapeDtypeStruct((2, 2, 4096, 128), jnp.bfloat16)
  decode = lambda fn: (lambda c, q: sh.attention(c, q, layout=layout, partial_fn=fn, check_vma=True))
  prefill = lambda enc: (lambda c, k, v: sh.prefill(c, k, v, layout=layout, encoder=enc, check_vma=True))
  _lower(mesh, decode(decode_mgpu.decode_partial), cache, q)
  _lower(mesh, prefill(encode_mgpu.encode), cache, k, k)
  with pytest.raises(ValueError, match="manual_axis_type"):
    _lower(mesh, decode(decode_attention_gpu.decode_partial), cache, q)
  with pytest.raises(ValueError, match="manual_axis_type"):
    _lower(mesh, prefill(encode_gpu.encode), cache, k, k)


@pytest.mark.lowering
@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
def test_encode_kernel_per_shard_lowers_for_h100(kernel):
  """A slot-sharded prefill with a GPU encode kernel on each device's tokens (centred keys: the
  mean of all shards goes to the kernel), lowered for an abstract 2-H100 mesh."""
  from pallas_kernels import encode_gpu, encode_mgpu  # noqa: PLC0415

  enc = encode_mgpu.encode if kernel == "mosaic" else encode_gpu.encode
  mesh = _h100_mesh(2)
  layout = sh.CacheLayout(mesh, seq="s")
  cache = jax.eval_shape(lambda: C.init_cache(C.CacheConfig(head_dim=128), 2, 2, 4096))
  k = jax.ShapeDtypeStruct((2, 2, 4096, 128), jnp.bfloat16)
  _lower(mesh, lambda c, k, v: sh.prefill(c, k, v, layout=layout, encoder=enc), cache, k, k)


def test_auto_mesh_axes():
  """A mesh of Auto axes (the subprocess's are Explicit, jax's default): a slot-sharded prefill,
  append and decode equal the unsharded ones (a single-token append, no centring: the codes are
  the same; the output within the float32 bound of seq_sharded_check)."""
  cfg = C.CacheConfig(head_dim=16, center_keys=False, window=4)
  mesh = jax.make_mesh((4,), ("s",), axis_types=(jax.sharding.AxisType.Auto,))
  layout = sh.CacheLayout(mesh, seq="s")
  r = jax.random.split(jax.random.key(0), 4)
  k, v = jax.random.normal(r[0], (2, 1, 32, 16)), jax.random.normal(r[1], (2, 1, 32, 16))
  k1, q = jax.random.normal(r[2], (2, 1, 1, 16)), jax.random.normal(r[3], (2, 2, 16))
  lengths = jnp.asarray([9, 31], jnp.int32)  # the next slot: inside shard 1 / the last slot of shard 3

  @jax.jit
  def sharded(cache):
    cache = sh.append(sh.prefill(cache, k, v, lengths, layout=layout), k1, k1, layout=layout)
    return cache, sh.attention(cache, q, layout=layout)

  @jax.jit
  def unsharded(cache):
    cache = C.append(C.prefill_with_encoder(cache, k, v, lengths), k1, k1)
    return cache, ops.attention(cache, q, implementation="xla")

  got, o = sharded(sh.shard_cache(C.init_cache(cfg, 2, 1, 32), layout))
  want, o_want = unsharded(C.init_cache(cfg, 2, 1, 32))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.shape == w.shape and bool(jnp.all(g == w)), (g, w)
  v_max = float(jnp.max(jnp.linalg.norm(v, axis=-1))) * 1.01
  assert float(jnp.max(jnp.abs(o - o_want))) <= reassociation_tol(32, 4, 1024, 16, v_max)


# ----------------------------------------------------------------------------- one GPU


@pytest.mark.gpu
@pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU")
def test_fused_kernels_inside_shard_map_on_one_gpu():
  """The fused kernels dispatch picks on this GPU (Mosaic GPU on Hopper) inside shard_map over a
  1-device mesh equal the unsharded calls: the decode partial within float32 reassociation
  (one device: the merge is the identity), the encode bit for bit."""
  from pallas_kernels import dispatch  # noqa: PLC0415

  cfg = C.CacheConfig(head_dim=128)
  layout = sh.CacheLayout(jax.make_mesh((1,), ("s",), devices=jax.devices()[:1]), seq="s")
  r = jax.random.split(jax.random.key(0), 3)
  k = jax.random.normal(r[0], (2, 2, 4096, 128), jnp.bfloat16)
  v = jax.random.normal(r[1], (2, 2, 4096, 128), jnp.bfloat16)
  q = jax.random.normal(r[2], (2, 8, 128), jnp.float32)
  lengths = jnp.asarray([4096, 1000], jnp.int32)
  empty = C.init_cache(cfg, 2, 2, 4096)
  enc = dispatch.prefill_encoder(empty, (k.dtype, v.dtype))
  fn = dispatch.decode_partial_fn(empty, 4)
  got = jax.jit(lambda c: sh.prefill(c, k, v, lengths, layout=layout, encoder=enc))(sh.shard_cache(empty, layout))
  want = jax.jit(lambda c: C.prefill_with_encoder(c, k, v, lengths, encoder=enc))(empty)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert bool(jnp.all(g == w))
  o = jax.jit(lambda c: sh.attention(c, q, layout=layout, partial_fn=fn))(got)
  o_want = jax.jit(lambda c: ops.attention(c, q, partial_fn=fn))(want)
  v_max = float(jnp.max(jnp.linalg.norm(v.astype(jnp.float32), axis=-1))) * 1.01
  assert float(jnp.max(jnp.abs(o - o_want))) <= reassociation_tol(4096, 1, 1024, 128, v_max)


# ----------------------------------------------------------------------------- communication

_COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(")
_ARRAY = re.compile(r"(f32|f16|bf16|s32|u32|pred)\[([\d,]*)\]")
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "pred": 1}


def _collectives(f, *args) -> list[tuple[str, int]]:
  """(kind, payload bytes per device) of each collective in f's compiled program."""
  out = []
  for line in jax.jit(f).lower(*args).compile().as_text().splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      size = sum(_ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(m.group(1)))
      out.append((m.group(2), size))
  return out


@pytest.mark.parametrize("mode", ["batch", "heads", "seq"])
def test_communication_per_decode_step_is_the_documented_one(mode):
  """docs/sharding.md's table, read off the compiled programs on 4 devices: a decode step under
  seq sharding is two all-reduces, of m (4·b·n·T B) and of l with the accumulators (4·b·n·T·(1 + H)
  B); batch and heads sharding and every append move nothing."""
  b, kh, g, s, h = 4, 4, 2, 64, 32
  cfg = C.CacheConfig(head_dim=h, window=8)
  layout = sh.CacheLayout(jax.make_mesh((4,), ("x",)), **{mode: "x"})
  cache = sh.shard_cache(C.init_cache(cfg, b, kh, s), layout)
  q = jnp.zeros((b, kh * g, h), jnp.float32)
  got = _collectives(lambda c, q: sh.attention(c, q, layout=layout, sliding_window=16), cache, q)
  n = kh * g  # query heads on each device (seq sharding splits neither batch nor heads)
  assert got == ([("all-reduce", 4 * b * n), ("all-reduce", 4 * b * n * (1 + h))] if mode == "seq" else []), got
  x = jnp.zeros((b, kh, 2, h), jnp.float32)
  assert _collectives(lambda c, x: sh.append(c, x, x, layout=layout), cache, x) == []


def test_communication_of_a_slot_sharded_prefill_is_the_documented_one():
  """A prefill under seq sharding: one all-reduce of the key mean's sums (4·B·K·H B) with the
  window rings (2·B·K·W·H·2 B, bfloat16), which XLA combines; with outlier channels a second
  one, of both stores' channel mean squares (2·4·B·K·H B), after the mean it needs."""
  b, kh, s, h, w = 4, 4, 64, 32, 8
  layout = sh.CacheLayout(jax.make_mesh((4,), ("x",)), seq="x")
  k = jnp.zeros((b, kh, s, h), jnp.float32)
  for cfg, want in ((C.CacheConfig(head_dim=h, window=w), [4 * b * kh * h + 2 * b * kh * w * h * 2]),
                    (C.CacheConfig(head_dim=h, outlier_channels=4), [4 * b * kh * h, 2 * 4 * b * kh * h])):
    cache = sh.shard_cache(C.init_cache(cfg, b, kh, s), layout)
    got = _collectives(lambda c, k: sh.prefill(c, k, k, layout=layout), cache, k)
    assert got == [("all-reduce", n) for n in want], (cfg, got)
