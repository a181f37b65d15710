"""Fused encode on Hopper GPUs (Pallas Mosaic GPU): rotate + quantize + pack, mse quantizers.

The same contract as `encode_gpu.encode` (and `tqjax.cache.encode_tokens`: x − a per-group mean)
for mse quantizers, bfloat16 inputs, d ∈ {64, 128} and token counts per group that are multiples
of 64; `encode_gpu` (Triton) does everything else. On an H200 (2026-11-28, K, V bf16
[8, 8, 32768, 128], 10 calls back to back) one tensor's encode took 530-600 µs, and a prefill
K3/V3 1271-1293 µs = 1.83-1.91x a bf16 read + write of K and V (K4/V4: 2.14-2.21x;
experiments/bench_encode.py).
It is faster than the Triton encode because the structure Triton cannot express is explicit here:

* Persistent CTAs: each holds Π (float16) and the packing matrices in shared memory for its
  whole life and runs `wgs` warpgroups, each streaming its own contiguous range of 64-token
  blocks through a TMA pipeline (`stages` blocks in flight).
* x (− the group mean) is loaded from shared memory into registers in the wgmma layout; its norm
  and finiteness come from there, in float32. Each row is scaled by a power of two
  (`numerics.float16_row_scales`) into float16 and y = x·Πᵀ is one float16 wgmma with x from registers
  [64, d] (natural coordinate order), scaled back with the inverse norm. Π's float16 rounding
  (2^-11 relative, as tf32) moves y by ~2e-4/√d rms for a unit x: a coordinate that close to a
  codebook boundary may take the neighbouring level, as with the XLA path's own tf32-class dot.
* Quantize in registers (`quantize_fields`): the symmetric-codebook count of `encode_gpu`
  (|y| nudged one float up when y ≤ 0, float 0/1 steps), the code as a float, its parts' fields.
* Pack on the tensor cores: each field (an integer < 2^p, exact in bf16) times a matrix of
  powers of two (`pack_matrices`, exact in bf16) gives, per packed word, its low and its high 16
  bits as exact integers in float32 (sums of disjoint bits below 2^16); two wgmmas per part.
  Any coordinate order packs the same way, so no kernel-order permutation is needed.
* The norm correction (if the quantizer has it) comes from per-element Σĉ² steps, as in
  `encode_gpu`; rows that are not
  kept (non-finite; with a mean, ‖x − mean‖ = 0) quantize y · NaN, which fails every compare and
  gives the zero direction's codes. Codes leave as [T, 16·⌈b·W/16⌉] words (the padding is sliced
  off in XLA, fused into the cache write) and norms as float32.

Letters: G groups (leading dims sharing a mean), T tokens per group, d dim, W = d/32, b bits,
BT = 64 tokens per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.encode_gpu import codebook_tables, group_tokens, nudged_magnitude
from pallas_kernels.encode_gpu import encode_reference as encode_gpu_reference  # the same contract
from pallas_kernels.numerics import float16_row_scales
from tqjax import packing
from tqjax.quantizer import Code, Quantizer, _check_vectors
from tqjax.rotation import dense_matrix

__all__ = ["BT", "DIMS", "MAX_BITS", "encode", "encode_reference", "pack_matrices", "quantize_fields",
           "supported"]

BT = 64  # tokens per block: one warpgroup's wgmma M
DIMS = (64, 128)  # d = 256 needs 256 KB for Π's two parts: more than an SM's shared memory
MAX_BITS = 4


def supported(tq: Quantizer, dtype=None, tokens: int | None = None) -> tuple[bool, str]:
  """(True, "") if this kernel encodes with `tq` (inputs of `dtype`, `tokens` per group), else (False, why)."""
  if not isinstance(tq, Quantizer):
    return False, f"expected a tqjax Quantizer, got {type(tq).__name__}"
  cfg = tq.config
  if cfg.variant != "mse":
    return False, f"variant={cfg.variant!r} (the Mosaic GPU encode does mse quantizers)"
  if cfg.dim not in DIMS:
    return False, f"dim={cfg.dim} not in {DIMS}"
  if cfg.bits > MAX_BITS:
    return False, f"bits={cfg.bits} > {MAX_BITS}"
  if dtype is not None and jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
    return False, f"input dtype {jnp.dtype(dtype)} (the Mosaic GPU encode reads bfloat16)"
  if tokens is not None and tokens % BT:
    return False, f"{tokens} tokens per group is not a multiple of {BT}"
  return True, ""


def pack_matrices(bits: int, d: int) -> np.ndarray:
  """M [parts, 2, d, N] float32 (N = 16·⌈b·W/16⌉): Σ_i field_k(i) · M[k, h, i, j] over the
  coordinates i is bits 16h .. 16h + 15 of packed word j (`tqjax.packing` layout), for fields
  field_k = (code >> offset_k) & (2^p_k − 1) of the parts (p_k, offset_k) of a b-bit code."""
  w = d // packing.WORD_BITS
  n_out = 16 * -(-packing.packed_words(d, bits) // 16)
  parts = packing.parts(bits)
  m = np.zeros((len(parts), 2, d, n_out), np.float32)
  for k, (p, _, row0) in enumerate(parts):
    per_word = packing.WORD_BITS // p
    for i in range(d):
      s, col = i // w, i % w
      bit = (s % per_word) * p
      m[k, bit // 16, i, (row0 + s // per_word) * w + col] = 2.0 ** (bit % 16)
  return m


def quantize_fields(y, bits: int, bounds, squares, sq):
  """Fields [parts] of the codes of y [BT, d] float32 (`searchsorted(boundaries, y, side="left")`,
  as floats, per `packing.parts(bits)`) and sq + (ĉ² − c_h²) elementwise (None if sq is None, no
  norm correction). NaN quantizes like 0."""
  h = 2 ** (bits - 1)
  pos = y > 0
  _, mag = nudged_magnitude(y)
  m = jnp.zeros_like(y)
  for j, bound in enumerate(bounds):
    step = (mag > bound).astype(jnp.float32)
    m = m + step
    if sq is not None:
      sq = sq + step * (squares[j + 1] - squares[j])
  code = jnp.where(pos, h + m, (h - 1) - m)
  if len(packing.parts(bits)) == 1:
    return [code], sq
  assert bits == 3  # parts (2, 1): the low two bits, and the top bit (y > 0)
  posf = pos.astype(jnp.float32)
  return [code - h * posf, posf], sq


def _sm_count() -> int:
  """SMs of the device compiled for: the abstract mesh's device (lowering without a GPU), else device 0."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.num_cores if device is not None and device.num_cores else jax.devices()[0].core_count


