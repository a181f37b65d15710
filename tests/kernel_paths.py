"""The public entry points run through an explicitly chosen fused kernel (interpret mode or
kernel options), for tests: `tqjax.ops.attention` with the partial function, and
`tqjax.cache.prefill_with_encoder` with the encoder, that `pallas_kernels.dispatch` returns."""

from pallas_kernels import dispatch
from tqjax import ops as tq_ops
from tqjax import cache as tq_cache


def pallas_attention(cache, q, *, soft_cap=None, sliding_window=None, interpret=False, **kernel_options):
  """`tqjax.ops.attention` of q [B, N, H] through `dispatch.decode_partial_fn`."""
  fn = dispatch.decode_partial_fn(cache, q.shape[1] // cache.num_kv_heads, interpret=interpret, **kernel_options)
  return tq_ops.attention(cache, q, soft_cap=soft_cap, sliding_window=sliding_window, partial_fn=fn)


def pallas_prefill(cache, k, v, lengths=None, *, xla_fallback=False, interpret=False, **kernel_options):
  """`tqjax.cache.prefill_with_encoder` with `dispatch.prefill_encoder`."""
  encoder = dispatch.prefill_encoder(cache, (k.dtype, v.dtype), xla_fallback=xla_fallback, interpret=interpret,
                                     **kernel_options)
  return tq_cache.prefill_with_encoder(cache, k, v, lengths, encoder=encoder)
