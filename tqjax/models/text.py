"""Real English text for perplexity: Python's own reference documentation, shipped with CPython.

Owns `corpus()`: the text of every topic in the standard library's `pydoc_data.topics` (the
language and library reference pages that `help()` shows, ~465K characters; technical English
prose with grammar rules and short code examples), in sorted topic order. It is installed with
every Python, so perplexity runs need no download; it is human-written, never generated.
"""

from __future__ import annotations

__all__ = ["corpus", "corpus_tokens"]


def corpus() -> str:
  """All `pydoc_data.topics` pages, sorted by topic name, separated by blank lines."""
  from pydoc_data.topics import topics

  return "\n\n".join(topics[k].strip() for k in sorted(topics))


def corpus_tokens(tokenizer, n: int, *, bos: int | None = None) -> list[int]:
  """The first n token ids of `corpus()` (after `bos` when given); ValueError if it is shorter."""
  ids = ([bos] if bos is not None else []) + tokenizer.encode(corpus()).ids
  if len(ids) < n:
    raise ValueError(f"{n=} exceeds the corpus length of {len(ids)} tokens")
  return ids[:n]
