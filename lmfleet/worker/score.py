"""A worker's side of `POST /worker/score`: a score for each (text_1, text_2) pair, the two ways a model gives one.

A cross-encoder (a `ScoringRunner`) reads each pair together: the pair is tokenized as one input (the tokenizer's
own pair template) and its score is the model's (its logit through its activation). An embedding model (an
`EmbeddingRunner`) reads each text alone: every distinct text is embedded once and a pair's score is the cosine
similarity of its two vectors (as vLLM scores with an embedding model). Either way the inputs of concurrent requests
share forwards (lmfleet.engine.pooling).

Owns: tokenizing the texts, the one fit check (a pair, or a text, longer than the model's context is a 400
context_length_exceeded naming `text_1` or `text_2`, never truncated), the cosine, and the token count. Does not own:
batching (lmfleet.engine.pooling), the forward (the engine), mapping the runner's refusals to errors (worker/app.py).
"""

from __future__ import annotations

import math

from lmfleet import errors
from lmfleet.engine.base import PairTokenizer, Tokenizer
from lmfleet.engine.pooling import EmbeddingRunner, ScoringRunner
from lmfleet.protocol.worker import ScorePairsRequest, ScorePairsResponse


async def score(
    req: ScorePairsRequest, runner: EmbeddingRunner | ScoringRunner, tokenizer: Tokenizer
) -> ScorePairsResponse:
    """A score per pair, in order. Raises what the runner raises (`EngineRejected`, RuntimeError)."""
    if isinstance(runner, ScoringRunner):
        return await _cross_encoded(req, runner, tokenizer)
    return await _cosines(req, runner, tokenizer)


async def _cross_encoded(req: ScorePairsRequest, runner: ScoringRunner, tokenizer: Tokenizer) -> ScorePairsResponse:
    if not isinstance(tokenizer, PairTokenizer):  # every cross-encoder loader hands one over
        raise errors.LmfleetError("this model's tokenizer cannot join two texts")
    limit = runner.engine.max_model_len
    pairs = []
    for i, (first, second) in enumerate(req.pairs()):
        pair = tokenizer.encode_pair(first, second)
        if len(pair.ids) > limit:
            raise errors.ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens, however the pair at index {i} has "
                f"{len(pair.ids)} tokens (both texts, read together). Please shorten the texts.",
                param="text_2",
            )
        pairs.append(pair)
    scores = await runner.score(pairs)
    return ScorePairsResponse(scores=scores, prompt_tokens=sum(len(p.ids) for p in pairs))


async def _cosines(req: ScorePairsRequest, runner: EmbeddingRunner, tokenizer: Tokenizer) -> ScorePairsResponse:
    limit = runner.engine.max_model_len
    texts: dict[str, int] = {}  # each distinct text, embedded once: its row
    seqs: list[list[int]] = []
    for param, given in (("text_1", req.text_1), ("text_2", req.text_2)):
        for i, text in enumerate(given):
            if text in texts:
                continue
            seq = tokenizer.encode(text, add_special_tokens=True)
            if len(seq) > limit:
                raise errors.ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens, however the text at index {i} has "
                    f"{len(seq)} tokens. Please shorten the text.",
                    param=param,
                )
            if not seq:
                raise errors.InvalidRequest(f"the text at index {i} has no tokens", param=param)
            texts[text] = len(seqs)
            seqs.append(seq)
    vectors = await runner.embed(seqs)
    scores = [cosine(vectors[texts[a]], vectors[texts[b]]) for a, b in req.pairs()]
    return ScorePairsResponse(scores=scores, prompt_tokens=sum(map(len, seqs)))


def cosine(a: list[float], b: list[float]) -> float:
    """The cosine similarity of two vectors; 0 when either is all zeros."""
    norms = math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))
    return math.fsum(x * y for x, y in zip(a, b, strict=True)) / norms if norms else 0.0
