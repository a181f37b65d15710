"""Fingerprints of the fused kernels' lowered MLIR, to show that a change of code layout leaves
the kernels unchanged.

  python -m experiments.mlir_hashes                 # every kernel, every config
  python -m experiments.mlir_hashes --only decode_mgpu,encode_mgpu

On CPU, every kernel is lowered for an abstract target (the Mosaic GPU and Triton kernels for an
abstract H100, `lowering_platforms=("cuda",)`; the TPU kernel with `("tpu",)`) over a fixed set
of configs (head_dim 64, 128, 256; mse and prod keys; several bit widths), and each line prints
`kernel config sha256` (the first 12 hex digits of the SHA-256 of the lowered module's text, the
serialized kernel included). Source locations (file, line, column) are left out of the lowering:
a function that moves to another file or line lowers to the same bytes. Names stay in (the
pallas_call and kernel names, jit names), so renaming a kernel function changes its hash. Each
kernel is lowered in a process of its own: Mosaic GPU numbers the kernels a process lowers
(`kernel_0`, `kernel_1`, ...), so a kernel's hashes would otherwise depend on which kernels were
lowered before it. About 40 s on one CPU core; nothing runs before the arguments are parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import re
import subprocess
import sys

__all__ = ["KERNELS", "digest", "main", "no_source_locations"]

KERNELS = ("decode_mgpu", "decode_attention_gpu", "decode_attention_tpu", "encode_gpu", "encode_mgpu")

# decode kernels: k bits, v bits, key variant, G, T, S, soft cap, norm dtype (per head_dim)
DECODE_CASES = [
    (3, 3, "mse", 4, 1, 32768, None, "float16"),
    (4, 4, "mse", 8, 1, 1000, 30.0, "float32"),
    (2, 1, "mse", 2, 2, 37, None, "bfloat16"),
    (1, 2, "mse", 1, 1, 4133, 20.0, "float16"),
    (3, 3, "prod", 4, 1, 32768, None, "float16"),
    (5, 2, "prod", 8, 1, 100, 30.0, "float32"),
]
HEAD_DIMS = (64, 128, 256)
# decode_mgpu's tuning variants (on the prod case at D = 128: both dots and every dequantizer shift)
MGPU_TUNINGS = {
    "stages1": dict(stages=1),
    "stages3": dict(stages=3),
    "exact_max": dict(max_slack=None, edge_masks_only=False),
    "slack0": dict(max_slack=0.0),
    "masks_everywhere": dict(edge_masks_only=False),
}
TRITON_OPTIONS = {"default": {}, "bf16": dict(dot_dtype="bfloat16"), "stages4": dict(num_stages=4)}
# encode kernels: bits, variant ("mse" with norm correction for even bits, or "prod"), mean
ENCODE_CASES = [(1, "mse", False), (2, "mse", True), (3, "mse", True), (4, "mse", False),
                (3, "prod", True), (4, "prod", False)]


KERNELS_ONLY = False  # --kernels-only: hash the kernels' custom calls alone


def digest(lowered) -> str:
  """The first 12 hex digits of the SHA-256 of the lowered module's text; with --kernels-only, of
  its custom-call operations alone (the serialized kernels and their backend configs), SSA value
  names blanked: XLA-side changes around an unchanged kernel keep this hash."""
  text = lowered.as_text()
  if KERNELS_ONLY:
    text = "\n".join(re.sub(r"%[\w#.]+", "%", line) for line in text.splitlines() if "custom_call" in line)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def no_source_locations():
  """Lowering with unknown source locations: no tracebacks in locations, and the frame lookup that
  names a file and line finds none."""
  from jax._src import config, source_info_util  # noqa: PLC0415

  saved = source_info_util.user_frame
  source_info_util.user_frame = lambda *args, **kwargs: None
  try:
    with config.include_full_tracebacks_in_locations(False):
      yield
  finally:
    source_info_util.user_frame = saved


def _decode_inputs(d, case, batch=2, kv_heads=3):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from tqjax import cache as C  # noqa: PLC0415
  from tqjax import partials  # noqa: PLC0415

  kb, vb, var, g, t, s, cap, nd = case
  cfg = C.CacheConfig(head_dim=d, k_bits=kb, v_bits=vb, norm_dtype=nd, k_variant=var)
  cache = jax.eval_shape(lambda: C.init_cache(cfg, batch, kv_heads, s))
  pq = jax.eval_shape(lambda c: partials.prepare_query(c, jnp.zeros((batch, kv_heads, g, t, d), jnp.float32), 0.1), cache)
  ranges = jax.ShapeDtypeStruct((batch, t), jnp.int32)
  return cache, pq, ranges, cap


def _case_name(d, case):
  kb, vb, var, g, t, s, cap, nd = case
  return f"d{d}-k{kb}{var}v{vb}-g{g}t{t}-s{s}-cap{cap}-{nd}"


def decode_mgpu_hashes():
  import jax  # noqa: PLC0415
  from jax.sharding import use_abstract_mesh  # noqa: PLC0415

  from pallas_kernels import decode_mgpu as M  # noqa: PLC0415

  def lower(d, case, **tuning):
    cache, pq, ranges, cap = _decode_inputs(d, case)
    f = functools.partial(M.decode_partial, soft_cap=cap, tuning=M.DecodeTuning(**tuning))
    with use_abstract_mesh(H100()):
      return digest(jax.jit(f).trace(cache, pq, ranges, ranges).lower(lowering_platforms=("cuda",)))

  for d in HEAD_DIMS:
    for case in DECODE_CASES:
      yield _case_name(d, case), lower(d, case)
  for name, tuning in MGPU_TUNINGS.items():
    yield f"{_case_name(128, DECODE_CASES[4])}-{name}", lower(128, DECODE_CASES[4], **tuning)


def decode_attention_gpu_hashes():
  import jax  # noqa: PLC0415
  from jax.sharding import use_abstract_mesh  # noqa: PLC0415

  from pallas_kernels import decode_attention_gpu as K  # noqa: PLC0415

  for d in HEAD_DIMS:
    for case in DECODE_CASES:
      cache, pq, ranges, cap = _decode_inputs(d, case)
      for name, options in TRITON_OPTIONS.items():
        if name != "default" and case is not DECODE_CASES[0] and case is not DECODE_CASES[4]:
          continue
        with use_abstract_mesh(H100()):
          lowered = jax.jit(functools.partial(K.decode_partial, soft_cap=cap, **options)).trace(
              cache, pq, ranges, ranges).lower(lowering_platforms=("cuda",))
        yield f"{_case_name(d, case)}-{name}", digest(lowered)


def decode_attention_tpu_hashes():
  import jax  # noqa: PLC0415

  from pallas_kernels.decode_attention_tpu import decode_partial_tpu  # noqa: PLC0415

  for d in HEAD_DIMS:
    for case in DECODE_CASES:
      if case[4] != 1:  # one query token per sequence
        continue
      cache, pq, ranges, cap = _decode_inputs(d, case)
      lowered = jax.jit(functools.partial(decode_partial_tpu, soft_cap=cap, block_s=512)).trace(
          cache, pq, ranges, ranges).lower(lowering_platforms=("tpu",))
      yield _case_name(d, case), digest(lowered)


def _encode_inputs(d, case, tokens):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from tqjax import quantizer as Q  # noqa: PLC0415

  bits, var, with_mean = case
  if var == "prod":
    tq = Q.make_quantizer(d, bits, "prod", norm_dtype="float16")
  else:
    tq = Q.make_quantizer(d, bits, norm_correction=bits % 2 == 0, norm_dtype="float16")
  x = jax.ShapeDtypeStruct((2, 3, tokens, d), jnp.bfloat16)
  mean = jax.ShapeDtypeStruct((2, 3, d), jnp.float32) if with_mean else None
  return tq, x, mean, f"d{d}-b{bits}{var}{'-mean' if with_mean else ''}"


def encode_gpu_hashes():
  import jax  # noqa: PLC0415
  from jax.sharding import use_abstract_mesh  # noqa: PLC0415

  from pallas_kernels import encode_gpu as E  # noqa: PLC0415

  for d in HEAD_DIMS:
    for case in ENCODE_CASES:
      tq, x, mean, name = _encode_inputs(d, case, 1000)
      for precision in ("high", "tf32"):
        with use_abstract_mesh(H100()):
          lowered = jax.jit(functools.partial(E.encode, precision=precision)).trace(tq, x, mean).lower(
              lowering_platforms=("cuda",))
        yield f"{name}-{precision}", digest(lowered)


def encode_mgpu_hashes():
  import jax  # noqa: PLC0415
  from jax.sharding import use_abstract_mesh  # noqa: PLC0415

  from pallas_kernels import encode_mgpu as M  # noqa: PLC0415

  for d in M.DIMS:
    for case in ENCODE_CASES:
      if case[1] != "mse":
        continue
      tq, x, mean, name = _encode_inputs(d, case, 640)
      for wgs in (2, 3):
        with use_abstract_mesh(H100()):
          lowered = jax.jit(functools.partial(M.encode, ctas=132, wgs=wgs)).trace(tq, x, mean).lower(
              lowering_platforms=("cuda",))
        yield f"{name}-wg{wgs}", digest(lowered)


def H100():
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType  # noqa: PLC0415

  return AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                      abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda"))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--only", default=",".join(KERNELS), help=f"comma list of kernels, of {', '.join(KERNELS)}")
  ap.add_argument("--kernels-only", action="store_true", help="hash only the kernels' custom calls (see digest)")
  ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # one kernel, here
  args = ap.parse_args(argv)
  kernels = args.only.split(",")
  unknown = sorted(set(kernels) - set(KERNELS))
  if unknown:
    ap.error(f"unknown kernels {unknown}; choose from {KERNELS}")
  if not args.in_process:
    for kernel in kernels:
      flags = ["--kernels-only"] if args.kernels_only else []
      subprocess.run([sys.executable, __file__, "--in-process", "--only", kernel, *flags], check=True)
    return
  global KERNELS_ONLY
  KERNELS_ONLY = args.kernels_only
  import jax  # noqa: PLC0415

  jax.config.update("jax_platforms", "cpu")
  with no_source_locations():
    for kernel in kernels:
      for config, h in globals()[f"{kernel}_hashes"]():
        print(f"{kernel} {config} {h}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
