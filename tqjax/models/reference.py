"""Plain-NumPy float32 forward of a GGUF decoder: the reference every JAX path is checked against.

Owns `forward(cfg, w, tokens) -> logits`: one sequence, full causal attention over the whole
prompt at once (no cache), written directly from the model definitions (llama: pre-norm blocks,
SiLU-gated MLP; Gemma 3: pre- and post-norms, QK-norm, GELU-tanh MLP, sliding-window local
layers with their own RoPE base, √width embedding scale). Shares no code with `decoder.py`.
"""

from __future__ import annotations

import numpy as np

from tqjax.models.gguf import DecoderConfig, Weights

__all__ = ["forward"]


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w


def _rope(x, base):
  """x [heads, T, H] at positions 0..T-1, rotate-half convention."""
  h = x.shape[-1]
  inv = 1.0 / (base ** (np.arange(0, h, 2, dtype=np.float64) / h))
  ang = np.arange(x.shape[1], dtype=np.float64)[:, None] * inv[None, :]
  cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)
  sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)
  rot = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1)
  return x * cos + rot * sin


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x**3)))


def forward(cfg: DecoderConfig, w: Weights, tokens, positions=None) -> np.ndarray:
  """tokens [T] int → next-token logits [T, V] float32 (only at `positions` [P] when given)."""
  tokens = np.asarray(tokens)
  t = tokens.shape[0]
  x = w.embed[tokens] * np.float32(cfg.embed_scale)
  n, kh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  pos = np.arange(t)
  for i, lw in enumerate(w.layers):
    a = _rms(x, lw.attn_norm, cfg.norm_eps)
    q = (a @ lw.q.T).reshape(t, n, h).transpose(1, 0, 2)
    k = (a @ lw.k.T).reshape(t, kh, h).transpose(1, 0, 2)
    v = (a @ lw.v.T).reshape(t, kh, h).transpose(1, 0, 2)
    if cfg.qk_norm:
      q, k = _rms(q, lw.q_norm, cfg.norm_eps), _rms(k, lw.k_norm, cfg.norm_eps)
    base = cfg.rope_base_local if cfg.is_local(i) else cfg.rope_base
    q, k = _rope(q, base), _rope(k, base)
    k, v = np.repeat(k, n // kh, axis=0), np.repeat(v, n // kh, axis=0)
    s = q @ k.transpose(0, 2, 1) * np.float32(cfg.scale)
    if cfg.attn_soft_cap:
      s = cfg.attn_soft_cap * np.tanh(s / cfg.attn_soft_cap)
    allowed = pos[None, :] <= pos[:, None]
    if cfg.is_local(i):
      allowed &= pos[:, None] - pos[None, :] < cfg.sliding_window
    s = np.where(allowed[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(1, 0, 2).reshape(t, n * h) @ lw.o.T
    if cfg.post_norms:
      o = _rms(o, lw.post_attn_norm, cfg.norm_eps)
    x = x + o
    f = _rms(x, lw.ffn_norm, cfg.norm_eps)
    g = f @ lw.gate.T
    act = g / (1.0 + np.exp(-g)) if cfg.activation == "silu" else _gelu_tanh(g)
    f = (act * (f @ lw.up.T)) @ lw.down.T
    if cfg.post_norms:
      f = _rms(f, lw.post_ffn_norm, cfg.norm_eps)
    x = x + f
  if positions is not None:
    x = x[np.asarray(positions)]
  logits = _rms(x, w.final_norm, cfg.norm_eps) @ w.embed.T
  if cfg.final_soft_cap:
    logits = cfg.final_soft_cap * np.tanh(logits / cfg.final_soft_cap)
  return logits.astype(np.float32)
