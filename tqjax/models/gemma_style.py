"""A tiny Gemma-style causal language model over `tqjax.nn.TurboQuantAttention`, for experiments.

Owns `GemmaStyleDecoder` (scaled tied embeddings, pre-RMSNorm blocks of RoPE GQA attention and a
GeGLU MLP, a final RMSNorm), its parts `GatedMLP` and `DecoderBlock`, and a greedy `generate`
that runs prefill and a `lax.scan` of decode steps under one jit (compiled once per shape and
configuration). Its weights are random unless set: it exercises the caches in a model's loop; it
is not a language model.

Shapes: B batch, T tokens, S cache slots, V vocabulary, D model width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tqjax.cache import CacheConfig
from tqjax.dense_cache import DenseCacheConfig
from tqjax.nn import RMSNorm, TurboQuantAttention

__all__ = ["GatedMLP", "DecoderBlock", "GemmaStyleDecoder"]

_HIGHEST = jax.lax.Precision.HIGHEST


class GatedMLP(nnx.Module):
  """down(gelu(gate(x)) · up(x)) (Gemma's GeGLU): x [..., D] → [..., D] through a hidden width."""

  def __init__(self, dim: int, hidden: int, *, dtype, precision, rngs: nnx.Rngs):
    lin = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                            precision=precision, rngs=rngs)
    self.gate, self.up, self.down = lin(dim, hidden), lin(dim, hidden), lin(hidden, dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
  """x + attn(norm(x)), then + mlp(norm(·)): x [B, T, D] → [B, T, D] (attention as TurboQuantAttention)."""

  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, mlp_dim, *, cache_config, rope_base,
               sliding_window, soft_cap, dtype, precision, implementation, rngs):
    self.attn_norm = RMSNorm(embed_dim)
    self.attn = TurboQuantAttention(
        embed_dim, num_heads, num_kv_heads, head_dim, cache_config=cache_config, rope_base=rope_base, causal=True,
        sliding_window=sliding_window, soft_cap=soft_cap, dtype=dtype, precision=precision,
        implementation=implementation, rngs=rngs)
    self.mlp_norm = RMSNorm(embed_dim)
    self.mlp = GatedMLP(embed_dim, mlp_dim, dtype=dtype, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array, *, mode: str, lengths: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), mode=mode, lengths=lengths)
    return x + self.mlp(self.mlp_norm(x))


