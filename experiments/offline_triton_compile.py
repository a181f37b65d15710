"""Compiles the encode kernel's (or, with --decode, the decode kernel's) Triton IR for sm_90a on a
machine without a GPU and reports ptxas registers, spills, shared memory, SASS instructions per
coordinate and the most frequent opcodes (a proxy for compute cost, and only a proxy: on an H100
the encode kernel ran at ~25 % of peak issue, latency-bound, so cutting its count by a quarter
changed its time by about 5 %). Encode: dynamic count per program (its loop over the W packed
columns counted W times; prod keys are straight-line). Decode: per coordinate of one block of K
and V, the loop body dominating the static code.

Goes one step past the `lowering` tests (which stop at Triton IR): Triton's own passes, LLVM,
ptxas. Uses the `triton` wheel from PyPI (not a project dependency; it bundles ptxas), which is
not the Triton inside jaxlib, so a config that compiles here can still fail there (or the
reverse); treat the numbers as estimates. Install it beside the project, e.g.
  python -m venv /tmp/tv && /tmp/tv/bin/pip install triton
Run: python -m experiments.offline_triton_compile --triton-python /tmp/tv/bin/python
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering as triton_lowering
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh


from experiments.sass_mix import compile_ptx, instructions
from pallas_kernels import decode_attention_gpu, encode_gpu
from tqjax import cache as C
from tqjax import ops as tq_ops
from tqjax import quantizer

H100 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda"))
CASES = {  # name: (d, bits, variant, x dtype, mean, kernel options)
    "V3 bf16": (128, 3, "mse", jnp.bfloat16, False, {}),
    "V4 bf16": (128, 4, "mse", jnp.bfloat16, False, {}),
    "K3 bf16 centred": (128, 3, "mse", jnp.bfloat16, True, {}),
    "K4 bf16 centred": (128, 4, "mse", jnp.bfloat16, True, {}),
    "K3 prod bf16 centred": (128, 3, "prod", jnp.bfloat16, True, {}),
    "K4 f32 centred": (128, 4, "mse", jnp.float32, True, {}),
    "K4 f32 centred tf32": (128, 4, "mse", jnp.float32, True, dict(precision="tf32")),
    "V4 bf16 d64": (64, 4, "mse", jnp.bfloat16, False, {}),
    "V4 bf16 d256": (256, 4, "mse", jnp.bfloat16, False, {}),
    "V3 bf16 d32": (32, 3, "mse", jnp.bfloat16, False, {}),
}

DECODE_CASES = {  # name: (k bits, v bits, k variant, kernel options); B=8, Hq=32, Hkv=8, D=128, S=32k
    "decode K3/V3 tf32": (3, 3, "mse", {}),
    "decode K3/V3 bf16 dots": (3, 3, "mse", dict(dot_dtype="bfloat16")),
    "decode K4/V4 tf32": (4, 4, "mse", {}),
    "decode K3prod/V3 tf32": (3, 3, "prod", {}),
}

_COMPILE = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
k = triton.compile(sys.argv[1], target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": int(sys.argv[2]), "num_stages": int(sys.argv[4])})
open(sys.argv[3], "w").write(k.asm["ptx"])
print(k.metadata.shared)
"""


def _capture_ir(fn, *args) -> str:
  """Triton IR of the (single) Pallas kernel in jit(fn)(*args), lowered for an abstract H100."""
  captured = {}
  original = triton_lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):
    result = original(*a, **kw)
    captured["ir"] = result.module.operation.get_asm(enable_debug_info=False)
    return result

  triton_lowering.lower_jaxpr_to_triton_module = capture
  try:
    with use_abstract_mesh(H100):
      jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original
  return captured["ir"]


