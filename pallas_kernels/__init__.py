"""Fused Pallas kernels for the compressed KV cache, and the table that picks them.

`dispatch` returns callables with the contracts of `tqjax.partials.compressed_partial_reference`
(decode: `decode_mgpu` on Hopper, `decode_attention_gpu` (Triton) on other NVIDIA GPUs,
`decode_attention_tpu` on TPU) and `tqjax.cache.encode_tokens` (prefill encode: `encode_mgpu`,
`encode_gpu`). Kernels import tqjax's types and the contract only and never call back into the
cache; each module keeps its plain-jnp reference beside the kernel. Importable on any backend.
"""
