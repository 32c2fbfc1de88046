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
  * `ngram_draft`: the latest earlier occurrence of the row's last n tokens (n from `ngram_max` down to `ngram_min`)
    in its own tokens (prompt + generated), and the tokens that followed it.
  * `draft_length`: how many tokens a row may draft this step (its remaining budget, the context's room).
  * `SpecPolicy`: how many of those it drafts: the k that maximizes the batch's expected tokens per unit of step time,
    from the row's acceptance rate so far (`Acceptance`, starting from the drafter's rate over all rows) and the
    decode's cost by its size (timed from the engine's own decode-only steps, or fixed by `verify_cost`); 0, no
    speculation, when no k pays. On a CPU whose batched kernels cost nearly what one-token decodes do per token,
    speculation pays only at high acceptance, and the rule finds that out by itself.
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
    ngram_min: int = 1
    max_running: int = 4
    draft_model: str | None = None
    # the cost of one more token in a decode, relative to a one-token decode (0: free, as on a GPU far from its
    # compute limit); None: measured from the engine's own steps
    verify_cost: float | None = None

    def __post_init__(self) -> None:
        if self.type not in SPEC_TYPES:
            raise ValueError(f"unknown speculative decoding type {self.type!r}; choose one of {', '.join(SPEC_TYPES)}")
        if (self.type == "draft") != (self.draft_model is not None):
            raise ValueError("a draft model goes with speculative decoding type draft, and only with it")
        if not 1 <= self.draft_min <= self.draft_max:
            raise ValueError("need 1 <= draft_min <= draft_max")
        if not 1 <= self.ngram_min <= self.ngram_max or self.max_running < 0:
            raise ValueError("need 1 <= ngram_min <= ngram_max and max_running >= 0")
        if self.verify_cost is not None and not 0 <= self.verify_cost <= 1:
            raise ValueError("verify_cost must be in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.type != "none"


def draft_length(settings: SpecSettings, tokens: int, generated: int, max_new_tokens: int, max_model_len: int) -> int:
    """How many tokens a row with `tokens` tokens (`generated` of them generated) may draft: what is left of its
    `max_new_tokens` and of the context after the token the target adds itself, at most `draft_max`; 0 when that is
    below `draft_min`."""
    k = min(settings.draft_max, max_new_tokens - generated - 1, max_model_len - tokens - 1)
    return k if k >= settings.draft_min else 0


@dataclass
class Acceptance:
    """A row's verifications so far, older ones weighing less: drafted tokens the target was asked about (a rejected
    one counts, the drafts after it were never asked) and those it accepted."""

    asked: float = 0.0
    accepted: float = 0.0


ROW_MEMORY = 0.8  # each verification keeps this much of a row's earlier ones
DRAFTER_MEMORY = 0.99  # and of the drafter's, over all rows
TIME_MEMORY = 0.8  # each timed step keeps this much of the earlier timings of its size
PRIOR_RATE = 0.8  # the drafter's assumed acceptance before any verification: optimistic, so it gets tried
PRIOR_COST = 0.3  # a token's cost relative to a one-token decode, for a step size not timed yet


class SpecPolicy:
    """How many tokens each row drafts (module docstring). One per engine; `timed` after each decode-only step,
    `verified` after each verification, `draft_length` before drafting. Deterministic when `verify_cost` is set.

    Measured costs: the engine's decode-only steps are timed by their size (tokens in the decode; a draft model's
    decodes count in its step). Nothing is drafted at a batch size whose plain step was never timed; a size never
    timed is assumed to cost PRIOR_COST per token more, so each draft length is tried until its own timing says
    whether it pays."""

    def __init__(self, settings: SpecSettings) -> None:
        self._settings = settings
        self._asked = 5.0  # the prior, as five verifications' worth
        self._accepted = self._asked * PRIOR_RATE
        self._seconds: dict[int, float] = {}  # a decode-only step's time by its size, recent steps weighing more

    def timed(self, tokens: int, seconds: float) -> None:
        """A decode-only step of `tokens` tokens took `seconds`."""
        if self._settings.verify_cost is None:
            old = self._seconds.get(tokens)
            self._seconds[tokens] = seconds if old is None else TIME_MEMORY * old + (1 - TIME_MEMORY) * seconds

    def verified(self, row: Acceptance, drafted: int, accepted: int) -> None:
        asked = accepted + (1 if accepted < drafted else 0)
        row.asked = row.asked * ROW_MEMORY + asked
        row.accepted = row.accepted * ROW_MEMORY + accepted
        self._asked = self._asked * DRAFTER_MEMORY + asked
        self._accepted = self._accepted * DRAFTER_MEMORY + accepted

    def cost(self, rows: int, k: int) -> float | None:
        """A decode of `rows` tokens and k drafted ones, relative to one of `rows` tokens; None: not known yet."""
        c = self._settings.verify_cost
        if c is None:
            base = self._seconds.get(rows)
            if base is None:
                return None
            timed = self._seconds.get(rows + k)
            if timed is not None:
                return timed / base
            c = PRIOR_COST
        return (1 - c + c * (rows + k)) / (1 - c + c * rows)

    def draft_length(self, row: Acceptance, limit: int, rows: int) -> int:
        """The k in 0..`limit` that maximizes the batch's expected tokens per unit of time, for a row of `rows`
        decoding rows: (rows - 1 + E[tokens of this row | k]) / cost(rows, k); 0 if below `draft_min`."""
        if limit < 1 or self.cost(rows, 0) is None:
            return 0
        prior = 2.0
        rate = (row.accepted + prior * self._accepted / self._asked) / (row.asked + prior)
        best, best_k, expected, p = float(rows), 0, 1.0, 1.0
        for k in range(1, limit + 1):
            p *= rate
            expected += p
            value = (rows - 1 + expected) / (self.cost(rows, k) or 1.0)
            if value > best * 1.000001:
                best, best_k = value, k
        return best_k if best_k >= self._settings.draft_min else 0


def ngram_draft(tokens: Sequence[int], k: int, ngram_max: int, ngram_min: int = 1) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of `tokens`, for the longest
    n from `ngram_max` down to `ngram_min` that occurs earlier; [] when none does. The occurrence's continuation may
    run into the suffix itself (a repeating pattern keeps repeating)."""
    size = len(tokens)
    if k < 1 or size < 2:
        return []
    last = tokens[-1]
    # where the last token occurred before, latest first: each is a candidate end of an earlier occurrence
    ends = [i for i in range(size - 2, -1, -1) if tokens[i] == last]
    if not ends:
        return []
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
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