def triton_ir(name: str) -> tuple[str, int, int, int]:
  """(Triton IR text, num_warps, num_stages, coordinates per program, trips of its column loop) of one
  encode case."""
  d, bits, variant, dtype, with_mean, opts = CASES[name]
  extra = dict(norm_correction=True) if variant == "mse" else {}
  tq = quantizer.make_quantizer(d, bits, variant, norm_dtype="float16", **extra)
  x = jax.ShapeDtypeStruct((8, 8, 32768, d), dtype)
  mean = jax.ShapeDtypeStruct((8, 8, d), jnp.float32) if with_mean else None
  ir = _capture_ir(functools.partial(encode_gpu.encode, **opts), tq, x, mean)
  warps = opts.get("num_warps") or 4
  coords = (opts.get("block_t") or encode_gpu.default_block_t(d, 32768)) * d
  return ir, warps, opts.get("num_stages") or 2, coords, d // 32


def dynamic_count(sass: str, trips: int) -> int:
  """Instructions executed per thread if every backward branch's loop body runs `trips` times."""
  lines = re.findall(r"^\s+/\*([0-9a-f]+)\*/\s+(.*)$", sass, re.M)
  addr = [int(a, 16) for a, _ in lines]
  n = len(lines)
  for a, text in lines:
    target = re.search(r"BRA (0x[0-9a-f]+)", text)
    if target and int(target.group(1), 16) < int(a, 16):
      n += (trips - 1) * sum(int(target.group(1), 16) <= x <= int(a, 16) for x in addr)
  return n


def decode_ir(name: str) -> tuple[str, int, int, int]:
  """(Triton IR text, num_warps, num_stages, coordinates of one K + V block, 1) of one decode case."""
  kb, vb, variant, opts = DECODE_CASES[name]
  cfg = C.CacheConfig(head_dim=128, k_bits=kb, v_bits=vb, k_variant=variant)
  cache = jax.eval_shape(lambda: C.init_cache(cfg, 8, 8, 32768))
  q = jax.ShapeDtypeStruct((8, 32, 128), jnp.float32)
  fn = lambda c, q: tq_ops.chunked_attention(
      c, q[:, :, None], partial_fn=lambda *a: decode_attention_gpu.decode_partial(*a, **opts))
  block_k = opts.get("block_k") or decode_attention_gpu.default_block_k(128, 32768)
  return _capture_ir(fn, cache, q), opts.get("num_warps") or 4, opts.get("num_stages") or 2, 2 * block_k * 128, 1


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--triton-python", required=True, help="a python with the triton wheel installed")
  ap.add_argument("--decode", action="store_true", help="the decode kernel's cases instead of the encode kernel's")
  args = ap.parse_args(argv)
  cases, make_ir = (DECODE_CASES, decode_ir) if args.decode else (CASES, triton_ir)
  bin_dir = subprocess.run([args.triton_python, "-c", "import triton, os; print(os.path.dirname(triton.__file__))"],
                           capture_output=True, text=True, check=True).stdout.strip() + "/backends/nvidia/bin"
  ptxas = next(p for p in (Path(bin_dir) / "ptxas-blackwell", Path(bin_dir) / "ptxas") if p.exists())
  print("| case | registers | spill bytes | shared memory (bytes) | SASS per coordinate | most frequent opcodes (static count) |\n"
        "| --- | ---: | ---: | ---: | ---: | --- |")
  with tempfile.TemporaryDirectory() as tmp:
    for name in cases:
      ir, warps, stages, coords, trips = make_ir(name)
      ttir, ptx = (Path(tmp) / f"k.{ext}" for ext in ("ttir", "ptx"))
      ttir.write_text(ir)
      shared = subprocess.run([args.triton_python, "-c", _COMPILE, str(ttir), str(warps), str(ptx), str(stages)],
                              check=True, capture_output=True, text=True).stdout.split()[-1]
      info, sass = compile_ptx(ptx.read_text(), str(ptxas))
      ops = [op.split(".")[0] for _, _, op, _ in instructions(sass)]
      n = dynamic_count(sass, trips)
      top = ", ".join(f"{op} {k}" for op, k in collections.Counter(ops).most_common(8))
      regs = re.search(r"Used (\d+) registers", info).group(1)
      spill = re.search(r"(\d+) bytes spill stores", info).group(1)
      print(f"| {name} | {regs} | {spill} | {shared} | {n * 32 * warps / coords:.1f} | {top} |", flush=True)


if __name__ == "__main__":
  main()
