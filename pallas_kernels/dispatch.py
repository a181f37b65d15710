"""Which implementation runs for a cache, and the Pallas entries `tqjax.cache` calls.

Decode attention: `tqjax.cache.attention(..., implementation=None)` asks
`default_implementation(cache)`; with "pallas" it calls `attention(cache, q, scale=, soft_cap=,
sliding_window=)` here. Prefill encode: `tqjax.cache.prefill(..., implementation=None)` asks
`default_prefill_implementation(cache, dtypes)` and calls `prefill(...)` here. Kernels are
imported lazily so this module (and `pallas_kernels`) imports on any backend, GPU or not.
"""

from __future__ import annotations

import functools

import jax

from tqjax import cache as tq_cache


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


def _partial_fn(cache, rows: int, backend: str, interpret: bool, **kernel_options):
  if backend == "tpu" and not interpret:
    from pallas_kernels import decode_attention_tpu  # noqa: PLC0415

    return functools.partial(decode_attention_tpu.decode_partial_tpu, **kernel_options)
  if not interpret and not kernel_options and _mosaic_decode(cache, rows):
    from pallas_kernels import decode_mgpu  # noqa: PLC0415

    return decode_mgpu.decode_partial
  from pallas_kernels import decode_attention_gpu  # noqa: PLC0415

  return functools.partial(decode_attention_gpu.decode_partial, interpret=interpret, **kernel_options)


def attention(
    cache,  # tqjax.cache.KVCache
    q,  # [B, Hq, D]
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    interpret: bool = False,
    **kernel_options,
):
  """Decode attention through the fused kernel → [B, Hq, D]; same semantics as `tqjax.cache.attention`.

  On a Hopper GPU `decode_mgpu` (Mosaic GPU) runs where it applies (mse or prod keys, mse
  values, head_dim 64, 128 or 256, ≤ 8 query heads per kv head) and no kernel_options are given;
  otherwise `decode_attention_gpu` (Triton), which kernel_options (block_k, dot_dtype, ...)
  configure.
  interpret=True runs the Triton kernel in Pallas interpret mode (any backend, for tests).
  Raises ValueError (naming the reason) when no kernel supports this cache here.
  """
  if q.ndim != 3:
    raise ValueError(f"attention: q must be [batch, q_heads, head_dim], got q.shape={q.shape}")
  backend = "gpu" if interpret else _backend()
  ok, why = supports(cache, backend)
  if not ok:
    raise ValueError(f'implementation="pallas" is not available for this cache: {why}')
  partial_fn = _partial_fn(cache, q.shape[1] // cache.num_kv_heads, backend, interpret, **kernel_options)
  return tq_cache.chunked_attention(
      cache,
      q[:, :, None, :],
      scale=scale,
      soft_cap=soft_cap,
      sliding_window=sliding_window,
      partial_fn=partial_fn,
  )[:, :, 0]


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


def prefill(
    cache,  # tqjax.cache.KVCache
    k,  # [B, K, T, D]
    v,  # [B, K, T, D]
    lengths=None,  # [B] int or None
    *,
    xla_fallback: bool = False,
    interpret: bool = False,
    **kernel_options,
):
  """`tqjax.cache.prefill` with the fused encode kernels: `pallas_kernels.encode_mgpu.encode`
  (Mosaic GPU) where it applies on a Hopper GPU, else `pallas_kernels.encode_gpu.encode` (Triton),
  which kernel_options (block_t, num_warps, ...) and interpret=True select explicitly.

  xla_fallback=False (implementation="pallas"): raises ValueError naming the reason unless the
  kernel does every encode. xla_fallback=True (implementation=None): encodes the kernel does not
  support (more than 4 codebook bits, outlier channels, ...) go through the XLA encode.
  interpret=True runs the kernel in Pallas interpret mode (any backend, for tests).
  """
  from pallas_kernels import encode_gpu  # noqa: PLC0415

  backend = "gpu" if interpret else _backend()
  if not xla_fallback:
    ok, why = prefill_supports(cache, backend, (k.dtype, v.dtype))
    if not ok:
      raise ValueError(f'implementation="pallas" is not available for this prefill: {why}')

  def encoder(tq, x, mean=None):
    if xla_fallback and not _encode_support(tq, (x.dtype,), backend)[0]:
      return tq_cache.encode_tokens(tq, x, mean)
    if not interpret and not kernel_options and _mosaic_encode(tq, x, mean):
      from pallas_kernels import encode_mgpu  # noqa: PLC0415

      return encode_mgpu.encode(tq, x, mean)
    return encode_gpu.encode(tq, x, mean, interpret=interpret, **kernel_options)

  return tq_cache.prefill_with_encoder(cache, k, v, lengths, encoder=encoder)
