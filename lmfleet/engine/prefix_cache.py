"""The prefix cache's index, the same for every engine: which token prefixes are cached, in which tier, and which to
give up first.

Owns
  * `PrefixCache`: the cached entries, each a token prefix (the leading tokens of a request that finished) with the
    engine's handle on where its state lives, in one of two tiers: `KV` (the engine's KV cache: the handle says
    where, e.g. a llama.cpp sequence id) or `HOST` (host memory: the handle is the saved state, with its size in
    bytes). Longest-common-prefix lookup over both tiers, one least-recently-used order per tier, the host tier's
    byte budget, and the prefix cache's counters (`queries`, `hits`: prompt tokens looked up and served).
  * `common_prefix`: how many leading tokens two token lists share; `distinct_tokens`: how many tokens several
    prefixes hold, shared leading tokens once; `default_host_budget`: the host tier's default size.

How an engine uses it (all on the engine's one thread):
  * admitting a request: `match(tokens)` gives the longest prefix of `tokens` held in each tier (`Match`); the engine
    reuses the KV one, or first restores the host one (`restored(entry, handle)` moves it to the KV tier and
    returns the KV entries it makes redundant) when that is longer by enough to be worth the copy; `touch(entry)`
    marks the entry it used; `count(queried, served)`.
  * a request leaving: `match` again (`kv_len == len(tokens)`: already held, `touch` it), else `add(tokens, handle)`
    adds a KV entry and returns the KV entries that are a prefix of it, now redundant, for the engine to free.
  * room is short: `lru(KV)` is the entry to give up first; the engine either `remove`s it or moves it to host
    memory with `to_host(entry, handle, nbytes)`, which drops the host tier's least recently used entries to stay
    within its budget (and returns them), or refuses (returns None, the entry left as it was) when the state
    alone is larger than the budget.
  * `kv_tokens()`: the distinct tokens the KV tier holds, shared leading tokens once, as an engine whose entries
    share their common leading cells stores them (a system prompt that many entries start with counts once);
    `host_bytes`: what the host tier holds.

The index never touches the state itself: saving, restoring and freeing KV cells are the engine's, and so are the
policies' numbers (the shortest prefix worth reusing, worth restoring from host memory). Imports no torch and no
llama.cpp.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

DEFAULT_HOST_CAP = 8 << 30  # bytes: llama-server's `--cache-ram` default

H = TypeVar("H")  # the engine's handle on an entry's state: where it is in the KV cache, or the saved bytes


class Tier(str, enum.Enum):
    KV = "kv"  # in the engine's KV cache
    HOST = "host"  # saved to host memory


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


def distinct_tokens(prefixes: Iterable[Sequence[int]]) -> int:
    """The tokens of `prefixes` counting shared leading tokens once: the size of the trie they make (sorted, each
    adds its length less what it shares with the one before)."""
    ordered = sorted(tuple(p) for p in prefixes)
    total = sum(len(t) for t in ordered)
    return total - sum(common_prefix(a, b) for a, b in zip(ordered, ordered[1:], strict=False))


def default_host_budget() -> int:
    """The host tier's default budget: a quarter of the machine's memory, at most `DEFAULT_HOST_CAP` (llama-server's
    `--cache-ram` default)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # a platform without these names: no host tier
        return 0
    return int(min(memory // 4, DEFAULT_HOST_CAP))


@dataclass(eq=False)
class Entry(Generic[H]):
    """One cached prefix: its tokens (at positions 0..len-1), its tier, the engine's handle, and (host tier) the
    bytes its saved state takes."""

    tokens: tuple[int, ...]
    tier: Tier
    handle: H
    nbytes: int = 0  # host tier only
    array: np.ndarray = field(init=False, repr=False)  # the tokens, for fast comparison

    def __post_init__(self) -> None:
        self.array = np.asarray(self.tokens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Match(Generic[H]):
    """The longest prefix of a lookup's tokens held in each tier: the entry holding it and its length (None and 0
    when no entry shares a token)."""

    kv: Entry[H] | None = None
    kv_len: int = 0
    host: Entry[H] | None = None
    host_len: int = 0


class PrefixCache(Generic[H]):
    """The cached prefixes of one engine, in two tiers (module docstring). `host_budget_bytes` caps the host tier
    (0: no host tier)."""

    def __init__(self, host_budget_bytes: int = 0) -> None:
        if host_budget_bytes < 0:
            raise ValueError("the host tier's budget cannot be negative")
        self.host_budget_bytes = host_budget_bytes
        # least recently used first
        self._tiers: dict[Tier, OrderedDict[int, Entry[H]]] = {Tier.KV: OrderedDict(), Tier.HOST: OrderedDict()}
        self.host_bytes = 0
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of those, served from the cache
        self._kv_tokens: int | None = 0  # kv_tokens(), computed when asked after a change

    # -- lookup -------------------------------------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> Match[H]:
        """The longest prefix of `tokens` held in each tier (the most recently used entry on a tie)."""
        query = np.asarray(tokens, dtype=np.int64)
        best: dict[Tier, tuple[Entry[H] | None, int]] = {}
        for tier, entries in self._tiers.items():
            found: tuple[Entry[H] | None, int] = (None, 0)
            for entry in reversed(entries.values()):
                n = common_prefix(query, entry.array)
                if n > found[1]:
                    found = (entry, n)
                    if n == len(query):
                        break
            best[tier] = found
        (kv, kv_len), (host, host_len) = best[Tier.KV], best[Tier.HOST]
        return Match(kv, kv_len, host, host_len)

    def touch(self, entry: Entry[H]) -> None:
        """Mark `entry` as just used: it is given up last in its tier."""
        self._tiers[entry.tier].move_to_end(id(entry))

    def count(self, queried: int, served: int) -> None:
        """Count a lookup: `queried` prompt tokens, of which `served` came from the cache."""
        self.queries += queried
        self.hits += served

    # -- the KV tier --------------------------------------------------------------------------------------------

    def add(self, tokens: Sequence[int], handle: H) -> list[Entry[H]]:
        """Hold `tokens` in the KV tier under `handle` (the most recently used entry). Returns the KV entries that
        are a prefix of `tokens`, now redundant and removed, for the engine to free. The caller checked with `match`
        that no KV entry holds all of `tokens` already."""
        return self._put_kv(Entry(tuple(tokens), Tier.KV, handle))

    def _put_kv(self, entry: Entry[H]) -> list[Entry[H]]:
        kv = self._tiers[Tier.KV]
        redundant = [e for e in kv.values() if len(e) <= len(entry) and entry.tokens[: len(e)] == e.tokens]
        for e in redundant:
            self.remove(e)
        kv[id(entry)] = entry
        self._kv_tokens = None
        return redundant

    def lru(self, tier: Tier) -> Entry[H] | None:
        """The least recently used entry of `tier`: the one to give up first (None when the tier is empty)."""
        return next(iter(self._tiers[tier].values()), None)

    def entries(self, tier: Tier) -> list[Entry[H]]:
        """The entries of `tier`, least recently used first."""
        return list(self._tiers[tier].values())

    def remove(self, entry: Entry[H]) -> None:
        """Forget `entry` (the engine frees its state)."""
        del self._tiers[entry.tier][id(entry)]
        if entry.tier is Tier.HOST:
            self.host_bytes -= entry.nbytes
        else:
            self._kv_tokens = None

    def kv_tokens(self) -> int:
        """The distinct tokens the KV tier holds: a token shared by several entries' common leading tokens counts
        once (the size of the trie of their tokens)."""
        if self._kv_tokens is None:
            self._kv_tokens = distinct_tokens(e.tokens for e in self._tiers[Tier.KV].values())
        return self._kv_tokens

    # -- the host tier ------------------------------------------------------------------------------------------

    def to_host(self, entry: Entry[H], handle: H, nbytes: int) -> list[Entry[H]] | None:
        """Move a KV entry to host memory, its state saved as `handle` (`nbytes` bytes), dropping the host tier's
        least recently used entries to make room, and host entries that are a prefix of it (returned). None when
        `nbytes` exceeds the whole budget: the entry is left where it was. An entry a host entry already holds is
        removed from the KV tier only (returns [])."""
        assert entry.tier is Tier.KV
        if nbytes > self.host_budget_bytes:
            return None
        host = self._tiers[Tier.HOST]
        self.remove(entry)
        if any(len(e) >= len(entry) and e.tokens[: len(entry)] == entry.tokens for e in host.values()):
            return []
        dropped = [e for e in host.values() if entry.tokens[: len(e)] == e.tokens]
        for e in dropped:
            self.remove(e)
        while self.host_bytes + nbytes > self.host_budget_bytes:
            oldest = self.lru(Tier.HOST)
            assert oldest is not None
            self.remove(oldest)
            dropped.append(oldest)
        entry.tier, entry.handle, entry.nbytes = Tier.HOST, handle, nbytes
        host[id(entry)] = entry
        self.host_bytes += nbytes
        return dropped

    def restored(self, entry: Entry[H], handle: H) -> list[Entry[H]]:
        """A host entry's state is back in the KV cache under `handle`: it moves to the KV tier (most recently
        used), its host bytes freed. Returns the KV entries that are a prefix of it, now redundant and removed, for
        the engine to free (as `add`)."""
        assert entry.tier is Tier.HOST
        self.remove(entry)
        entry.tier, entry.handle, entry.nbytes = Tier.KV, handle, 0
        return self._put_kv(entry)
