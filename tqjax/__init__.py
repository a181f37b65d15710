"""tqjax: TurboQuant KV-cache and vector compression for JAX.

Pure functions over small pytrees: build a `Quantizer` once (rotation, Lloyd–Max codebook, QJL
sketch) and `encode` / `decode` / `estimate_ip` vectors with any leading batch dims.
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
from tqjax.compat import TurboQuant, TurboQuantConfig, TurboQuantKVCache  # seed-style wrappers

__version__ = "0.1.0"