class GemmaStyleDecoder(nnx.Module):
  """A tiny Gemma-style causal LM: scaled tied embeddings, pre-RMSNorm blocks of RoPE GQA
  attention (TurboQuantAttention) and a GeGLU MLP, a final RMSNorm, logits = x · Eᵀ.

  `init_cache(B, S)`, then `prefill(tokens, lengths)` → next-token logits [B, V] and
  `decode_step(token)` → [B, V]; `generate(prompt, steps)` runs both under one jit with a
  `lax.scan` over the nnx.split cache state (compiled once per shape).
  """

  def __init__(
      self,
      vocab: int,
      num_layers: int = 4,
      embed_dim: int = 256,
      num_heads: int = 8,
      num_kv_heads: int = 2,
      head_dim: int = 64,
      cache_config: CacheConfig | DenseCacheConfig | None = None,
      *,
      mlp_dim: int | None = None,
      rope_base: float = 10000.0,
      sliding_window: int | None = None,
      soft_cap: float | None = None,
      final_logit_soft_cap: float | None = None,
      embed_init_std: float = 0.02,
      dtype=jnp.float32,
      precision=None,
      implementation: str | None = None,
      rngs: nnx.Rngs,
  ):
    """cache_config: the caches' (as in TurboQuantAttention; None: dense in `dtype`).
    embed_init_std: the embedding table's init std. With Gemma's √embed_dim input scaling and
    tied output, a large std makes a random model predict its input token; 0.02 leaves the
    next-token choice to the attention/MLP stack, so random-weight generations depend on context.
    """
    self.vocab, self.embed_dim = vocab, embed_dim
    self.final_logit_soft_cap = final_logit_soft_cap
    self.dtype = dtype
    self.precision = precision
    self.embedder = nnx.Embed(vocab, embed_dim, param_dtype=jnp.float32, dtype=dtype,
                              embedding_init=nnx.initializers.normal(embed_init_std), rngs=rngs)
    self.layers = nnx.List([
        DecoderBlock(embed_dim, num_heads, num_kv_heads, head_dim, mlp_dim or 4 * embed_dim,
                     cache_config=cache_config, rope_base=rope_base, sliding_window=sliding_window,
                     soft_cap=soft_cap, dtype=dtype, precision=precision, implementation=implementation, rngs=rngs)
        for _ in range(num_layers)
    ])
    self.final_norm = RMSNorm(embed_dim)

  def init_cache(self, batch_size: int, capacity: int) -> None:
    """Empty caches in every layer for batch_size sequences of up to capacity tokens."""
    for layer in self.layers:
      layer.attn.init_cache(batch_size, capacity)

  @property
  def cache_capacity(self) -> int | None:
    """Slots S of the caches (None before init_cache)."""
    c = self.layers[0].attn.cache
    return None if c is None else c.capacity

  def nbytes(self) -> int:
    """Resident cache bytes of all layers."""
    return sum(layer.attn.nbytes() for layer in self.layers)

  def _logits(self, x):
    """x [B, T, D] → logits [B, T, V] float32 (final norm, tied embeddings, optional soft cap)."""
    x = self.final_norm(x)
    logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32),
                        self.embedder.embedding.get_value().astype(jnp.float32), precision=_HIGHEST)
    if self.final_logit_soft_cap is not None:
      c = jnp.float32(self.final_logit_soft_cap)
      logits = c * jnp.tanh(logits / c)
    return logits

  def __call__(self, tokens: jax.Array, *, mode: str = "prefill", lengths=None) -> jax.Array:
    """tokens [B, T] int → logits [B, T, V] float32 (prefill writes the caches if initialized)."""
    x = self.embedder(tokens) * jnp.asarray(math.sqrt(self.embed_dim), self.dtype)
    for layer in self.layers:
      x = layer(x, mode=mode, lengths=lengths)
    return self._logits(x)

  def prefill(self, tokens: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Caches the prompt tokens [B, T] (lengths [B] real tokens) → next-token logits [B, V]."""
    if self.cache_capacity is None:
      raise ValueError("prefill before init_cache: call init_cache(batch_size, capacity) first")
    logits = self(tokens, mode="prefill", lengths=lengths)
    last = (jnp.full((tokens.shape[0],), tokens.shape[1]) if lengths is None else jnp.asarray(lengths)) - 1
    return jnp.take_along_axis(logits, last.astype(jnp.int32)[:, None, None], axis=1)[:, 0]

  def decode_step(self, token: jax.Array) -> jax.Array:
    """Appends token [B] to every sequence → next-token logits [B, V]."""
    return self(token[:, None], mode="decode")[:, 0]

  def generate(self, prompt: jax.Array, steps: int, lengths: jax.Array | None = None, *,
               forced_tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy generation of `steps` tokens after prompt [B, T] → (tokens [B, steps], logits [B, steps, V]).

    logits[:, i] predicts generated token i; tokens[:, i] is its argmax. forced_tokens
    [B, steps] (teacher forcing): feed forced_tokens[:, i] instead of tokens[:, i] as the next
    input, so two models can be compared on the same trajectory. Reuses the cache when it fits
    (batch, T + steps − 1 slots), else (re)allocates one; one compilation per shapes/config.
    """
    b, t = prompt.shape
    if steps < 1:
      raise ValueError(f"steps must be >= 1, got {steps=}")
    need = t + steps - 1
    cache = self.layers[0].attn.cache
    if cache is None or cache.batch_size != b or cache.capacity < need:
      self.init_cache(b, need)
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    if forced_tokens is not None and forced_tokens.shape != (b, steps):
      raise ValueError(f"forced_tokens must be [{b}, {steps}], got {forced_tokens.shape}")
    return _generate(self, prompt, lengths, forced_tokens, steps)


@functools.partial(nnx.jit, static_argnames=("steps",))
def _generate(model: GemmaStyleDecoder, prompt, lengths, forced, steps: int):
  """prompt [B, T], lengths [B], forced [B, steps] or None → (tokens [B, steps], logits [B, steps, V])."""
  logits0 = model.prefill(prompt, lengths)
  tok0 = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
  graphdef, cache_state, rest = nnx.split(model, nnx.Cache, ...)

  def body(carry, forced_prev):
    cache_state, prev = carry
    m = nnx.merge(graphdef, cache_state, rest)
    logits = m.decode_step(prev if forced_prev is None else forced_prev)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (nnx.state(m, nnx.Cache), tok), (tok, logits)

  xs = None if forced is None else forced[:, :-1].T.astype(jnp.int32)  # [steps − 1, B]
  (cache_state, _), (toks, logits) = jax.lax.scan(body, (cache_state, tok0), xs, length=steps - 1)
  nnx.update(model, cache_state)
  tokens = jnp.concatenate([tok0[:, None], toks.T], axis=1)
  logits = jnp.concatenate([logits0[:, None], jnp.moveaxis(logits, 0, 1)], axis=1)
  return tokens, logits
