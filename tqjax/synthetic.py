"""Synthetic q, k, v that look like a decoder LLM's attention inputs, for quantizer stress tests.

Real encoder activations (MiniLM, see `tqjax.data`) has well-behaved keys; decoder LLMs do not.
Their keys have a few fixed channels per head that are 10–100x larger than the rest, a shared
per-head mean direction, and queries aligned with those keys so attention is peaky. Values are
close to Gaussian. This module draws arrays with those properties, deterministic in a PRNG key.
"""

from __future__ import annotations

__all__ = ["decoder_like_kv"]

import functools

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(
    jax.jit,
    static_argnames=("batch", "heads", "tokens", "head_dim", "n_outlier_channels"),
)
def decoder_like_kv(
    key: jax.Array,
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    n_outlier_channels: int = 4,
    outlier_scale: float = 20.0,
    *,
    key_mean_share: float = 0.3,
    value_mean_share: float = 0.1,
    token_scale_sigma: float = 0.25,
    query_noise: float = 1.0,
    logit_std: float = 3.0,
):
  """Draws (q, k, v), each float32 [batch, heads, tokens, head_dim].

  What it models, per head h (every head draws its own constants):
  * keys: k_t = a_t · (μ_h + z_t) ⊙ c_h with z_t ~ N(0, I).
    - μ_h is a fixed mean direction shared by all tokens of the head, N(0, m) per coordinate
      with m/(m+1) = `key_mean_share`: on the ordinary channels the mean carries that share of
      the energy (real MiniLM keys: 0.18–0.37).
    - c_h is 1 except on `n_outlier_channels` fixed channels (drawn per head), where it is
      `outlier_scale` and μ_h is ±2: those channels are ~outlier_scale times larger than the
      rest and keep one sign for ~98% of tokens, as in decoder-LLM keys. With the defaults
      they hold most of the key energy, so the pooled mean share comes out well above
      `key_mean_share`.
    - a_t = exp(token_scale_sigma · N(0,1)) spreads token norms (CV ≈ 0.25 by default; real
      keys have 0.27–0.37), which matters for per-token vs per-channel quantizers.
  * queries: q_t = λ_h · (k_{j(t)} + query_noise · σ ⊙ ε_t), ε_t ~ N(0, I), j(t) a uniformly random
    key of the same head and sequence, σ the per-channel std of that head's keys. λ_h is set so
    that the logits q·k/√head_dim, per query across keys, have RMS std `logit_std` over the
    head's queries: attention is peaky (each query favours its source key and keys aligned with
    it, and the outlier channels dominate the logits as they do in decoder LLMs).
  * values: v_t = ν_h + z'_t with z' ~ N(0, I) and |ν_h|² giving `value_mean_share` of the energy;
    no outliers, no token-scale spread.

  key: a jax PRNG key. Set n_outlier_channels=0 (or outlier_scale=1) for keys without outliers.
  """
  if not 0 <= n_outlier_channels <= head_dim:
    raise ValueError(f"{n_outlier_channels=} must be in [0, {head_dim=}]")
  shape = (batch, heads, tokens, head_dim)
  k_mu, k_out, k_z, k_a, k_j, k_eps, k_nu, k_zv = jax.random.split(key, 8)

  # Per-coordinate mean variance m so that m / (m + 1) = share.
  def mean_dir(rng, share):
    std = jnp.sqrt(share / (1.0 - share))
    return std * jax.random.normal(rng, (1, heads, 1, head_dim), jnp.float32)

  # Outlier channels: the first n of an independent random permutation per head.
  perms = jax.vmap(lambda r: jax.random.permutation(r, head_dim))(jax.random.split(k_out, heads))
  is_outlier = jnp.zeros((heads, head_dim), bool)
  is_outlier = jax.vmap(lambda row, p: row.at[p[:n_outlier_channels]].set(True))(is_outlier, perms)
  chan = jnp.where(is_outlier, jnp.asarray(outlier_scale, jnp.float32), 1.0)[None, :, None, :]

  mu = mean_dir(k_mu, key_mean_share)
  # Outlier channels get a mean of ±2 (random sign) in units of their noise, so they keep one
  # sign for ~98% of tokens instead of inheriting a random, possibly tiny, mean.
  mu = jnp.where(is_outlier[None, :, None, :], 2.0 * jnp.sign(mu), mu)
  a = jnp.exp(token_scale_sigma * jax.random.normal(k_a, (batch, heads, tokens, 1), jnp.float32))
  k = a * (mu + jax.random.normal(k_z, shape, jnp.float32)) * chan

  src = jax.random.randint(k_j, (batch, heads, tokens), 0, tokens)
  k_src = jnp.take_along_axis(k, src[..., None], axis=-2)
  sigma = jnp.std(k, axis=(0, 2), keepdims=True)
  q_raw = k_src + query_noise * sigma * jax.random.normal(k_eps, shape, jnp.float32)

  # Var over keys s of q·k_s is qᵀΣq with Σ the keys' covariance in that (batch, head): exact,
  # and O(T·D²) instead of materializing the T×T logits.
  kc = k - jnp.mean(k, axis=-2, keepdims=True)
  cov = jnp.einsum("bhsd,bhse->bhde", kc, kc, precision=_HIGHEST) / tokens
  var = jnp.einsum("bhtd,bhde,bhte->bht", q_raw, cov, q_raw, precision=_HIGHEST) / head_dim
  rms_std = jnp.sqrt(jnp.mean(var, axis=(0, 2)))[None, :, None, None]  # [1, H, 1, 1]
  q = q_raw * (logit_std / rms_std)

  v = mean_dir(k_nu, value_mean_share) + jax.random.normal(k_zv, shape, jnp.float32)
  return q, k, v