def _swizzled(minor_elems: int):
  """SMEM transforms for a 16-bit wgmma operand: the widest swizzle its rows allow."""
  swizzle = plgpu.find_swizzle(minor_elems * 16)
  return (plgpu.TilingTransform((8, swizzle * 8 // 16)), plgpu.SwizzleTransform(swizzle))


@functools.partial(jax.jit, static_argnames=("ctas", "wgs", "stages"))
def encode(
    tq: Quantizer,
    x: jax.Array,  # [..., T, d] bfloat16 (or [..., d] without a mean)
    mean: jax.Array | None = None,  # [..., d] float32: subtracted from every token of its group
    *,
    ctas: int | None = None,
    wgs: int = 3,
    stages: int = 2,
) -> Code:
  """`encode_gpu.encode(tq, x, mean)` for what `supported` accepts (raises ValueError otherwise).

  ctas: persistent CTAs (default: the device's SM count); wgs: warpgroups per CTA, each with its
  own pipeline of `stages` blocks; the CTAs' warpgroups split the blocks into contiguous ranges.
  3 warpgroups (173 KB of shared memory at d = 128) encoded 6-13 % faster than 2 on an H200
  (2026-11-28, 10 calls back to back).
  """
  _check_vectors(tq, x, "x")
  cfg = tq.config
  d, bits = cfg.dim, cfg.bits
  centred = mean is not None
  xg, mean = group_tokens(x, mean)
  groups, tokens = xg.shape[:2]
  ok, why = supported(tq, x.dtype, tokens)
  if not ok:
    raise ValueError(f"the Mosaic GPU encode kernel does not support this input: {why}")
  nw = packing.packed_words(d, bits)
  lead = x.shape[:-1]
  if groups * tokens == 0:
    return Code(jnp.zeros((*lead, nw), jnp.uint32), jnp.zeros(lead, cfg.norm_dtype), config=cfg)
  nblocks = groups * tokens // BT
  ctas = ctas or _sm_count()
  workers = ctas * wgs
  bounds, _, squares = codebook_tables(bits, d)
  p16 = dense_matrix(tq.rotation).T.astype(jnp.float16)  # y = x @ Πᵀ: entries ≤ 1, 2^-11 relative
  mats = jnp.asarray(pack_matrices(bits, d), jnp.bfloat16)  # powers of two: exact
  nparts, n_out = mats.shape[0], mats.shape[-1]
  correct = cfg.norm_correction
  if mean is None:
    mean = jnp.zeros((1, d), jnp.float32)

  def kernel(x_gmem, p_gmem, m_gmem, mean_gmem, codes_gmem, norms_gmem,
             p_smem, m_smem, const_bar, x_smem, out_smem, nrm_smem, x_bar, c_smem, c_bar):
    wg = lax.axis_index("wg")
    worker = lax.axis_index("cta") * wgs + wg
    first = worker * nblocks // workers
    steps = (worker + 1) * nblocks // workers - first

    @pl.when(wg == 0)
    def _():
      plgpu.copy_gmem_to_smem(p_gmem, p_smem, const_bar.at[0])
      for k in range(nparts):
        for half in range(2):
          plgpu.copy_gmem_to_smem(m_gmem.at[k, half], m_smem.at[k, half], const_bar.at[1 + 2 * k + half])

    def fetch(i, slot):
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds((first + i) * BT, BT)], x_smem.at[wg, slot],
                              x_bar.at[wg * stages + slot])
      if centred:  # the block's group mean
        group = (first + i) * BT // tokens
        plgpu.copy_gmem_to_smem(mean_gmem.at[group], c_smem.at[wg, slot], c_bar.at[wg * stages + slot])

    for i in range(stages):
      pl.when(i < steps)(functools.partial(fetch, i, i))
    for b in range(1 + 2 * nparts):
      plgpu.barrier_wait(const_bar.at[b])

    def step(i, carry):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(x_bar.at[wg * stages + slot])
      xc = plgpu.load(x_smem.at[wg, slot], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      if centred:
        plgpu.barrier_wait(c_bar.at[wg * stages + slot])
        mu = plgpu.load(c_smem.at[wg, slot], layout=plgpu.Layout.WGMMA.reduce(0))
        xc = xc - lax.broadcast_in_dim(mu, (BT, d), [1])
      amax = jnp.max(jnp.abs(xc), axis=1)
      norm2 = jnp.sum(xc * xc, axis=1)
      finite = (amax < jnp.inf) & (norm2 == norm2)
      norm = jnp.sqrt(norm2)
      keep = finite & (norm > 0) if centred else finite
      up, down = float16_row_scales(amax)
      row = lambda v: lax.broadcast_in_dim(v, (BT, d), [0])

      def rotate(acc_ref):
        plgpu.wgmma(acc_ref, (xc * row(up)).astype(jnp.float16), p_smem)
        return acc_ref[...]

      acc = pl.run_scoped(rotate, plgpu.ACC((BT, d), jnp.float32))
      inv = jnp.where(keep, down / jnp.where(norm > 0, norm, 1.0), jnp.nan)
      y = acc * row(inv)
      fields, sq = quantize_fields(y, bits, bounds, squares, jnp.full_like(y, squares[0]) if correct else None)
      fields = [f.astype(jnp.bfloat16) for f in fields]

      def pack(half):
        def run(acc_ref):
          for k in range(nparts):
            plgpu.wgmma(acc_ref, fields[k], m_smem.at[k, half])
          return acc_ref[...]
        return pl.run_scoped(run, plgpu.ACC((BT, n_out), jnp.float32))

      lo, hi = pack(0), pack(1)  # every warp has read x's slot (the wgmmas are collective): refill it
      pl.when(i + stages < steps)(functools.partial(fetch, i + stages, slot))
      words = lo.astype(jnp.uint32) | (hi.astype(jnp.uint32) << 16)
      scale = jnp.where(finite, norm, jnp.nan)
      if correct:
        scale = scale / jnp.sqrt(jnp.sum(sq, axis=1))
      out = lax.rem(i, 2)
      plgpu.wait_smem_to_gmem(2, wait_read_only=True)  # this slot's copies of step i − 2 are done
      out_smem[wg, out] = words
      nrm_smem[wg, out] = scale
      plgpu.commit_smem()
      rows = pl.ds((first + i) * BT, BT)
      plgpu.copy_smem_to_gmem(out_smem.at[wg, out], codes_gmem.at[rows])
      plgpu.copy_smem_to_gmem(nrm_smem.at[wg, out], norms_gmem.at[rows])
      return carry

    lax.fori_loop(0, steps, step, 0)
    plgpu.wait_smem_to_gmem(0)

  n = groups * tokens
  run = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((n, n_out), jnp.uint32), jax.ShapeDtypeStruct((n,), jnp.float32)),
      grid=(ctas,),
      grid_names=("cta",),
      num_threads=wgs,
      thread_name="wg",
      scratch_types=[
          plgpu.SMEM((d, d), jnp.float16, transforms=_swizzled(d)),
          plgpu.SMEM((nparts, 2, d, n_out), jnp.bfloat16, transforms=_swizzled(n_out)),
          plgpu.Barrier(num_barriers=1 + 2 * nparts),
          plgpu.SMEM((wgs, stages, BT, d), jnp.bfloat16, transforms=_swizzled(d)),
          plgpu.SMEM((wgs, 2, BT, n_out), jnp.uint32),
          plgpu.SMEM((wgs, 2, BT), jnp.float32),
          plgpu.Barrier(num_barriers=wgs * stages),
          plgpu.SMEM((wgs, stages, d), jnp.float32),
          plgpu.Barrier(num_barriers=wgs * stages),
      ],
  )
  codes, norms = run(xg.reshape(n, d), p16, mats, mean)
  return Code(codes[:, :nw].reshape(*lead, nw), norms.astype(cfg.norm_dtype).reshape(lead), config=cfg)


def encode_reference(tq: Quantizer, x: jax.Array, mean: jax.Array | None = None) -> Code:
  """Plain-jnp reference of `encode` (x [..., T, d], mean [..., d] or None → Code): the XLA encode
  of x − mean, as `encode_gpu.encode_reference`."""
  return encode_gpu_reference(tq, x, mean)
