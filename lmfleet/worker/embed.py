"""An embedding worker's side of `POST /worker/embed`: inputs to token ids, the one fit check, shorter vectors.

Owns: tokenizing text inputs (as documents: the model's special tokens added), checking every input fits the model
(non-empty, ids inside the vocabulary, at most the model's context: longer is a 400 context_length_exceeded, never
a silent truncation), checking `dimensions` against what the model allows (its `matryoshka_dimensions`), and
cutting vectors to `dimensions` and L2-normalizing them again. Does not own: batching (lmfleet.engine.pooling),
pooling (the engine), HTTP (worker/app.py).
"""

from __future__ import annotations

import math

from lmfleet import errors
from lmfleet.engine.base import EmbeddingEngine, Tokenizer
from lmfleet.protocol.worker import EmbedRequest


def token_ids(req: EmbedRequest, tokenizer: Tokenizer, engine: EmbeddingEngine, vocab_size: int) -> list[list[int]]:
    """Each input's token ids, checked to fit the model."""
    seqs: list[list[int]] = []
    for i, item in enumerate(req.input):
        if isinstance(item, str):
            if not item:
                raise errors.InvalidRequest(f"input {i} is an empty string", param="input")
            seq = tokenizer.encode(item, add_special_tokens=True)
        else:
            seq = list(item)
            if not seq:
                raise errors.InvalidRequest(f"input {i} is an empty list of token ids", param="input")
            if max(seq) >= vocab_size:
                raise errors.InvalidRequest(f"token ids must be in [0, {vocab_size})", param="input")
        if len(seq) > engine.max_model_len:
            raise errors.ContextLengthExceeded(
                f"This model's maximum context length is {engine.max_model_len} tokens, however input {i} has "
                f"{len(seq)} tokens. Please reduce the length of the input.",
                param="input",
            )
        seqs.append(seq)
    return seqs


def check_dimensions(dimensions: int | None, engine: EmbeddingEngine) -> None:
    """A 400 naming `dimensions` unless the model allows vectors of that length."""
    if dimensions is None or dimensions == engine.dimensions:
        return
    allowed = engine.matryoshka_dimensions
    if allowed is None:
        raise errors.InvalidRequest(
            f"this model returns {engine.dimensions}-dimensional vectors and was not trained for shorter ones "
            "(Matryoshka); omit dimensions",
            param="dimensions",
        )
    if dimensions > engine.dimensions or (allowed and dimensions not in allowed):
        choices = ", ".join(map(str, allowed)) if allowed else f"1 to {engine.dimensions}"
        raise errors.InvalidRequest(f"dimensions must be one of {choices}", param="dimensions")


def shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """The first `dimensions` values of each vector, L2-normalized again (as OpenAI's shortened embeddings)."""
    if dimensions is None or all(len(v) <= dimensions for v in vectors):
        return vectors
    out = []
    for vector in vectors:
        head = vector[:dimensions]
        norm = math.sqrt(math.fsum(x * x for x in head)) or 1.0
        out.append([x / norm for x in head])
    return out
