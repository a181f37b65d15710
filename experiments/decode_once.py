"""One default decode call (compile + run) of a CONFIGS cache at B = 8, Hq = 32, Hkv = 8, D = 128,
S = 32k: a process with exactly one launch of the decode kernel, for profilers and PTX dumps.

  PYTHONPATH=. ncu --clock-control none -k regex:tq_decode_mgpu -c 1 --metrics M1,M2 \\
      python experiments/decode_once.py K3/V3
  PYTHONPATH=. MOSAIC_GPU_DUMP_PTX=1 python experiments/decode_once.py K3/V3 > k3v3.log  # sass_mix.py

Nsight Compute ran this way in 15 s per config on an H200 (2026-11-29,
results/ncu_decode_NVIDIA_H200_2026-11-29_session13.md), where `kernel_time.py`'s multi-launch
runs had hung on the same kernels.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_decode import CONFIGS, random_cache, pallas_attention  # noqa: E402
from tqjax import cache as C  # noqa: E402

if len(sys.argv) != 2 or sys.argv[1] not in CONFIGS:
  sys.exit(f"usage: decode_once.py CONFIG, CONFIG one of {sorted(CONFIGS)}")
cache = random_cache(C.CacheConfig(head_dim=128, **CONFIGS[sys.argv[1]]), 8, 8, 32768, seed=0)
q = jax.random.normal(jax.random.key(0), (8, 32, 128), jnp.float32)
jax.block_until_ready(jax.jit(lambda c, q: pallas_attention(c, q))(cache, q))
