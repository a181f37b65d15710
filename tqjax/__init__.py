"""tqjax: TurboQuant KV-cache and vector compression for JAX.

Pure functions over small pytrees. Build a `Quantizer` once (rotation, Lloyd–Max codebook, QJL
sketch) and `encode` / `decode` / `estimate_ip` vectors with any leading batch dims; keep a
compressed KV cache (`CacheConfig`, `init_cache`, `prefill`, `append`) and attend over it
(`attention`, `chunked_attention`, `scores`) with `implementation=None | "xla" | "pallas"`.
Submodules not imported here: `tqjax.nn` (the Flax layer; needs flax), `tqjax.dense_cache` (the
full-precision cache with the same operations), `tqjax.sharding` (the cache over a device mesh),
`tqjax.search` (a compressed vector index) and `tqjax.models` (MiniLM, GGUF decoders).

Shape letters, used in every docstring and einsum of the project:
  B batch · T query (new) tokens · S cache slots / key tokens · N query heads · K kv heads ·
  G query heads per kv head (N = K·G) · H head dim · D model width (nn, models) · W window.

Layers (each imports only from those before it; `tests/test_layers.py` holds the map):
codebook, rotation, qjl, packing < quantizer < cache < partials < pallas_kernels < ops
< compat, dense_cache, sharding, search, baselines, fidelity < nn < models.
"""

from tqjax.codebook import Codebook, distortion, dequantize, lloyd_max, make_codebook, quantize
from tqjax.packing import pack, packed_words, unpack
from tqjax.qjl import Qjl, make_qjl, qjl_decode, qjl_encode, qjl_ip
from tqjax.quantizer import (
    Code,
    Quantizer,
    QuantizerConfig,
    bits_per_coordinate,
    check_code,
    compression_ratio,
    decode,
    decode_rotated,
    encode,
    estimate_ip,
    make_quantizer,
    quantizer_from_config,
)
from tqjax.rotation import Rotation, hadamard_transform, make_rotation, rotate, unrotate
from tqjax.cache import (
    CacheConfig,
    KVCache,
    append,
    append_checked,
    bits_per_coordinate_kv,
    constants_nbytes,
    expected_nbytes,
    init_cache,
    nbytes,
    partition_specs,
)
from tqjax.ops import IMPLEMENTATIONS, attention, chunked_attention, prefill, scores
from tqjax.compat import TurboQuant, TurboQuantConfig, TurboQuantKVCache

__version__ = "0.1.0"

__all__ = [
    # quantizer
    "Codebook", "distortion", "dequantize", "lloyd_max", "make_codebook", "quantize",
    "pack", "packed_words", "unpack",
    "Qjl", "make_qjl", "qjl_decode", "qjl_encode", "qjl_ip",
    "Code", "Quantizer", "QuantizerConfig", "bits_per_coordinate", "check_code", "compression_ratio",
    "decode", "decode_rotated", "encode", "estimate_ip", "make_quantizer", "quantizer_from_config",
    "Rotation", "hadamard_transform", "make_rotation", "rotate", "unrotate",
    # cache
    "CacheConfig", "KVCache", "init_cache", "append", "append_checked", "nbytes", "constants_nbytes",
    "expected_nbytes", "bits_per_coordinate_kv", "partition_specs",
    # attention
    "IMPLEMENTATIONS", "prefill", "attention", "chunked_attention", "scores",
    # seed-style wrappers
    "TurboQuant", "TurboQuantConfig", "TurboQuantKVCache",
]
