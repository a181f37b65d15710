"""Instruction mix of a kernel's main loop, by opcode and execution pipe, from its SASS (offline).

  python -m experiments.sass_mix kernel.ptx --ptxas PATH/ptxas      # compile for sm_90a, then count
  python -m experiments.sass_mix kernel.sass                         # `cuobjdump -sass` output

Get the PTX of a Mosaic GPU kernel on a GPU machine with `MOSAIC_GPU_DUMP_PTX=1` (it is printed
between `.version` and the last `}`; this script cuts it out of such a log). ptxas, cuobjdump
and nvdisasm need no GPU: `pip download --no-deps nvidia-cuda-nvcc nvidia-cuda-cuobjdump` and
unzip the wheels (bin/ under nvidia/cu13). ptxas 13.5 from PyPI gave the same register count as
the GPU machine's for the decode kernel (126).

The main loop is the body of the conditional backward branch that spans the most code. Pipes (Hopper, as
Nsight Compute names them, approximately): alu (logic, shifts, byte permutes, compares,
selects, min/max), fma (IMAD in all forms, FP32 and FP16 arithmetic), mio (shared memory,
shuffles, `movmatrix`), xu (MUFU), tensor (HMMA), uniform (U*, R2UR) and other (branches,
barriers, moves: not placed). An SMSP
issues one instruction per cycle; the alu and fma pipes each take a warp instruction every
other cycle, so a loop whose alu count is more than half its instructions is bound by that pipe.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

PIPES = {
    "alu": {"LOP3", "LOP", "SHF", "PRMT", "ISETP", "FSETP", "FSEL", "SEL", "FMNMX", "IMNMX", "IADD3", "LEA",
            "PLOP3", "P2R", "R2P", "VOTE", "FLO", "POPC", "BMSK", "SGXT", "F2FP", "IABS", "FCHK"},
    "fma": {"IMAD", "IMUL", "FFMA", "FMUL", "FADD", "HADD2", "HFMA2", "HMUL2", "IDP", "IADD"},
    "mio": {"LDS", "STS", "LDSM", "MOVM", "SHFL", "LD", "ST", "ATOMS", "LDG", "STG", "S2R", "CS2R"},
    "xu": {"MUFU", "I2F", "F2I", "I2FP", "F2F"},
    "tensor": {"HMMA", "HGMMA", "IMMA", "QGMMA"},
}
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def pipe(op: str) -> str:
  """The pipe of an opcode's base name (the part before the first dot)."""
  base = op.split(".")[0]
  for name, ops in PIPES.items():
    if base in ops:
      return name
  if base.startswith("U") or base == "R2UR":
    return "uniform"
  return "other"  # branches, barriers, moves, ...


def instructions(sass: str) -> list[tuple[int, str, str, str]]:
  """(address, predicate or "", opcode, operands) of every instruction in `cuobjdump -sass` text."""
  return [(int(a, 16), pred.strip(), op, rest) for a, pred, op, rest in LINE.findall(sass)]


def main_loop(insts: list[tuple[int, str, str, str]]) -> tuple[int, int]:
  """[start, end] addresses of the body of the conditional backward branch that spans the most code
  (unconditional ones jump back from out-of-line code, such as a barrier's retry)."""
  best = None
  for addr, pred, op, rest in insts:
    m = re.search(r"0x([0-9a-f]+)", rest)
    if op in ("BRA", "BRA.U") and pred and m and int(m.group(1), 16) < addr:
      span = (int(m.group(1), 16), addr)
      if best is None or span[1] - span[0] > best[1] - best[0]:
        best = span
  if best is None:
    raise ValueError("no backward branch: no loop in this SASS")
  return best


def mix(sass: str) -> tuple[tuple[int, int], collections.Counter, collections.Counter]:
  """(loop span, opcode counts, pipe counts) of the main loop's instructions."""
  insts = instructions(sass)
  lo, hi = main_loop(insts)
  ops = collections.Counter(op.split(".")[0] for a, _, op, _ in insts if lo <= a <= hi)
  pipes = collections.Counter()
  for op, n in ops.items():
    pipes[pipe(op)] += n
  return (lo, hi), ops, pipes


def ptx_module(text: str, entry: str) -> str:
  """The PTX module in `text` (a .ptx file, or a log of several) whose .entry name contains entry:
  from its `.version` line to its last `}`."""
  starts = [m.start() for m in re.finditer(r"^\.version", text, re.M)] + [len(text)]
  for a, b in zip(starts, starts[1:]):
    module = text[a:b]
    if re.search(rf"\.entry\s+\S*{re.escape(entry)}", module):
      return module[:module.rindex("}") + 1]
  raise ValueError(f"no PTX module with an entry named like {entry!r}")


def to_sass(path: Path, ptxas: str | None, entry: str) -> str:
  """SASS text of a .sass file, or of the PTX module of kernel `entry` (in a .ptx file or a log)
  compiled for sm_90a."""
  text = path.read_text()
  if ".version" not in text:
    return text
  if not ptxas:
    raise ValueError(f"{path} holds PTX: pass --ptxas")
  info, sass = compile_ptx(ptx_module(text, entry), ptxas)
  print(" ".join(line.strip() for line in info.splitlines() if "Used" in line or "spill" in line))
  return sass


def compile_ptx(ptx: str, ptxas: str) -> tuple[str, str]:
  """(`ptxas -v`'s report, `cuobjdump -sass` text) of PTX compiled for sm_90a; cuobjdump is
  taken from ptxas' folder."""
  with tempfile.TemporaryDirectory() as tmp:
    src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
    src.write_text(ptx)
    info = subprocess.run([ptxas, "-arch=sm_90a", "-v", "-o", str(cubin), str(src)], capture_output=True,
                          text=True, check=True).stderr
    cuobjdump = str(Path(ptxas).with_name("cuobjdump"))
    return info, subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("path", type=Path, help=".sass text, or PTX (or a log with PTX in it)")
  ap.add_argument("--ptxas", help="ptxas to compile PTX with (cuobjdump beside it)")
  ap.add_argument("--entry", default="tq_decode_mgpu", help="the kernel, in PTX holding several")
  ap.add_argument("--top", type=int, default=20)
  args = ap.parse_args(argv)
  (lo, hi), ops, pipes = mix(to_sass(args.path, args.ptxas, args.entry))
  total = sum(ops.values())
  print(f"main loop 0x{lo:x}-0x{hi:x}: {total} instructions")
  print("by pipe:", ", ".join(f"{p} {n} ({100 * n / total:.0f} %)" for p, n in pipes.most_common()))
  print("by opcode:", ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))


if __name__ == "__main__":
  main()
