"""One default decode call (compile + run) of a CONFIGS cache at B = 8, N = 32, K = 8, H = 128,
S = 32k: a process with exactly one launch of the decode kernel, for profilers and PTX dumps.

  ncu --clock-control none -k regex:tq_decode_mgpu -c 1 --metrics M1,M2 \\
      python -m experiments.decode_once K3/V3
  MOSAIC_GPU_DUMP_PTX=1 python -m experiments.decode_once K3/V3 > k3v3.log  # sass_mix.py

Nsight Compute ran this way in 15 s per config on an H200 (2026-11-29), where `kernel_time.py`'s
multi-launch runs hung on the same kernels.
"""

import argparse

from experiments.bench_decode import CONFIGS

__all__ = ["main"]


def main(argv=None) -> None:
  """Parses CONFIG and makes the one decode call."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", choices=sorted(CONFIGS), help="cache configuration")
  args = parser.parse_args(argv)
  import jax  # noqa: PLC0415  (after --help: the call needs a GPU)
  import jax.numpy as jnp  # noqa: PLC0415

  from experiments.bench_decode import random_cache  # noqa: PLC0415
  from tqjax import cache as C  # noqa: PLC0415
  from tqjax import ops as tq_ops  # noqa: PLC0415

  cache = random_cache(C.CacheConfig(head_dim=128, **CONFIGS[args.config]), 8, 8, 32768, seed=0)
  q = jax.random.normal(jax.random.key(0), (8, 32, 128), jnp.float32)
  jax.block_until_ready(jax.jit(lambda c, q: tq_ops.attention(c, q, implementation="pallas"))(cache, q))


if __name__ == "__main__":
  main()
