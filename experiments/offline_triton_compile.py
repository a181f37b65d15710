"""Compiles the encode kernel's Triton IR for sm_90a on a machine without a GPU and reports
ptxas registers, spills and SASS instructions per encoded coordinate (a proxy for its compute
cost: the kernel is straight-line code, so static ≈ dynamic count when blocks_per_program = 1).

Goes one step past the `lowering` tests (which stop at Triton IR): Triton's own passes, LLVM,
ptxas. Uses the `triton` wheel from PyPI (not a project dependency; it bundles ptxas), which is
not the Triton inside jaxlib, so a config that compiles here can still fail there (or the
reverse); treat the numbers as estimates. Install it beside the project, e.g.
  python -m venv /tmp/tv && /tmp/tv/bin/pip install triton
Run: PYTHONPATH=. python experiments/offline_triton_compile.py --triton-python /tmp/tv/bin/python
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering as triton_lowering
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import encode_gpu  # noqa: E402
from tqjax import quantizer  # noqa: E402

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

_COMPILE = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
k = triton.compile(sys.argv[1], target=GPUTarget("cuda", 90, 32), options={"num_warps": int(sys.argv[2])})
open(sys.argv[3], "w").write(k.asm["ptx"])
"""


def triton_ir(name: str) -> tuple[str, int, int]:
  """(Triton IR text, num_warps, coordinates per program) of one case."""
  d, bits, variant, dtype, with_mean, opts = CASES[name]
  extra = dict(norm_correction=True) if variant == "mse" else {}
  tq = quantizer.make_quantizer(d, bits, variant, norm_dtype="float16", **extra)
  x = jax.ShapeDtypeStruct((8, 8, 32768, d), dtype)
  mean = jax.ShapeDtypeStruct((8, 8, d), jnp.float32) if with_mean else None
  captured = {}
  original = triton_lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    captured["ir"] = result.module.operation.get_asm(enable_debug_info=False)
    return result

  triton_lowering.lower_jaxpr_to_triton_module = capture
  try:
    with use_abstract_mesh(H100):
      jax.jit(functools.partial(encode_gpu.encode, **opts)).trace(tq, x, mean).lower(lowering_platforms=("cuda",))
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original
  warps = opts.get("num_warps") or 4
  return captured["ir"], warps, (opts.get("block_t") or encode_gpu.default_block_t(d, 32768)) * d


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--triton-python", required=True, help="a python with the triton wheel installed")
  args = ap.parse_args(argv)
  bin_dir = subprocess.run([args.triton_python, "-c", "import triton, os; print(os.path.dirname(triton.__file__))"],
                           capture_output=True, text=True, check=True).stdout.strip() + "/backends/nvidia/bin"
  ptxas = next(p for p in (Path(bin_dir) / "ptxas-blackwell", Path(bin_dir) / "ptxas") if p.exists())
  print(f"| case | registers | spill bytes | SASS per coordinate |\n| --- | ---: | ---: | ---: |")
  with tempfile.TemporaryDirectory() as tmp:
    for name in CASES:
      ir, warps, coords = triton_ir(name)
      ttir, ptx, cubin = (Path(tmp) / f"k.{ext}" for ext in ("ttir", "ptx", "cubin"))
      ttir.write_text(ir)
      subprocess.run([args.triton_python, "-c", _COMPILE, str(ttir), str(warps), str(ptx)], check=True,
                     capture_output=True)
      info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                            capture_output=True, text=True, check=True).stderr
      sass = subprocess.run([str(Path(bin_dir) / "cuobjdump"), "-sass", str(cubin)],
                            capture_output=True, text=True, check=True).stdout
      n = len(re.findall(r"^\s+/\*[0-9a-f]+\*/", sass, re.M))
      regs = re.search(r"Used (\d+) registers", info).group(1)
      spill = re.search(r"(\d+) bytes spill stores", info).group(1)
      print(f"| {name} | {regs} | {spill} | {n * 32 * warps / coords:.1f} |", flush=True)


if __name__ == "__main__":
  main()
