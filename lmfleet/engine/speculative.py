"""Speculative decoding's engine-independent parts: the settings, draft-free n-gram prompt lookup, the verification
rule and when a row may speculate.

A speculating row puts its pending token and k drafted tokens into one forward pass, with logits at each position;
the target model then samples at each position in turn (`verify`) and keeps its own tokens up to and including the
first one that differs from the draft (all k and one more when none differs). Drafts here are deterministic (a greedy
draft model, an n-gram lookup): the draft distribution q is one-hot on the drafted token d, so standard speculative
sampling's rule (accept d with probability min(1, p(d)/q(d)) = p(d), else draw from the residual max(0, p - q)
normalized, that is p without d) is exactly "draw x from p; keep d if x == d, else keep x": the output follows the
target's distribution p after the request's whole sampler chain, and a seeded request draws once per emitted token
as it would without speculation, so it stays reproducible. Greedy rows (argmax) give the tokens they would give
without speculation.

Owns
  * `SpecSettings`: which drafter (`none`, `ngram`, `draft`), how many tokens a row drafts at most and at least,
    the n-gram lookup's longest n, and the back-off (no row speculates while more than `max_running` run).
  * `ngram_draft`: the latest earlier occurrence of the row's last n tokens (n from `ngram_max` down to 1) in its own
    tokens (prompt + generated), and the tokens that followed it.
  * `draft_length`: how many tokens a row drafts this step (its remaining budget, the context's room), and
    `next_draft_max`: how far a row drafts next after a verification (the adaptive part: a row whose drafts are
    rejected drafts less, down to `draft_min`, so a chat that repeats nothing costs little; one whose whole draft is
    accepted doubles its length, up to `draft_max`).
  * `verify`: the accept/reject loop over the target's samples.

Does not own: the forward pass, the KV cache, the sampler chains, a draft model (each engine's). Imports no llama.cpp
and no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

SPEC_TYPES = ("none", "ngram", "draft")


@dataclass(frozen=True)
class SpecSettings:
    """`type`: none (off), ngram (prompt lookup, no second model) or draft (`draft_model`, a GGUF file sharing the
    model's vocabulary). A row drafts up to `draft_max` tokens and speculates only with at least `draft_min`; no row
    speculates while more than `max_running` rows run (at a full batch the forward pass is compute-bound and rejected
    drafts cost what they add)."""

    type: str = "none"
    draft_max: int = 8
    draft_min: int = 1
    ngram_max: int = 3
    max_running: int = 4
    draft_model: str | None = None

    def __post_init__(self) -> None:
        if self.type not in SPEC_TYPES:
            raise ValueError(f"unknown speculative decoding type {self.type!r}; choose one of {', '.join(SPEC_TYPES)}")
        if (self.type == "draft") != (self.draft_model is not None):
            raise ValueError("a draft model goes with speculative decoding type draft, and only with it")
        if not 1 <= self.draft_min <= self.draft_max:
            raise ValueError("need 1 <= draft_min <= draft_max")
        if self.ngram_max < 1 or self.max_running < 0:
            raise ValueError("need ngram_max >= 1 and max_running >= 0")

    @property
    def enabled(self) -> bool:
        return self.type != "none"


def draft_length(
    settings: SpecSettings, limit: int, tokens: int, generated: int, max_new_tokens: int, max_model_len: int
) -> int:
    """How many tokens a row with `tokens` tokens (`generated` of them generated) may draft: what is left of its
    `max_new_tokens` and of the context after the token the target adds itself, at most `limit` (the row's own,
    `next_draft_max`); 0 when that is below `draft_min`."""
    k = min(limit, settings.draft_max, max_new_tokens - generated - 1, max_model_len - tokens - 1)
    return k if k >= settings.draft_min else 0


def next_draft_max(settings: SpecSettings, drafted: int, accepted: int) -> int:
    """A row's draft limit after `accepted` of its `drafted` tokens were accepted: twice as long after a full match,
    one more than what was accepted otherwise, within [draft_min, draft_max]."""
    wanted = 2 * drafted if accepted == drafted else accepted + 1
    return max(settings.draft_min, min(settings.draft_max, wanted))


def ngram_draft(tokens: Sequence[int], ngram_max: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of `tokens`, for the longest
    n from `ngram_max` down to 1 that occurs earlier; [] when none does. The occurrence's continuation may run into
    the suffix itself (a repeating pattern keeps repeating)."""
    size = len(tokens)
    if k < 1 or size < 2:
        return []
    last = tokens[-1]
    # where the last token occurred before, latest first: each is a candidate end of an earlier occurrence
    ends = [i for i in range(size - 2, -1, -1) if tokens[i] == last]
    if not ends:
        return []
    for n in range(min(ngram_max, size - 1), 0, -1):
        suffix = list(tokens[size - n :])
        for end in ends:
            if end >= n - 1 and list(tokens[end - n + 1 : end + 1]) == suffix:
                return list(tokens[end + 1 : end + 1 + k])
    return []


def verify(draft: Sequence[int], sample: Callable[[int], tuple[int, bool]]) -> int:
    """Walk the target's samples over a drafted row: `sample(i)` samples the target at position i (0: after the
    pending token; i: after draft[i - 1]) and records the token, returning it and whether the row finished with it.
    Position i + 1 is sampled only while the token at i equals draft[i] and the row goes on, so a row gets its accepted
    drafts and then the target's own token (at the first mismatch, or the bonus after the whole draft). Returns how
    many drafted tokens were accepted (recorded and followed by another sample or the end of the row)."""
    for i in range(len(draft) + 1):
        token, finished = sample(i)
        if finished or i == len(draft) or token != draft[i]:
            return i
    raise AssertionError("unreachable")
