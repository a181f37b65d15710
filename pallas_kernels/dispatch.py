"""The kernel table: which fused kernel serves a cache on this backend, as a callable.

Nothing here runs attention or writes a cache: `tqjax.ops` asks
`default_implementation(cache)` and `decode_partial_fn(cache, rows)` for a callable with the
contract of `tqjax.partials.compressed_partial_reference`, and `tqjax.ops.prefill` asks
`default_prefill_implementation` and `prefill_encoder` for an encoder with the contract of
`tqjax.cache.encode_tokens`. Kernels are imported lazily so this module (and `pallas_kernels`)
imports on any backend, GPU or not.
"""

from __future__ import annotations

import functools

import jax

from tqjax.cache import encode_tokens

__all__ = [
    "supports",
    "default_implementation",
    "decode_partial_fn",
    "prefill_supports",
    "default_prefill_implementation",
    "prefill_encoder",
]


def _backend() -> str:
  return jax.default_backend()


def _is_hopper() -> bool:
  """True on an sm_90 GPU (H100/H200), where the Mosaic GPU kernels run."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def supports(cache, backend: str | None = None) -> tuple[bool, str]:
  """(True, "") if a fused kernel handles `cache` on `backend` (default: JAX's), else (False, why)."""
  backend = backend or _backend()
  if backend in ("gpu", "cuda", "rocm"):
    if backend == "rocm":
      return False, "the GPU kernel is only built and tested for NVIDIA (Triton on CUDA)"
    from pallas_kernels import decode_attention_gpu  # noqa: PLC0415

    return decode_attention_gpu.supported(cache)
  if backend == "tpu":
    from pallas_kernels import decode_attention_tpu  # noqa: PLC0415

    return decode_attention_tpu.supported(cache)
  return False, f"no fused kernel for backend {backend!r} (CPU runs the XLA path)"


def default_implementation(cache) -> str:
  """"pallas" where a fused kernel supports the cache on this backend, else "xla"."""
  return "pallas" if supports(cache)[0] else "xla"


def _mosaic_decode(cache, rows: int) -> bool:
  """Whether `decode_mgpu` (faster than the Triton kernel) takes this decode: Hopper, and a cache
  and G·T `rows` per kv head it supports (mse or prod keys, mse values, head_dim 64, 128 or 256,
  rows ≤ 8)."""
  from pallas_kernels import decode_mgpu  # noqa: PLC0415

  return _is_hopper() and rows <= decode_mgpu.MAX_ROWS and decode_mgpu.supported(cache)[0]


def decode_partial_fn(cache, rows: int, *, backend: str | None = None, interpret: bool = False, **kernel_options):
  """The fused decode partial for `cache` and G·T `rows` query rows per kv head: a callable
  `(cache, pq, lo, hi, soft_cap)` with the contract of `compressed_partial_reference`.

  On a Hopper GPU `decode_mgpu` (Mosaic GPU) serves where it applies (mse or prod keys, mse
  values, head_dim 64, 128 or 256, ≤ 8 rows) and no kernel_options are given; on TPU
  `decode_attention_tpu`; otherwise `decode_attention_gpu` (Triton), which kernel_options
  (block_k, dot_dtype, ...) configure. interpret=True runs the Triton kernel in Pallas interpret
  mode (any backend, for tests). backend names the backend to choose for (default: JAX's, or
  "gpu" with interpret=True). Raises ValueError naming the reason when no kernel supports this
  cache there.
  """
  backend = backend or ("gpu" if interpret else _backend())
  ok, why = supports(cache, backend)
  if not ok:
    raise ValueError(f'implementation="pallas" is not available for this cache: {why}')
  if backend == "tpu":
    from pallas_kernels import decode_attention_tpu  # noqa: PLC0415

    return functools.partial(decode_attention_tpu.decode_partial_tpu, **kernel_options)
  if not interpret and not kernel_options and _mosaic_decode(cache, rows):
    from pallas_kernels import decode_mgpu  # noqa: PLC0415

    return decode_mgpu.decode_partial
  from pallas_kernels import decode_attention_gpu  # noqa: PLC0415

  return functools.partial(decode_attention_gpu.decode_partial, interpret=interpret, **kernel_options)


# ----------------------------------------------------------------------------- prefill encode


def _encode_backend(backend: str) -> tuple[bool, str]:
  if backend in ("gpu", "cuda"):
    return True, ""
  if backend == "rocm":
    return False, "the encode kernel is only built and tested for NVIDIA (Triton on CUDA)"
  return False, f"no fused encode kernel for backend {backend!r} (the XLA encode runs there)"


def _encode_support(tq, dtypes, backend: str) -> tuple[bool, str]:
  """(True, "") if the encode kernel encodes with quantizer `tq` inputs of every dtype in `dtypes`
  (a tuple; None: any supported dtype) on `backend`, else (False, why)."""
  ok, why = _encode_backend(backend)
  if not ok:
    return ok, why
  from pallas_kernels import encode_gpu  # noqa: PLC0415

  for dtype in (None,) if dtypes is None else dtypes:
    ok, why = encode_gpu.supported(tq, dtype)
    if not ok:
      return False, why
  return True, ""


def prefill_supports(cache, backend: str | None = None, dtypes=None) -> tuple[bool, str]:
  """(True, "") if the fused encode kernel does every encode of a prefill of `cache` (with k/v of
  `dtypes`, a tuple, if given) on `backend` (default: JAX's), else (False, why)."""
  backend = backend or _backend()
  ok, why = _encode_backend(backend)
  if not ok:
    return ok, why
  if cache.config.outlier_channels:
    return False, f"outlier_channels={cache.config.outlier_channels} (the encode kernel has no channel split)"
  for name, store in (("keys", cache.k), ("values", cache.v)):
    ok, why = _encode_support(store.quantizer, dtypes, backend)
    if not ok:
      return False, f"{name}: {why}"
  return True, ""


def default_prefill_implementation(cache, dtypes=None) -> str:
  """"pallas" where the encode kernel can do some of a prefill's encodes on this backend, else "xla"."""
  if cache.config.outlier_channels:
    return "xla"
  some = any(_encode_support(store.quantizer, dtypes, _backend())[0] for store in (cache.k, cache.v))
  return "pallas" if some else "xla"


def _mosaic_encode(tq, x, mean) -> bool:
  """Whether `encode_mgpu` (faster than the Triton kernel) takes this encode: Hopper, and an mse
  quantizer, bfloat16 x and a multiple of 64 tokens per group."""
  from pallas_kernels import encode_mgpu  # noqa: PLC0415

  tokens = x.shape[-2] if mean is not None else x.size // x.shape[-1]
  return _is_hopper() and encode_mgpu.supported(tq, x.dtype, tokens)[0]


def prefill_encoder(cache, dtypes, *, xla_fallback: bool = False, interpret: bool = False, **kernel_options):
  """The encoder a prefill of `cache` with k/v of `dtypes` (a tuple) uses: a callable
  `(tq, x, mean)` with the contract of `tqjax.cache.encode_tokens`.

  It runs `encode_mgpu.encode` (Mosaic GPU) where that applies on a Hopper GPU, else
  `encode_gpu.encode` (Triton), which kernel_options (block_t, num_warps, ...) and
  interpret=True (Pallas interpret mode, any backend, for tests) select explicitly.
  xla_fallback=False (implementation="pallas"): raises ValueError naming the reason unless the
  kernel does every encode. xla_fallback=True (implementation=None): encodes the kernel does not
  support (more than 4 codebook bits, ...) go through the XLA encode.
  """
  from pallas_kernels import encode_gpu  # noqa: PLC0415

  backend = "gpu" if interpret else _backend()
  if not xla_fallback:
    ok, why = prefill_supports(cache, backend, tuple(dtypes))
    if not ok:
      raise ValueError(f'implementation="pallas" is not available for this prefill: {why}')

  def encoder(tq, x, mean=None):
    if xla_fallback and not _encode_support(tq, (x.dtype,), backend)[0]:
      return encode_tokens(tq, x, mean)
    if not interpret and not kernel_options and _mosaic_encode(tq, x, mean):
      from pallas_kernels import encode_mgpu  # noqa: PLC0415

      return encode_mgpu.encode(tq, x, mean)
    return encode_gpu.encode(tq, x, mean, interpret=interpret, **kernel_options)

  return encoder
