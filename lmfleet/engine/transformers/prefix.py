"""The transformers engine's prefix cache: the keys and values of cached prefixes, kept in host memory.

Owns `PrefixKV`: an entry per cached prefix (a request's prompt once prefilled; its prompt and what it generated once
it leaves the batch), holding the keys and values of its tokens in every layer (as `Span`s, on the CPU, computed at
positions 0..n-1), indexed by `lmfleet.engine.prefix_cache.PrefixCache` in its host tier, whose byte budget is
`prefix_cache_host_bytes`. An entry that a longer one extends is given up for it (the longer one holds
its tokens too); past the budget, the least recently used entries go first. Entries live outside the running batch's
cache, so a running request never waits for, or gives room to, an entry. Also `CachedPrefix`, what a lookup finds
for a request to start from, and `MIN_REUSE`, the shortest prefix worth reusing.

Entries are kept whole: two conversations over one system prompt hold it twice (once in each entry), as the index
counts each host entry's bytes on its own.

Does not own: the index's policy (lookup, least recently used order, byte accounting: `lmfleet.engine.prefix_cache`),
where a prefix is copied to and how a prefill starts from it (`lmfleet.engine.transformers.engine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmfleet.engine.prefix_cache import PrefixCache, Tier, default_host_budget

# The shortest cached prefix worth reusing. Measured on CPU (one thread, best of repeated runs): a hit costs a fixed
# ~0.3 ms (the lookup, copying the prefix into the prefill's cache, its mask) whatever its length, and saves its
# tokens' forward: ~4 ms a token for a SmolLM2-135M-shaped model, so even one token pays there; on the tiny test
# model (a 64-token prefill in ~1.8 ms, all overhead) no length does. Four tokens, as the llama.cpp engine's
# MIN_PREFIX_REUSE: a chat template's opening is longer, and shorter entries are not worth a slot.
MIN_REUSE = 4

# A span of an entry's tokens: its keys and values in one tensor, [layers, 2 (keys, values), kv heads, tokens, head
# dim], so that a prefill copies a cached prefix in one copy per span, whatever the number of layers.
Span = torch.Tensor


@dataclass(frozen=True)
class CachedPrefix:
    """The first `length` tokens of a cached entry, found for a request whose prompt starts with them."""

    length: int
    spans: tuple[Span, ...]  # the entry's keys and values, in order (they may hold more tokens than `length`)

    @property
    def like(self) -> Span:
        """A span: its number of layers, kv heads, head dim and dtype are every span's."""
        return self.spans[0]

    def copy_into(self, out: torch.Tensor) -> None:
        """Copy the prefix's keys and values into `out`, [layers, 2, kv heads, length, head dim] on any device."""
        at = 0
        for span in self.spans:
            n = min(span.shape[3], self.length - at)
            if n <= 0:
                break
            out[:, :, :, at : at + n].copy_(span[:, :, :, :n])
            at += n


class PrefixKV:
    """Cached prefixes and their keys and values (module docstring). `host_bytes` caps what they hold (None: sized
    from the machine: `lmfleet.engine.prefix_cache.default_host_budget`)."""

    def __init__(self, host_bytes: int | None = None) -> None:
        budget = default_host_budget() if host_bytes is None else host_bytes
        self._index: PrefixCache[tuple[Span, ...]] = PrefixCache(budget)

    @property
    def budget(self) -> int:
        """The bytes the entries may hold."""
        return self._index.host_budget_bytes

    @property
    def bytes(self) -> int:
        """What the entries hold."""
        return self._index.host_bytes

    @property
    def queries(self) -> int:
        return self._index.queries

    @property
    def hits(self) -> int:
        return self._index.hits

    def match(self, tokens: Sequence[int]) -> CachedPrefix | None:
        """The longest cached prefix of `tokens`, if it is worth reusing (`MIN_REUSE` tokens or more); its entry
        becomes the most recently used."""
        found = self._index.match(tokens)
        if found.host is None or found.host_len < MIN_REUSE:
            return None
        self._index.touch(found.host)
        return CachedPrefix(found.host_len, found.host.handle)

    def count(self, queried: int, served: int) -> None:
        """A prefill looked up `queried` prompt tokens and reused `served` of them."""
        self._index.count(queried, served)

    def store(self, tokens: Sequence[int], kv: Callable[[int, int], Span], token_bytes: int) -> None:
        """Keep `tokens` as an entry unless one holds them already or they are too short to reuse; `kv(start, end)`
        copies the keys and values of tokens[start:end] into a new `Span` in host memory, `token_bytes` a token's.
        Entries that `tokens` extends are given up for it (the longest hands its spans over: only the rest is
        copied), then the least recently used ones while the budget is exceeded; an entry larger than the whole
        budget is not kept."""
        if len(tokens) < MIN_REUSE:
            return
        found = self._index.match(tokens)
        if found.host is not None and found.host_len == len(tokens):
            self._index.touch(found.host)
            return
        nbytes = len(tokens) * token_bytes
        if nbytes > self._index.host_budget_bytes:
            return
        extended = found.host if found.host is not None and found.host_len == len(found.host) else None
        start = found.host_len if extended is not None else 0
        spans = (*(extended.handle if extended is not None else ()), kv(start, len(tokens)))
        self._index.add(tokens, spans)  # the index adds an entry to its KV tier (not used here), then...
        moved = self._index.to_host(self._index.entries(Tier.KV)[-1], spans, nbytes)  # ...moves it to host memory
        assert moved is not None and (extended is None or extended in moved)  # it fits; what it extends is gone
