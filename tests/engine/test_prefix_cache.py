"""The prefix cache's index (lmfleet.engine.prefix_cache): lookup, LRU order, shared prefixes, the host tier."""

from __future__ import annotations

import pytest

from lmfleet.engine.base import EngineRequest, SamplingParams
from lmfleet.engine.prefix_cache import (
    DEFAULT_HOST_CAP,
    PrefixCache,
    Tier,
    common_prefix,
    default_host_budget,
    distinct_tokens,
)
from lmfleet.engine.sequences import Outputs, Seq

SYSTEM = list(range(100, 130))  # a 30-token "system prompt"


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def test_match_finds_the_longest_prefix_in_each_tier():
    cache: PrefixCache[int] = PrefixCache(host_budget_bytes=1000)
    a = SYSTEM + [1, 2, 3]
    b = SYSTEM + [7, 8]
    cache.add(a, 1)
    cache.add(b, 2)
    m = cache.match(SYSTEM + [7, 8, 9])
    assert m.kv is not None and m.kv.handle == 2 and m.kv_len == len(b)
    assert m.host is None and m.host_len == 0
    assert cache.match([999]).kv is None
    # a host entry that shares more
    entry = cache.lru(Tier.KV)
    assert entry is not None and entry.handle == 1
    assert cache.to_host(entry, 11, nbytes=10) == []
    m = cache.match(a + [4])
    assert (m.kv_len, m.host_len) == (len(SYSTEM), len(a))
    assert m.host is entry and m.host.handle == 11


def test_two_entries_sharing_a_system_prompt_count_it_once():
    cache: PrefixCache[int] = PrefixCache()
    cache.add(SYSTEM + [1, 2, 3], 1)
    cache.add(SYSTEM + [4, 5], 2)
    assert cache.kv_tokens() == len(SYSTEM) + 3 + 2
    cache.add([7, 7], 3)
    assert cache.kv_tokens() == len(SYSTEM) + 3 + 2 + 2
    cache.remove(cache.entries(Tier.KV)[0])
    assert cache.kv_tokens() == len(SYSTEM) + 2 + 2


def test_an_entry_that_is_a_prefix_of_a_newer_one_is_dropped():
    cache: PrefixCache[int] = PrefixCache()
    assert cache.add(SYSTEM + [1], 1) == []
    cache.add(SYSTEM + [2], 2)
    redundant = cache.add(SYSTEM + [1, 5, 6], 3)
    assert [e.handle for e in redundant] == [1]
    assert sorted(e.handle for e in cache.entries(Tier.KV)) == [2, 3]


def test_least_recently_used_first():
    cache: PrefixCache[int] = PrefixCache()
    for handle in (1, 2, 3):
        cache.add([handle, 0, 0], handle)
    first = cache.lru(Tier.KV)
    assert first is not None and first.handle == 1
    cache.touch(first)
    assert [e.handle for e in cache.entries(Tier.KV)] == [2, 3, 1]
    # a lookup that ties prefers the most recently used
    cache.add([9, 9, 1], 4)
    cache.add([9, 9, 2], 5)
    m = cache.match([9, 9, 3])
    assert m.kv is not None and m.kv.handle == 5 and m.kv_len == 2


def test_the_host_tier_keeps_within_its_budget_least_recently_used_out_first():
    cache: PrefixCache[str] = PrefixCache(host_budget_bytes=100)
    for i in range(3):
        cache.add([i, 1, 2], f"kv{i}")
    e0, e1, e2 = cache.entries(Tier.KV)
    assert cache.to_host(e0, "s0", 40) == []
    assert cache.to_host(e1, "s1", 40) == []
    assert cache.host_bytes == 80
    dropped = cache.to_host(e2, "s2", 40)
    assert dropped == [e0] and cache.host_bytes == 80
    assert [e.handle for e in cache.entries(Tier.HOST)] == ["s1", "s2"]
    assert cache.entries(Tier.KV) == []
    # larger than the whole budget: left in the KV tier
    cache.add([5, 5], "kv5")
    big = cache.entries(Tier.KV)[0]
    assert cache.to_host(big, "s5", 101) is None
    assert big.tier is Tier.KV and cache.host_bytes == 80


def test_host_entries_covered_by_a_longer_one_are_not_kept_twice():
    cache: PrefixCache[str] = PrefixCache(host_budget_bytes=1000)
    cache.add([1, 2], "short")
    cache.add([3, 4], "other")
    short = cache.entries(Tier.KV)[0]
    cache.to_host(short, "s-short", 10)
    cache.add([1, 2, 3, 4], "long")
    long = cache.entries(Tier.KV)[-1]
    assert cache.to_host(long, "s-long", 20) == [short]
    assert cache.host_bytes == 20
    # a KV entry a host entry already holds leaves the KV tier without a second copy
    cache.add([1, 2, 3], "mid")
    mid = cache.entries(Tier.KV)[-1]
    assert cache.to_host(mid, "s-mid", 15) == []
    assert [e.handle for e in cache.entries(Tier.HOST)] == ["s-long"] and cache.host_bytes == 20


def test_a_restored_entry_moves_back_to_the_kv_tier():
    cache: PrefixCache[str] = PrefixCache(host_budget_bytes=1000)
    cache.add(SYSTEM + [1, 2], "kv-a")
    a = cache.entries(Tier.KV)[0]
    cache.to_host(a, "saved", 50)
    cache.add(SYSTEM, "kv-sys")
    redundant = cache.restored(a, "kv-a2")
    assert [e.handle for e in redundant] == ["kv-sys"]
    assert a.tier is Tier.KV and a.handle == "kv-a2" and cache.host_bytes == 0
    assert cache.entries(Tier.HOST) == [] and cache.entries(Tier.KV) == [a]
    assert cache.kv_tokens() == len(SYSTEM) + 2


def test_counters_and_a_negative_budget():
    cache: PrefixCache[int] = PrefixCache()
    cache.count(10, 4)
    cache.count(5, 0)
    assert (cache.queries, cache.hits) == (15, 4)
    with pytest.raises(ValueError):
        PrefixCache(host_budget_bytes=-1)


def test_the_first_output_reports_the_cached_tokens_once():
    seq = Seq(EngineRequest("r", [1, 2, 3], SamplingParams()), frozenset())
    seq.cached_tokens = 2
    first = Outputs()
    first.emit(seq, [4])
    first.emit(seq, [5])
    assert first.list()[0].cached_tokens == 2
    later = Outputs()
    later.emit(seq, [6])
    assert later.list()[0].cached_tokens is None
    other = Seq(EngineRequest("s", [1], SamplingParams()), frozenset())  # an engine without a prefix cache
    none = Outputs()
    none.emit(other, [2])
    assert none.list()[0].cached_tokens is None


def test_distinct_tokens_and_the_default_budget():
    assert distinct_tokens([SYSTEM + [1], SYSTEM + [2, 3], [9], SYSTEM]) == len(SYSTEM) + 1 + 2 + 1
    assert distinct_tokens([]) == 0
    assert 0 < default_host_budget() <= DEFAULT_HOST_CAP
