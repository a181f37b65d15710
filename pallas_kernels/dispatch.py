"""Which decode-attention implementation runs for a cache, and the Pallas entry `tqjax.cache` calls.

`tqjax.cache.attention(..., implementation=None)` asks `default_implementation(cache)`; with
"pallas" it calls `attention(cache, q, scale=, soft_cap=, sliding_window=)` here. Kernels are
imported lazily so this module (and `pallas_kernels`) imports on any backend, GPU or not.
"""

from __future__ import annotations

import functools

import jax

from tqjax import cache as tq_cache


def _backend() -> str:
  return jax.default_backend()


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


def _partial_fn(backend: str, interpret: bool, **kernel_options):
  if backend == "tpu" and not interpret:
    from pallas_kernels import decode_attention_tpu  # noqa: PLC0415

    return functools.partial(decode_attention_tpu.decode_partial_tpu, **kernel_options)
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

  interpret=True runs the GPU kernel in Pallas interpret mode (any backend, for tests).
  Raises ValueError (naming the reason) when no kernel supports this cache here.
  """
  if q.ndim != 3:
    raise ValueError(f"attention: q must be [batch, q_heads, head_dim], got q.shape={q.shape}")
  backend = "gpu" if interpret else _backend()
  ok, why = supports(cache, backend)
  if not ok:
    raise ValueError(f'implementation="pallas" is not available for this cache: {why}')
  partial_fn = _partial_fn(backend, interpret, **kernel_options)
  return tq_cache.chunked_attention(
      cache,
      q[:, :, None, :],
      scale=scale,
      soft_cap=soft_cap,
      sliding_window=sliding_window,
      partial_fn=partial_fn,
  )[:, :, 0]
