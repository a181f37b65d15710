"""Fused GPU encode (rotate + quantize + pack [+ QJL sketch]) for TurboQuant codes (Pallas, Triton).

Implements `tqjax.quantizer.encode` (and `tqjax.cache.encode_tokens`, which also subtracts a
per-group mean such as the cache's key mean) in one pass: each program reads a block of BT
vectors x [BT, d] in their own dtype and writes only their packed codes and scales (and, for
prod quantizers, the packed QJL signs and residual norms). The XLA path instead makes separate
passes over float32 [.., d] intermediates (rotate, quantize, pack), which is why it costs 7-12x a
bf16 copy of K and V (experiments/results/bench_encode_*).

How one block is encoded without reshapes, gathers or value slices (Triton's rules):

* The rotation enters as P [d, d] in "kernel order": column j = w·32 + s holds row s·W + w of Π,
  i.e. the coordinate that `tqjax.packing` puts in slot s of column w (W = d/32). So the dot of
  the block with the ref slice P[:, w·32:(w+1)·32] is y for column w, slots 0..31, as a [BT, 32]
  tile: each tile holds exactly the 32 codes that share packed words of column w.
* Dots: precision="high" (default) splits P into bf16 hi + lo parts (and x too unless it is
  bf16), 2-3 bf16 dots with float32 accumulation, ~2^-16 relative error; precision="tf32" is
  one TF32 dot (~2^-11). Per-row scaling by 1/‖x‖ comes after the dot. A mean is subtracted
  after the dot too, as mean·P (float32-exact, once per group outside): x stays an exact bf16
  operand (half the registers of a split x − mean, no spills), at the price of a dot error
  relative to ‖x‖ instead of ‖x − mean‖ (~2^-17·‖x‖ with "high": irrelevant next to the
  quantization error, but a centred row within that of its mean gets noisy codes).
* Quantize: the Lloyd–Max codebook is symmetric with a boundary at exactly 0, so the code is
  h + m for y > 0 and h − 1 − m for y ≤ 0 (h = 2^(b−1)), where m counts the positive boundaries
  below |y| (strictly, for y > 0) or at or below |y| (for y ≤ 0). Adding 1 to the bits of |y|
  when y ≤ 0 (the next float up) makes both a strict count: h − 1 compares instead of 2^b − 1,
  ties on a boundary resolved exactly like `searchsorted(side="left")`.
* Norm correction: ĉ² depends only on m, so the same compares step it from c_h² to c_{h+m}²
  (no gather); Σĉ² accumulates per row and ‖x‖/‖ŷ‖ is the stored scale.
* Pack: a part of width p takes field (code >> offset) & (2^p − 1) of slot s to bit
  (s mod 32/p)·p of row s // (32/p); each packed word is a masked sum over the 32-wide axis
  (fields are disjoint), stored as its own column of the [BT, b·W] output block (b·W is often
  not a power of two, so there is no 2-D code tile to store).
* QJL (prod): the same compares step ±c_{h+m} too, so r = y − ŷ stays in the [BT, 32] tiles;
  the sketch S·r comes out in kernel order too (S permuted on both axes outside), one [BT, 32]
  tile per sign word column, as Σ_w r_w @ S[w-tile, c-tile] (K = N = 32 dots); bit j is
  S·r ≥ 0, one unmasked sum per word.
* Non-finite rows: y is replaced by 0 (the zero direction's codes) and the scale is NaN. Zero
  rows give y = 0 exactly and scale 0; rows whose ‖x‖² underflows or overflows in float32 follow
  the XLA path too (x / 1 resp. x / inf before quantizing, scale 0 resp. inf), except that with
  a mean a row with ‖x − mean‖ = 0 in float32 (equal to the mean, or underflowing) gets the zero
  direction's codes (the XLA path quantizes the unscaled x − mean); both decode to zeros.
* N not a multiple of BT: masked loads (other=0) and masked stores.

Letters: G groups (leading dims that share a mean), T tokens per group, d dim, W = d/32 words
per packed row, m QJL sketch rows, Wm = m/32, BT tokens per block, b codebook bits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import bf16
from tqjax import packing
from tqjax.codebook import lloyd_max  # static float64 codebooks (the pytree's arrays are traced under jit)
from tqjax.quantizer import Code, Quantizer, _check_vectors
from tqjax.rotation import dense_matrix

LANES = packing.WORD_BITS  # 32 slots per packed word
DIMS = (32, 64, 128, 256)
MAX_BITS = 4  # codebook bits (prod: total bits − 1)
MAX_SKETCH = 512
PRECISIONS = ("high", "tf32")
INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ----------------------------------------------------------------------------- static tables


def _tables(bits: int, dim: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
  """Float32 (positive boundaries b_h..b_{n−2}, c_{h+m}, c_{h+m}² for m = 0..h−1) of the codebook.

  Checks the symmetry the kernel relies on: boundary h − 1 is exactly 0 and b_k = −b_{n−2−k},
  c_k = −c_{n−1−k} in float32, so |y| against the positive half reproduces `searchsorted` on all
  of them and the centroid of code h − 1 − m is −c_{h+m}.
  """
  c64, b64, _ = lloyd_max(bits, dim)
  c, b = c64.astype(np.float32), b64.astype(np.float32)
  n, h = 2**bits, 2 ** (bits - 1)
  if b[h - 1] != 0 or not np.array_equal(b, -b[::-1]) or not np.array_equal(c, -c[::-1]):
    raise AssertionError(f"codebook (bits={bits}, dim={dim}) is not exactly symmetric in float32")
  bounds = tuple(float(v) for v in b[h:])  # h − 1 values, increasing
  levels = tuple(float(v) for v in c[h:])
  squares = tuple(float(v) for v in c[h:] * c[h:])  # float32 products, as the XLA path's ŷ·ŷ
  assert len(bounds) == h - 1 and len(levels) == len(squares) == h and n == 2 * h
  return bounds, levels, squares


def _to_kernel_order(m: jax.Array) -> jax.Array:
  """Columns of m [..., n] from natural order (i = s·W + w) to kernel order (j = w·32 + s), W = n/32."""
  n = m.shape[-1]
  return jnp.swapaxes(m.reshape(*m.shape[:-1], LANES, n // LANES), -1, -2).reshape(m.shape)


def _rotation_kernel_order(tq: Quantizer) -> jax.Array:
  return _to_kernel_order(dense_matrix(tq.rotation).T.astype(jnp.float32))  # y = x @ it, kernel order


def _split(p: jax.Array, precision: str) -> tuple[jax.Array, ...]:
  if precision == "tf32":
    return (p,)
  return bf16.split(p)


def rotation_operands(tq: Quantizer, precision: str) -> tuple[jax.Array, ...]:
  """Πᵀ in kernel order: (P float32,) for "tf32", (P_hi, P_lo) bfloat16 with P ≈ P_hi + P_lo for "high"."""
  return _split(_rotation_kernel_order(tq), precision)


def sketch_operands(tq: Quantizer, precision: str) -> tuple[jax.Array, ...]:
  """Sᵀ [d, m] in kernel order on both axes (z = r @ it, r and z in kernel order), split like P."""
  st = _to_kernel_order(tq.qjl.matrix.T.astype(jnp.float32))  # columns: sketch rows
  return _split(_to_kernel_order(st.T).T, precision)  # rows: residual coordinates


# ----------------------------------------------------------------------------- the kernel


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_operands(x, split: bool, precision: str):
  """[(lhs, index of the rhs part)] whose dots sum to x @ rhs: rhs parts are (P,) or (P_hi, P_lo)."""
  if precision == "tf32":
    return [(x, 0)]
  if split:
    hi, lo = bf16.split(x)
    return [(lo, 0), (hi, 1), (hi, 0)]  # small terms first: lo·P_hi, hi·P_lo, hi·P_hi
  return [(x, 1), (x, 0)]  # x exact in bfloat16


def _quantize_tile(y, bits, bounds, levels, squares, want_square: bool, want_centroid: bool):
  """Codes of y [BT, 32] float32 (uint32, `searchsorted(boundaries, y, side="left")`), and if asked
  the squared centroids ĉ² and the centroids ĉ themselves (float32 [BT, 32])."""
  h = 2 ** (bits - 1)
  # |y|, moved one float up when y ≤ 0, so "> b" counts b < y resp. b ≤ |y| (module docstring).
  pos = y > 0
  ybits = lax.bitcast_convert_type(y, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
  mag = lax.bitcast_convert_type(ybits + jnp.where(pos, jnp.uint32(0), jnp.uint32(1)), jnp.float32)
  # m, c_{h+m}² and c_{h+m} by accumulating 0/1 steps: float compares that yield 1.0/0.0 (FSET)
  # and FMAs, no predicates kept alive (select chains measured ~1.5x the SASS at 4 bits).
  m = jnp.zeros(y.shape, jnp.float32)
  sq = jnp.full(y.shape, squares[0], jnp.float32) if want_square else None
  level = jnp.full(y.shape, levels[0], jnp.float32) if want_centroid else None
  for j, bound in enumerate(bounds):
    step = (mag > bound).astype(jnp.float32)
    m = m + step
    if want_square:
      sq = sq + step * (squares[j + 1] - squares[j])
    if want_centroid:
      level = level + step * (levels[j + 1] - levels[j])
  mi = m.astype(jnp.int32)
  code = jnp.where(pos, h + mi, (h - 1) - mi).astype(jnp.uint32)
  chat = jnp.where(pos, level, -level) if want_centroid else None
  return code, sq, chat


def _pack_tile(code, bits: int):
  """[(packed row, word [BT, 1] uint32)] of the codes [BT, 32] of one column (slots 0..31)."""
  slot = lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
  out = []
  for p, offset, row0 in packing.parts(bits):
    per_word = LANES // p
    field = code if p == bits else (code >> jnp.uint32(offset)) & jnp.uint32(2**p - 1)
    shifted = field << ((slot % per_word) * p).astype(jnp.uint32)
    for r in range(p):
      sel = shifted if p == 1 else jnp.where(slot // per_word == r, shifted, jnp.uint32(0))
      out.append((row0 + r, jnp.sum(sel, axis=1, dtype=jnp.uint32, keepdims=True)))  # disjoint: sum = OR
  return out


def _store_col(ref, r0, block_t, col, word, row_ok):
  pltriton.store(ref.at[pl.ds(r0, block_t), pl.ds(col, 1)], word, mask=row_ok[:, None])


def tq_encode_kernel(
    x_ref,  # [T, d] (block [BT·blocks_per_program, d]) input dtype
    mean_ref,  # [d] float32 per group, or None
    mrot_ref,  # [d] float32 per group: mean @ P (kernel order, float32-exact), or None
    p_refs,  # tuple of [d, d]: (P f32,) or (P_hi, P_lo) bf16, kernel order
    s_refs,  # tuple of [d, m] like p_refs: Sᵀ in kernel order (prod), else ()
    codes_ref,  # [T, b·W] uint32 out (None without a codebook)
    norms_ref,  # [T] norm dtype out
    signs_ref,  # [T, Wm] uint32 out (prod), else None
    rnorms_ref,  # [T] norm dtype out (prod), else None
    *,
    bits: int,
    bounds: tuple[float, ...],
    levels: tuple[float, ...],
    squares: tuple[float, ...],
    norm_correction: bool,
    block_t: int,
    blocks_per_program: int,
    num_tokens: int,
    precision: str,
):
  d = x_ref.shape[-1]
  width = d // LANES
  qjl = signs_ref is not None
  split_x = x_ref.dtype != jnp.bfloat16
  mean = mean_ref[...][None, :] if mean_ref is not None else None
  slot = lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
  first = pl.program_id(0) * (block_t * blocks_per_program)

  def block(i, carry):
    r0 = i * block_t
    rows = first + r0 + lax.broadcasted_iota(jnp.int32, (block_t,), 0)
    row_ok = rows < num_tokens
    x_in = pltriton.load(x_ref.at[pl.ds(r0, block_t), pl.ds(0, d)], mask=row_ok[:, None], other=0)
    xc = x_in.astype(jnp.float32)
    if mean is not None:
      xc = xc - mean
    norm = jnp.sqrt(jnp.sum(xc * xc, axis=1))
    finite = jnp.sum(jnp.where(jnp.isfinite(xc), 0.0, 1.0), axis=1) == 0.0
    inv = 1.0 / jnp.where(finite & (norm > 0), norm, 1.0)  # as the XLA path: x / (‖x‖ or 1)
    # The dots take x itself (exact in bfloat16: no split) and the mean is subtracted after them,
    # rotated; x − mean feeds only the norm and the finiteness check.
    operands = _dot_operands(x_in if precision == "high" and not split_x else x_in.astype(jnp.float32), split_x,
                             precision)
    # Rows quantized as the zero direction: non-finite ones, and with a mean those with
    # ‖x − mean‖ = 0 (x·P − mean·P would be rounding noise there, not 0).
    keep = finite & (norm > 0) if mean is not None else finite

    sq_sum = jnp.zeros((block_t,), jnp.float32)
    r_sum = jnp.zeros((block_t,), jnp.float32)
    residuals = []
    for w in range(width):
      cols = pl.ds(w * LANES, LANES)
      p_tiles = [ref[:, cols] for ref in p_refs]  # [d, 32] each, loaded once per column
      acc = None
      for a, k in operands:
        part = _dot(a, p_tiles[k])
        acc = part if acc is None else acc + part
      if mean is not None:
        acc = acc - mrot_ref[pl.ds(w * LANES, LANES)][None, :]
      y = jnp.where(keep[:, None], acc * inv[:, None], 0.0)  # [BT, 32]: column w, slots 0..31

      if bits:
        code, sq, chat = _quantize_tile(y, bits, bounds, levels, squares, norm_correction, qjl)
        if norm_correction:
          sq_sum = sq_sum + jnp.sum(sq, axis=1)
        for row, word in _pack_tile(code, bits):
          _store_col(codes_ref, r0, block_t, row * width + w, word, row_ok)
      if qjl:
        res = y - chat if bits else y  # r = y − ŷ
        r_sum = r_sum + jnp.sum(res * res, axis=1)
        residuals.append(res)

    scale = jnp.where(finite, norm, jnp.nan)
    if norm_correction:
      scale = scale / jnp.sqrt(sq_sum)
    pltriton.store(norms_ref.at[pl.ds(r0, block_t)], scale.astype(norms_ref.dtype), mask=row_ok)

    if qjl:
      r_ops = [_dot_operands(res, True, precision) for res in residuals]
      for c in range(signs_ref.shape[-1]):
        z = None  # [BT, 32]: S·r for sign column c, slots 0..31
        for w in range(width):
          s_tiles = [ref[pl.ds(w * LANES, LANES), pl.ds(c * LANES, LANES)] for ref in s_refs]
          for a, k in r_ops[w]:
            part = _dot(a, s_tiles[k])
            z = part if z is None else z + part
        bit = jnp.where(z >= 0, jnp.uint32(1), jnp.uint32(0)) << slot.astype(jnp.uint32)
        _store_col(signs_ref, r0, block_t, c, jnp.sum(bit, axis=1, dtype=jnp.uint32, keepdims=True), row_ok)
      pltriton.store(rnorms_ref.at[pl.ds(r0, block_t)], jnp.sqrt(r_sum).astype(rnorms_ref.dtype), mask=row_ok)
    return carry

  if blocks_per_program == 1:
    block(0, 0)
  else:
    lax.fori_loop(0, blocks_per_program, block, 0)


# ----------------------------------------------------------------------------- entry


def supported(tq: Quantizer, dtype=None) -> tuple[bool, str]:
  """(True, "") if the kernel encodes with `tq` (and inputs of `dtype`, if given), else (False, why)."""
  if not isinstance(tq, Quantizer):
    return False, f"expected a tqjax Quantizer, got {type(tq).__name__}"
  cfg = tq.config
  if cfg.dim not in DIMS:
    return False, f"dim={cfg.dim} not in {DIMS}"
  if cfg.mse_bits > MAX_BITS:
    return False, f"bits={cfg.bits} ({cfg.mse_bits} codebook bits); the encode kernel handles 1..{MAX_BITS}"
  m = cfg.sketch_dim
  if cfg.variant == "prod" and (m % LANES or m > MAX_SKETCH):
    return False, f"qjl_dim={m}; the encode kernel needs a multiple of {LANES} up to {MAX_SKETCH}"
  if dtype is not None and jnp.dtype(dtype) not in [jnp.dtype(t) for t in INPUT_DTYPES]:
    return False, f"input dtype {jnp.dtype(dtype)} (the kernel reads float32, bfloat16, float16)"
  return True, ""


def default_block_t(dim: int, tokens: int) -> int:
  """64 tokens per block (128 for d = 32), fewer for short inputs (≥ 16 rows for the dots).

  64 rows fill one warpgroup's wgmma (M = 64) with the default 4 warps. Chosen by ptxas register
  and SASS counts for sm_90a (Triton 3.9, offline): at d = 128, BT = 64 uses ~100-130 registers
  and ~50-60 instructions per coordinate; BT = 32 wastes half of each wgmma (~2x the SASS per
  coordinate); d = 256 at BT = 64 needs ~220 registers (bf16 input) and spills for float32.
  """
  bt = 128 if dim <= 32 else 64
  while bt > 16 and bt // 2 >= tokens:
    bt //= 2
  return bt


@functools.partial(
    jax.jit,
    static_argnames=("block_t", "blocks_per_program", "num_warps", "num_stages", "precision", "interpret",
                     "poison"),
)
def encode(
    tq: Quantizer,
    x: jax.Array,  # [..., T, d] (or [..., d] without a mean) float32 / bfloat16 / float16
    mean: jax.Array | None = None,  # [..., d] float32: subtracted from every token of its group
    *,
    block_t: int | None = None,
    blocks_per_program: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
    precision: str = "high",
    interpret: bool = False,
    poison: bool = False,
) -> Code:
  """`tqjax.quantizer.encode(tq, x)` (with a mean: of x − mean[..., None, :]) in one fused kernel.

  The same `Code` as the XLA path for mse and prod quantizers with ≤ 4 codebook bits and d in
  {32, 64, 128, 256}; a code (or QJL sign) can differ only for a coordinate within dot rounding
  (see `precision`) of a codebook boundary (of zero).
  block_t: tokens per block (power of two ≥ 16); blocks_per_program: blocks one program loops
  over (software-pipelined with num_stages when > 1); poison: outputs start as 0xFFFFFFFF / NaN
  (tests: anything the kernel leaves unwritten shows).
  """
  _check_vectors(tq, x, "x")
  ok, why = supported(tq, x.dtype)
  if not ok:
    raise ValueError(f"the Pallas encode kernel does not support this quantizer: {why}")
  if precision not in PRECISIONS:
    raise ValueError(f"{precision=} must be one of {PRECISIONS}")
  cfg = tq.config
  d, bits, prod = cfg.dim, cfg.mse_bits, cfg.variant == "prod"
  lead = x.shape[:-1]
  if mean is None:
    xg = x.reshape(1, math.prod(lead), d)
  else:
    if x.ndim < 2 or mean.shape != (*x.shape[:-2], d):
      raise ValueError(f"mean must be [..., d] = {(*x.shape[:-2], d)} for x {x.shape}, got {mean.shape}")
    xg = x.reshape(math.prod(x.shape[:-2]), x.shape[-2], d)
    mean = mean.astype(jnp.float32).reshape(xg.shape[0], d)
  groups, tokens = xg.shape[:2]
  words = packing.packed_words(d, bits) if bits else 0
  sign_words = packing.num_columns(cfg.sketch_dim) if prod else 0
  norm_dtype = jnp.dtype(cfg.norm_dtype)

  out_shape = {  # name → (trailing shape, dtype, poison value); codes/signs absent when empty
      "codes": ((words,), jnp.uint32, 0xFFFFFFFF),
      "norms": ((), norm_dtype, jnp.nan),
      "signs": ((sign_words,), jnp.uint32, 0xFFFFFFFF),
      "rnorms": ((), norm_dtype, jnp.nan),
  }
  names = [n for n in out_shape if (n != "codes" or bits) and (n in ("codes", "norms") or prod)]
  if groups * tokens == 0:
    zeros = lambda n: jnp.zeros((*lead, *out_shape[n][0]), out_shape[n][1])
    return Code(zeros("codes"), zeros("norms"), *((zeros("signs"), zeros("rnorms")) if prod else ()))
  if block_t is None:
    block_t = default_block_t(d, tokens)
  if block_t < 16 or block_t & (block_t - 1):
    raise ValueError(f"{block_t=} must be a power of two >= 16")
  if num_warps is None:
    num_warps = 4
  rows = block_t * blocks_per_program
  p_ops = rotation_operands(tq, precision)
  s_ops = sketch_operands(tq, precision) if prod else ()
  bounds, levels, squares = _tables(bits, d) if bits else ((), (), ())

  kernel = functools.partial(
      tq_encode_kernel,
      bits=bits,
      bounds=bounds,
      levels=levels,
      squares=squares,
      norm_correction=cfg.norm_correction,
      block_t=block_t,
      blocks_per_program=blocks_per_program,
      num_tokens=tokens,
      precision=precision,
  )
  has_mean = mean is not None

  def kernel_wrapper(*refs):
    it = iter(refs)
    x_ref = next(it)
    mean_ref = next(it) if has_mean else None
    mrot_ref = next(it) if has_mean else None
    p_refs = tuple(next(it) for _ in p_ops)
    s_refs = tuple(next(it) for _ in s_ops)
    outs = dict(zip(names, list(it)[-len(names):]))
    kernel(x_ref, mean_ref, mrot_ref, p_refs, s_refs, outs.get("codes"), outs["norms"], outs.get("signs"), outs.get("rnorms"))

  # Grid (token blocks, groups): consecutive programs stream consecutive tokens of a group.
  in_specs = [pl.BlockSpec((None, rows, d), lambda i, g: (g, i, 0))]
  args = [xg]
  if has_mean:
    mean_rot = jnp.dot(mean, _rotation_kernel_order(tq), precision=lax.Precision.HIGHEST)
    in_specs += [pl.BlockSpec((None, d), lambda i, g: (g, 0))] * 2
    args += [mean, mean_rot]
  for op in (*p_ops, *s_ops):
    in_specs.append(pl.BlockSpec(op.shape, lambda i, g: (0, 0)))
    args.append(op)
  out_specs, shapes = [], []
  for n in names:
    trail, dtype, _ = out_shape[n]
    if trail:
      out_specs.append(pl.BlockSpec((None, rows, *trail), lambda i, g: (g, i, 0)))
    else:
      out_specs.append(pl.BlockSpec((None, rows), lambda i, g: (g, i)))
    shapes.append(jax.ShapeDtypeStruct((groups, tokens, *trail), dtype))
  aliases = {}
  if poison:  # tests: outputs start as garbage (aliased inputs), so anything left unwritten shows
    aliases = {len(args) + k: k for k in range(len(names))}
    args += [jnp.full(s.shape, out_shape[n][2], s.dtype) for n, s in zip(names, shapes)]
    in_specs += out_specs

  params = dict(num_warps=num_warps)
  if num_stages is not None:
    params["num_stages"] = num_stages
  outs = pl.pallas_call(
      kernel_wrapper,
      grid=(pl.cdiv(tokens, rows), groups),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=shapes,
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(**params),
      interpret=interpret,
      name=f"tq_encode_{cfg.variant}_b{cfg.bits}_d{d}{'_nc' if cfg.norm_correction else ''}{'_mean' if has_mean else ''}",
  )(*args)
  got = {n: o.reshape(*lead, *out_shape[n][0]) for n, o in zip(names, outs)}
  if not bits:
    got["codes"] = jnp.zeros((*lead, 0), jnp.uint32)
  return Code(got["codes"], got["norms"], got.get("signs"), got.get("rnorms"))


def encode_reference(tq: Quantizer, x: jax.Array, mean: jax.Array | None = None) -> Code:
  """Plain-jnp reference of `encode`: the XLA encode of x (− mean over the token axis)."""
  from tqjax.quantizer import encode as xla_encode  # noqa: PLC0415

  if mean is not None:
    x = x.astype(jnp.float32) - mean.astype(jnp.float32)[..., None, :]
  return xla_encode(tq, x)
