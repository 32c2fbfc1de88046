"""Continuous batching over a GGUF model with llama.cpp's C API (llama-cpp-python's ctypes bindings).

Owns: the llama.cpp model, one context whose KV cache is unified (one pool of `max_model_len` cells shared by every
sequence, so one sequence may use all of it, as llama.cpp's server does with parallel slots), one reusable
`llama_batch`, a llama.cpp sequence id per running request, a sampler chain per request, the prefix cache,
preemption and the `step()` loop. Speaks token ids only. Does not own: the sequences' bookkeeping (queue, admission
order, aborts, finishing: `lmfleet.engine.sequences`), threads (`lmfleet.engine.runner`), text, HTTP.

Each request is a token list (prompt, then what it generated) of which a prefix is in the KV cache; what is not cached
yet is its pending part: one token (the last sampled) for a decoding request, the rest of its prompt for a new one.

Prefix cache (`lmfleet.engine.prefix_cache` is its index): the cells of requests that finished stay in the pool, each
entry under a spare sequence id of its own (n_seq_max = max_num_seqs + spare ids, at most LLAMA_MAX_SEQ = 256). A
cell can belong to several sequence ids (`llama_memory_seq_cp` shares, it does not copy), and an entry is made from
the cells of the entry it shares most leading tokens with plus the finished request's own: so entries share the
cells of their common leading tokens, and a system prompt behind any number of conversations is held once. A new
request starts from the longest prefix it shares with an entry (shared, not copied) and computes only the rest. The
cache lives in the pool's free room: when a request being admitted, or a decode (`llama_decode` returning 1), needs
room, entries give theirs up, least recently used first, before any running request is preempted. An entry given up
is saved to host memory (`llama_state_seq_get_data`) within `prefix_cache_host_bytes`, and restored
(`llama_state_seq_set_data`) when a new request shares at least `HOST_RESTORE_MIN` more tokens with it than with
anything in the pool. Reused cells were computed in another batch, so (as with batch companions) a reuse can change
a near-tie; `prefix_cache=False` turns it off, and `max_num_seqs=1` with it gives identical answers to identical
requests (the worker's `--deterministic`).

One `step()`:
  1. apply aborts (waiting requests dropped, running ones' KV cells freed; each gets an ABORT output);
  2. admit waiting requests (FIFO) up to `max_num_seqs` running while the cache has room for their tokens, giving
     each a free sequence id: admitting before the forward lets new prompts ride in the same `llama_decode`;
  3. one `llama_decode` over every running request's pending token and, within `max_batch_tokens`, prompt chunks in
     admission order (a longer prompt continues in the next steps); logits only at the last pending token of a
     request whose pending part is complete;
  4. sample those requests through their own chains, finish them on eos / stop ids / max_new_tokens /
     max_model_len, and free the KV cells and sequence ids of the finished.

Speculative decoding (`SpecSettings`, off by default; the rule and the n-gram lookup in lmfleet.engine.speculative, a
draft model in lmfleet.engine.llamacpp.draft): while at most `max_running` requests run, a decoding request may put
drafted tokens after its pending one in step 3's decode, with logits at each; step 4 then samples it at each position
in turn (its constraint advanced by each accepted token, its raw log probabilities per position) while the sample
equals the draft, and frees the rejected drafts' cells (`llama_memory_seq_rm` from the first of them). A full cache
drops the drafts before it preempts anyone.

Log probabilities (`SamplingParams.logprobs`) are the log-softmax of the raw logits llama.cpp returns, read before
the request's sampler chain sees them. A request that asks for its prompt's (`prompt_logprobs`, echo) gets logits at
every prompt position and computes its whole prompt (no prefix reuse).

Sequences grow into a shared pool, so a decode can find the cache full (`llama_decode` returns 1, the cache
untouched). Then the newest running request is preempted: its cells are freed and it waits at the front of the queue
to be recomputed (prompt + what it generated) once there is room, keeping its sampler chain (random state, penalty
history), and the decode is retried without it; only a request alone in the cache and still without room fails
(ERROR). Any other failed decode fails the requests in that batch, not the engine.

A request's output does not depend on its batch companions beyond llama.cpp's floating-point rounding: each sequence
attends to its own cells only, at its own positions. End-of-sequence and stop ids are never returned in
`new_token_ids` (see `lmfleet.engine.base`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import llama_cpp.llama_cpp as llama
import numpy as np
from tqdm import tqdm

from lmfleet.engine.base import (
    BatchSettings,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    SamplingParams,
    TokenLogprob,
)
from lmfleet.engine.prefix_cache import (
    Entry,
    PrefixCache,
    Tier,
    common_prefix,
    default_host_budget,
    distinct_tokens,
)
from lmfleet.engine.sequences import Outputs, Seq, Sequences
from lmfleet.engine.speculative import Acceptance, SpecPolicy, SpecSettings, draft_length, ngram_draft, verify

logger = logging.getLogger("lmfleet.engine")
llama_logger = logging.getLogger("lmfleet.engine.llamacpp")

# The default context when the settings name none: the model's trained context, at most this. The unified KV cache is
# allocated up front at this size (for the 135M SmolLM2, 23 KB a token: 190 MB at 8192; for a 7B Llama, 0.5 MB a
# token: 4 GB), so a model trained on 128k tokens must not claim it silently.
DEFAULT_CONTEXT_CAP = 8192
MIN_PREFIX_REUSE = 4  # shared leading tokens worth taking from the prefix cache
# Leading tokens a host-memory entry must add over the pool's best match to be restored rather than computed, and
# the shortest entry saved to host memory when it leaves the pool. Measured (2 busy CPU cores, 256-token entries):
# SmolLM2-135M Q4_1 saves 23 KB a token in 80 us and restores it in 15 us; Qwen2.5 0.5B Q4_K_M 12 KB in 20 us and
# 1 us; computing a token in a prefill costs 0.3-60 ms there. Restoring is worth it for any prefix; this floor only
# keeps scraps out of host memory.
HOST_RESTORE_MIN = 16

LLAMA_MAX_SEQ = 256  # llama-cparams.h: sequence ids run from 0 to 255
_GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level (the bindings do not export it)


@functools.cache
def init_llama() -> Any:
    """Initialise llama.cpp once per process and route its log lines to the `lmfleet.engine.llamacpp` logger
    (errors at ERROR, the rest at DEBUG) instead of stderr. Returns the callback, which must stay alive as long as
    llama.cpp may call it (the cache holds it)."""

    @llama.llama_log_callback
    def log(level: int, text: bytes, user_data: Any) -> None:
        python_level = logging.ERROR if level == _GGML_LOG_LEVEL_ERROR else logging.DEBUG
        if llama_logger.isEnabledFor(python_level):
            line = text.decode("utf-8", errors="replace").rstrip()
            if line:
                llama_logger.log(python_level, "%s", line)

    llama.llama_log_set(log, ctypes.c_void_p(0))
    llama.llama_backend_init()
    return log


@functools.cache
def _cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (Linux's /proc/cpuinfo flags; False where that file is not)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and " amx_" in line for line in f)
    except OSError:
        return False


@dataclass(eq=False)
class _Seq(Seq):
    """A sequence in llama.cpp: its sampler chain and how much of `tokens` its KV cells hold (the last token sampled
    is never cached yet)."""

    sampler: Any = None  # llama_sampler pointer (a chain), owned: freed when the request leaves
    seq_id: int = -1  # llama.cpp sequence id while running, -1 while waiting
    n_cached: int = 0  # leading tokens of `tokens` in the KV cache
    borrowed: int = 0  # of those, leading tokens whose cells it shares with the prefix cache's entries
    acceptance: Acceptance = field(default_factory=Acceptance)  # speculative decoding: its drafts' fate so far


class LlamaCppEngine:
    """The `Engine` protocol over a GGUF model in llama.cpp. Single-threaded: call everything from one thread, and
    `close()` it to free the model (the `GGUFTokenizer` made from `model` must not be used after that)."""

    def __init__(
        self,
        model_path: str,
        *,
        max_num_seqs: int = BatchSettings.max_num_seqs,
        max_batch_tokens: int = BatchSettings.max_batch_tokens,
        max_model_len: int | None = None,
        n_threads: int | None = None,
        flash_attn: bool = True,
        prefix_cache: bool = True,
        prefix_cache_host_bytes: int | None = None,
        speculative: SpecSettings | None = None,
    ) -> None:
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_tokens must be positive")
        if max_num_seqs > LLAMA_MAX_SEQ:
            raise ValueError(f"llama.cpp runs at most {LLAMA_MAX_SEQ} sequences at once")
        init_llama()
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self._free_ids = list(range(max_num_seqs - 1, -1, -1))  # a stack: the lowest free id is reused first
        # the prefix cache: its entries' sequence ids (spare ones here), None when off (or no id is left for it)
        self._spare_ids = list(range(LLAMA_MAX_SEQ - 1, max_num_seqs - 1, -1)) if prefix_cache else []
        host = default_host_budget() if prefix_cache_host_bytes is None else prefix_cache_host_bytes
        self._cache: PrefixCache[Any] | None = PrefixCache(host) if self._spare_ids else None
        self._spec = speculative or SpecSettings()
        self._policy = SpecPolicy(self._spec)
        self._draft: Any = None  # the DraftModel (lmfleet.engine.llamacpp.draft) when speculating with one
        self._drafted = self._accepted = 0  # speculative tokens proposed and accepted, from the start
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        params = llama.llama_model_default_params()
        # Repacked weight buffers (ggml's CPU "extra" buffer types: Q4_0/Q4_K/IQ4_NL weights interleaved for
        # AVX2/AVX-512/NEON matrix kernels, as llama-server uses them) except on CPUs with AMX, where ggml's AMX
        # buffer takes Q4_1 weights and llama_decode over several sequences crashes (segfault, llama-cpp-python
        # 0.3.36, seen on a Xeon with amx_int8).
        params.use_extra_bufts = not _cpu_has_amx()
        # A progress bar on a terminal (tqdm stays silent when stderr is not one: logs, tests)
        with tqdm(total=100, desc=f"loading {os.path.basename(model_path)}", unit="%", disable=None) as bar:

            @llama.llama_progress_callback
            def progress(fraction: float, _user_data: Any) -> bool:
                bar.update(round(fraction * 100) - bar.n)
                return True  # go on loading

            params.progress_callback = progress
            model = llama.llama_model_load_from_file(model_path.encode(), params)
        if not model:
            raise ValueError(f"llama.cpp could not load {model_path} (see the lmfleet.engine.llamacpp debug log)")
        self._model = model
        try:
            self._open_context(max_num_seqs, max_batch_tokens, max_model_len, n_threads, flash_attn)
            self._open_drafter(flash_attn)
        except BaseException:
            self._free()
            raise
        self._seqs = Sequences[_Seq](
            max_num_seqs=max_num_seqs,
            max_model_len=self._max_model_len,
            vocab_size=self._vocab_size,
            eos_token_ids=self._eos,
        )

    def _open_context(
        self,
        max_num_seqs: int,
        max_batch_tokens: int,
        max_model_len: int | None,
        n_threads: int | None,
        flash_attn: bool,
    ) -> None:
        trained = int(llama.llama_model_n_ctx_train(self._model))
        if max_model_len is None:
            max_model_len = min(trained, DEFAULT_CONTEXT_CAP) if trained > 0 else DEFAULT_CONTEXT_CAP
        elif trained > 0 and max_model_len > trained:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's trained context {trained}")
        if max_num_seqs > max_model_len:  # llama.cpp aborts the process on more sequence ids than cells
            raise ValueError(f"max_num_seqs {max_num_seqs} exceeds max_model_len {max_model_len}: a cell per sequence")
        self._max_model_len = max_model_len
        self._n_threads = n_threads or os.cpu_count() or 1
        # Every running sequence's pending token (and its draft) plus `max_batch_tokens` prompt tokens go into one
        # decode.
        per_seq = 1 + (self._spec.draft_max if self._spec.enabled else 0)
        self._n_batch = max_batch_tokens + max_num_seqs * per_seq
        params = llama.llama_context_default_params()
        params.n_ctx = max_model_len
        params.n_batch = self._n_batch
        # + the prefix cache's entries. llama.cpp aborts the process on more sequence ids than cells (reserving its
        # worst-case graph: seen at n_ctx 160) or than one ubatch's outputs (GGML_ASSERT n_outputs_max, seen at
        # n_batch 10): the spare ids stop there
        ubatch = min(self._n_batch, params.n_ubatch or self._n_batch)
        keep = max(0, min(len(self._spare_ids), min(max_model_len, ubatch) - max_num_seqs))
        self._spare_ids = self._spare_ids[len(self._spare_ids) - keep :]
        if not self._spare_ids:
            self._cache = None
        params.n_seq_max = max_num_seqs + len(self._spare_ids)
        params.n_threads = params.n_threads_batch = self._n_threads
        params.kv_unified = True
        # Flash attention (llama-server's default too) is about 1.4x the 16-sequence throughput here. llama.cpp's CPU
        # kernels are not batch-invariant either way: a sequence's logits move with its batch companions (max
        # difference 0.3-0.7 on SmolLM2 without flash attention, 0.7-1.5 with it), which can flip greedy near-ties.
        params.flash_attn_type = (
            llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise ValueError("llama.cpp could not create a context (see the lmfleet.engine.llamacpp debug log)")
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(self._n_batch, 0, 1)
        vocab = llama.llama_model_get_vocab(self._model)
        self._vocab_size = int(llama.llama_vocab_n_tokens(vocab))
        eos, eot = llama.llama_vocab_eos(vocab), llama.llama_vocab_eot(vocab)
        self._eos = tuple(dict.fromkeys(t for t in (eos, eot) if 0 <= t < self._vocab_size))
        # one cell's K and V (f16, llama.cpp's default cache type) over every layer: the prefix cache's bytes
        m = self._model
        head = llama.llama_model_n_embd(m) // max(llama.llama_model_n_head(m), 1)
        self._cell_bytes = 2 * 2 * llama.llama_model_n_layer(m) * head * llama.llama_model_n_head_kv(m)

    def _open_drafter(self, flash_attn: bool) -> None:
        """Check that the model can speculate and load the draft model, if any (after the context)."""
        spec = self._spec
        if not spec.enabled:
            return
        if llama.llama_model_is_recurrent(self._model) or llama.llama_model_is_hybrid(self._model):
            raise ValueError("speculative decoding needs a transformer's KV cache; this model is recurrent")
        if spec.draft_model is not None:
            from lmfleet.engine.llamacpp.draft import DraftModel

            self._draft = DraftModel(
                spec.draft_model,
                self._model,
                n_ctx=self._max_model_len,
                n_seq_max=self.max_num_seqs,
                n_batch=self._n_batch,
                n_threads=self._n_threads,
                flash_attn=flash_attn,
            )

    def close(self) -> None:
        """Free the samplers, the batch, the context and the model. Requests still in the engine are dropped."""
        for seq in self._seqs.clear():
            llama.llama_sampler_free(seq.sampler)
        self._free()

    def _free(self) -> None:
        """Free the draft model, the batch, the context and the model (also what a failed `__init__` got so far)."""
        if self._draft is not None:
            self._draft.close()
            self._draft = None
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None

    # -- the Engine protocol ------------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def model(self) -> Any:
        """The `llama_model` pointer, for the tokenizer and the loader's description."""
        return self._model

    @property
    def n_threads(self) -> int:
        return self._n_threads

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request that fits (lmfleet.engine.base); EngineRejected for a sampling option it cannot run."""
        assert self._batch is not None, "the engine is open"
        self._seqs.add(request, lambda r, stop_ids: _Seq(r, stop_ids, sampler=self._sampler(r.params)))

    def abort_request(self, request_id: str) -> None:
        self._seqs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self._seqs.has_unfinished()

    def stats(self) -> EngineStats:
        stats = self._seqs.stats(
            tokens_in_flight=sum(s.n_cached for s in self._seqs.running),
            kv_capacity=self._max_model_len,  # one unified pool of n_ctx cells
        )
        cache = self._cache
        stats = dataclasses.replace(stats, spec_draft_tokens=self._drafted, spec_accepted_tokens=self._accepted)
        if cache is None:
            return stats
        return dataclasses.replace(
            stats,
            prefix_cache_queries=cache.queries,
            prefix_cache_hits=cache.hits,
            prefix_cache_kv_bytes=cache.kv_tokens() * self._cell_bytes,
            prefix_cache_host_bytes=cache.host_bytes,
        )

    def step(self) -> list[EngineOutput]:
        outputs = Outputs()
        self._seqs.apply_aborts(outputs)
        self._release_finished()
        self._seqs.admit(self._reserve)
        if self._seqs.running:
            self._forward(outputs)
            self._release_finished()
        return outputs.list()

    # -- the steps ----------------------------------------------------------------------------------------------

    def _reserve(self, seq: _Seq, taken: list[_Seq]) -> bool:
        """Admit `seq` if the pool has room for the cells running requests hold or are about to (their whole
        prompts), plus one new token each for this step; the prefix cache's entries give theirs up for it, least
        recently used first. A request alone in the engine always fits (add_request asserts it). Gives `seq` a
        sequence id and the longest prefix the cache holds of it."""
        running = self._seqs.running
        if self._cache is not None and not seq.echoing:
            found = self._cache.match(seq.tokens[:-1]).kv_len
            credit = found if found >= MIN_PREFIX_REUSE else 0
        else:
            credit = 0
        own = self._own_cells() + len(seq.tokens) + 1 - credit
        shared = distinct_tokens([*(s.tokens[: s.borrowed] for s in running), seq.tokens[:credit]])
        if running and own + shared > self._max_model_len:
            return False
        seq.seq_id = self._free_ids.pop()
        self._reuse_prefix(seq)
        self._make_room(seq)
        return True

    def _own_cells(self, admitting: _Seq | None = None) -> int:
        """The cells running requests (and the one being admitted) hold apart from the prefix cache's, with one new
        token each."""
        seqs = [*self._seqs.running, admitting] if admitting is not None else self._seqs.running
        return sum(len(s.tokens) + 1 - s.borrowed for s in seqs)

    def _cells(self, admitting: _Seq | None = None) -> int:
        """The cells in use, with one new token per running request: the running requests' own, and the distinct
        leading tokens of the cache's entries and of what running requests share with them (entries share the
        cells of their common leading tokens, and a request borrows an entry's). Exact but where a request's
        borrowed cells outlived their entry and another entry computed the same tokens anew: then a decode may
        still find the pool full (`_forward` gives entries up then)."""
        assert self._cache is not None
        kv = (e.tokens for e in self._cache.entries(Tier.KV))
        seqs = [*self._seqs.running, admitting] if admitting is not None else self._seqs.running
        borrowed = (s.tokens[: s.borrowed] for s in seqs if s.borrowed)
        return self._own_cells(admitting) + distinct_tokens([*kv, *borrowed])

    def _make_room(self, admitting: _Seq | None = None) -> None:
        """Give the cache's entries up, least recently used first, while the pool is over-full."""
        while self._cache is not None and self._cells(admitting) > self._max_model_len and self._evict():
            pass

    def _reuse_prefix(self, seq: _Seq) -> None:
        """Start `seq` from the cells of the longest prefix the cache holds of it (the chat template, the system
        prompt, earlier turns): they are shared, not copied, and only the rest is computed. A longer prefix in
        host memory is restored first. One token is always left to compute, for the logits. Not for a request that
        needs its prompt's logits (echo)."""
        cache = self._cache
        first = seq.cached_tokens is None
        if cache is None or seq.echoing:
            if first and cache is not None:
                seq.cached_tokens = 0
            return
        wanted = seq.tokens[:-1]
        found = cache.match(wanted)
        entry, shared = found.kv, found.kv_len
        if found.host is not None and found.host_len >= shared + HOST_RESTORE_MIN:
            restored = self._restore(found.host, seq)
            if restored is not None:
                entry, shared = restored, common_prefix(restored.tokens, wanted)
        if entry is None or shared < MIN_PREFIX_REUSE:
            shared = 0
        else:
            llama.llama_memory_seq_cp(self._memory, entry.handle, seq.seq_id, 0, shared)
            cache.touch(entry)
        seq.n_cached = seq.borrowed = shared
        if first:  # a preempted request's second admission is not a new lookup
            seq.cached_tokens = shared
            cache.count(len(seq.request.prompt_token_ids), min(shared, len(seq.request.prompt_token_ids)))

    def _keep_prefix(self, seq: _Seq) -> None:
        """Let the prefix cache hold a finished request's cached tokens: under a spare sequence id, the cells of
        the entry sharing most of its leading tokens, then its own (its own copies of those leading tokens are
        freed with it). Entries that are a prefix of it are dropped."""
        cache = self._cache
        assert cache is not None
        tokens = seq.tokens[: seq.n_cached]
        held = cache.match(tokens)
        if held.kv is not None and held.kv_len == len(tokens):
            cache.touch(held.kv)
            return
        if not self._spare_ids and not self._evict():
            return
        entry_id = self._spare_ids.pop()
        held = cache.match(tokens)  # the eviction may have taken the best match
        shared = 0
        if held.kv is not None:
            shared = held.kv_len
            llama.llama_memory_seq_cp(self._memory, held.kv.handle, entry_id, 0, shared)
        llama.llama_memory_seq_cp(self._memory, seq.seq_id, entry_id, shared, len(tokens))
        self._drop(cache.add(tokens, entry_id))

    def _drop(self, entries: list[Entry[Any]]) -> None:
        """Free the cells only these KV entries (forgotten by the index) held, and their sequence ids."""
        for entry in entries:
            self._free_entry_id(entry.handle)

    def _free_entry_id(self, entry_id: int) -> None:
        llama.llama_memory_seq_rm(self._memory, entry_id, -1, -1)
        self._spare_ids.append(entry_id)

    def _evict(self) -> bool:
        """Give up the prefix cache's least recently used entry in the pool, saving it to host memory first when
        it is long enough to be worth restoring and fits the budget. False when the pool holds none."""
        cache = self._cache
        entry = cache.lru(Tier.KV) if cache is not None else None
        if cache is None or entry is None:
            return False
        seq_id = entry.handle
        saved = None
        if len(entry) >= HOST_RESTORE_MIN and cache.host_budget_bytes:
            if cache.match(entry.tokens).host_len == len(entry):
                saved = cache.to_host(entry, None, 0)  # already in host memory
            else:
                size = llama.llama_state_seq_get_size(self._ctx, seq_id)
                if size <= cache.host_budget_bytes:
                    state = (ctypes.c_uint8 * size)()
                    if llama.llama_state_seq_get_data(self._ctx, state, size, seq_id) == size:
                        saved = cache.to_host(entry, state, size)
        if saved is None:
            cache.remove(entry)
        self._free_entry_id(seq_id)
        return True

    def _restore(self, entry: Entry[Any], admitting: _Seq) -> Entry[Any] | None:
        """Bring a host-memory entry back into the pool under a spare sequence id (entries given up for room
        first); it then shares the cells of its leading tokens with the entry in the pool that shares most of
        them, as every entry does. None when there is no room for it or llama.cpp refuses the state."""
        cache = self._cache
        assert cache is not None and entry.tier is Tier.HOST
        state, size = entry.handle, entry.nbytes
        cache.touch(entry)

        def short() -> bool:
            return not self._spare_ids or self._cells(admitting) + len(entry) > self._max_model_len

        while short() and self._evict():
            pass
        if entry not in cache.entries(Tier.HOST) or short():
            return None  # no room, or the evictions pushed it out of host memory
        entry_id = self._spare_ids.pop()
        if llama.llama_state_seq_set_data(self._ctx, state, size, entry_id) == 0:
            self._spare_ids.append(entry_id)
            return None
        held = cache.match(entry.tokens)
        if held.kv is not None and held.kv_len:
            llama.llama_memory_seq_rm(self._memory, entry_id, 0, held.kv_len)
            llama.llama_memory_seq_cp(self._memory, held.kv.handle, entry_id, 0, held.kv_len)
        self._drop(cache.restored(entry, entry_id))
        return entry

    def _forward(self, outputs: Outputs) -> None:
        """One llama_decode over the running requests (with their drafts), then sampling and verifying; preempts on a
        full cache (module docstring)."""
        started = time.perf_counter()  # a draft model's decodes count in the step's cost
        drafts = self._propose()
        while True:
            plan = self._fill_batch(drafts)
            rc = llama.llama_decode(self._ctx, self._batch)
            if rc == 0:
                if self._spec.enabled and all(len(seq.tokens) - seq.n_cached == 1 for seq, *_ in plan):
                    self._policy.timed(self._batch.n_tokens, time.perf_counter() - started)
                break
            if rc == 1 and drafts:  # the drafts' cells go first
                drafts = {}
                continue
            if rc == 1 and self._evict():  # the prefix cache gives its room up before any request is preempted
                self._make_room()
                continue
            if rc == 1 and len(self._seqs.running) > 1:
                self._preempt(self._seqs.running[-1])
                continue
            reason = "the KV cache has no room for this request" if rc == 1 else f"llama_decode returned {rc}"
            logger.error("decode failed (%s); failing %d requests", reason, len(plan))
            # after a fatal error, cells the decode did write stay in the cache: _release frees them
            self._seqs.fail([seq for seq, *_ in plan], f"engine failure: {reason}", outputs)
            return
        for seq, n, logits_at, first, draft in plan:
            if len(seq.tokens) - seq.n_cached == 1:
                self._seqs.decoded += 1
            else:
                self._seqs.prefilled += n
            if seq.echoing:
                self._gather_prompt_logprobs(seq, first, n)
            if draft:
                self._verify(seq, logits_at, draft, outputs)
                continue
            seq.n_cached += n
            if logits_at >= 0:
                self._sample_at(seq, logits_at, outputs)

    def _propose(self) -> dict[_Seq, list[int]]:
        """This step's drafts: for each decoding request the drafter proposes at least `draft_min` tokens for, while
        at most `max_running` requests run (lmfleet.engine.speculative)."""
        spec, running = self._spec, self._seqs.running
        if not spec.enabled or len(running) > spec.max_running:
            return {}
        rows: list[tuple[_Seq, int]] = []
        decoding = [seq for seq in running if len(seq.tokens) - seq.n_cached == 1 and not seq.echoing]
        for seq in decoding:
            k = draft_length(spec, len(seq.tokens), seq.num_generated, seq.params.max_new_tokens, self._max_model_len)
            k = self._policy.draft_length(seq.acceptance, k, len(decoding)) if k else 0
            if k:
                rows.append((seq, k))
        if not rows:
            return {}
        if self._draft is not None:
            proposed = self._draft.propose([(seq.seq_id, seq.tokens, k) for seq, k in rows])
        else:
            proposed = [ngram_draft(seq.tokens, k, spec.ngram_max, spec.ngram_min) for seq, k in rows]
        return {seq: draft for (seq, _), draft in zip(rows, proposed, strict=True) if len(draft) >= spec.draft_min}

    def _verify(self, seq: _Seq, first: int, draft: list[int], outputs: Outputs) -> None:
        """Sample the target at the pending token and at each drafted one in turn (batch indices from `first`),
        keeping the drafts it agrees with and its own token after them (lmfleet.engine.speculative.verify); the
        cells of the rejected drafts leave the cache."""
        accepted = verify(draft, lambda i: self._sample_at(seq, first + i, outputs))
        self._drafted += len(draft)
        self._accepted += accepted
        self._policy.verified(seq.acceptance, len(draft), accepted)
        seq.n_cached += 1 + accepted  # the pending token and the accepted drafts
        llama.llama_memory_seq_rm(self._memory, seq.seq_id, seq.n_cached, -1)

    def _sample_at(self, seq: _Seq, index: int, outputs: Outputs) -> tuple[int, bool]:
        """Sample `seq`'s next token from the logits at batch index `index` through its constraint and sampler chain
        and record it; returns the token and whether the request finished with it."""
        k = seq.params.logprobs
        raw = _RawLogprobs(self._logits(index), k) if k is not None else None  # before any mask
        self._apply_constraint(seq, index)
        token = llama.llama_sampler_sample(seq.sampler, self._ctx, index)
        return token, self._seqs.advance(seq, token, outputs, raw.of(token) if raw is not None else None)

    def _logits(self, index: int) -> Any:
        """The logits at batch index `index`: a numpy view of llama.cpp's buffer (samplers copy, never write it; a
        constraint's mask does, after the raw log probabilities were taken)."""
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, index), shape=(self._vocab_size,))

    def _apply_constraint(self, seq: _Seq, logits_at: int) -> None:
        """Set the logits of every id the request's constraint does not allow next to -inf, in llama.cpp's output
        buffer, before its sampler chain reads them (a request without a constraint is untouched)."""
        constraint = seq.params.constraint
        if constraint is None:
            return
        bits = np.unpackbits(np.frombuffer(constraint.allowed(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(self._vocab_size, dtype=bool)
        n = min(len(bits), self._vocab_size)
        allowed[:n] = bits[:n]
        self._logits(logits_at)[~allowed] = -np.inf

    def _gather_prompt_logprobs(self, seq: _Seq, first: int, n: int) -> None:
        """The log probability of each prompt token this batch predicted for `seq` (its `n` tokens from batch index
        `first`, all with logits): position p's logits give token p + 1's."""
        prompt, got = seq.request.prompt_token_ids, seq.prompt_logprobs
        assert got is not None
        for j in range(n):
            target = seq.n_cached + j + 1
            if target == len(got) and target < len(prompt):
                got.append(_RawLogprobs(self._logits(first + j), seq.params.prompt_logprobs).of(prompt[target]))

    def _fill_batch(self, drafts: dict[_Seq, list[int]]) -> list[tuple[_Seq, int, int, int, list[int]]]:
        """Write this step's tokens into the batch: every decoding request's pending token (and its draft, with logits
        at each position), then prompt chunks in admission order within `max_batch_tokens`. Returns (request, tokens
        written, batch index of its (first) logits or -1, batch index of its first token, its draft) per request in
        the batch."""
        b = self._batch
        plan: list[tuple[_Seq, int, int, int, list[int]]] = []
        n = 0
        budget = self.max_batch_tokens
        running = self._seqs.running
        decoding = [s for s in running if len(s.tokens) - s.n_cached == 1]
        prefilling = [s for s in running if len(s.tokens) - s.n_cached > 1]
        for seq in decoding + prefilling:
            pending = len(seq.tokens) - seq.n_cached
            take = 1 if pending == 1 else min(pending, budget)
            if take == 0:
                break
            if pending > 1:
                budget -= take
            echo = seq.echoing  # echo: every prompt position's logits
            # positions continue exactly where the sequence's cells end: llama.cpp aborts the process otherwise
            for j in range(take):
                pos = seq.n_cached + j
                b.token[n + j] = seq.tokens[pos]
                b.pos[n + j] = pos
                b.n_seq_id[n + j] = 1
                b.seq_id[n + j][0] = seq.seq_id
                b.logits[n + j] = echo
            done = take == pending
            if done:
                b.logits[n + take - 1] = 1
            draft = drafts.get(seq, [])
            for j, token in enumerate(draft, start=take):  # after the pending token, each with its logits
                b.token[n + j] = token
                b.pos[n + j] = seq.n_cached + j
                b.n_seq_id[n + j] = 1
                b.seq_id[n + j][0] = seq.seq_id
                b.logits[n + j] = 1
            plan.append((seq, take + len(draft), n + take - 1 if done else -1, n, draft))
            n += take + len(draft)
        b.n_tokens = n
        return plan

    def _preempt(self, seq: _Seq) -> None:
        """Give a running request's cells back; it waits at the front of the queue to be recomputed."""
        logger.info(
            "KV cache full: preempting request %s (%d tokens) to recompute later", seq.request.request_id, seq.n_cached
        )
        llama.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        self._free_ids.append(seq.seq_id)
        seq.seq_id, seq.n_cached, seq.borrowed = -1, 0, 0
        self._seqs.preempt(seq)

    # -- sampling -----------------------------------------------------------------------------------------------

    def _sampler(self, p: SamplingParams) -> Any:
        """The request's chain: logit bias, penalties, then greedy, or top-k, top-p, min-p, temperature and a draw
        from its own seeded generator."""
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = functools.partial(llama.llama_sampler_chain_add, chain)
        if p.logit_bias:
            biases = (llama.llama_logit_bias * len(p.logit_bias))(
                *(llama.llama_logit_bias(t, b) for t, b in p.logit_bias)
            )
            add(llama.llama_sampler_init_logit_bias(self._vocab_size, len(p.logit_bias), biases))
        if p.presence_penalty or p.frequency_penalty:
            # over every token generated so far (the chain accepts each sampled token); repeat penalty off
            add(
                llama.llama_sampler_init_penalties(
                    self._vocab_size, self._max_model_len, 1.0, p.frequency_penalty, p.presence_penalty
                )
            )
        if p.greedy:
            add(llama.llama_sampler_init_greedy())
            return chain
        if p.top_k > 0:
            add(llama.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1:
            add(llama.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            add(llama.llama_sampler_init_min_p(p.min_p, 1))
        add(llama.llama_sampler_init_temp(p.temperature))
        # llama.cpp seeds are 32 bits and LLAMA_DEFAULT_SEED (0xFFFFFFFF) means "random": fold below it
        seed = llama.LLAMA_DEFAULT_SEED if p.seed is None else p.seed % llama.LLAMA_DEFAULT_SEED
        add(llama.llama_sampler_init_dist(seed))
        return chain

    # -- leaving ------------------------------------------------------------------------------------------------

    def _release_finished(self) -> None:
        for seq in self._seqs.drop_finished():
            self._release(seq)
        if not self._seqs.running and (self._cache is None or not self._cache.entries(Tier.KV)):
            # an empty pool starts again from its first cell: a request alone in it then lands on the same cells
            # as the last one did, so its attention sums in the same order (what `max_num_seqs=1` without the
            # prefix cache needs to answer identical requests identically)
            llama.llama_memory_clear(self._memory, False)

    def _release(self, seq: _Seq) -> None:
        """Free a finished request's sampler and, if it ran, its KV cells and sequence id."""
        llama.llama_sampler_free(seq.sampler)
        if seq.seq_id >= 0:
            done = seq.finish in (FinishReason.STOP, FinishReason.LENGTH)
            if self._cache is not None and done and seq.n_cached >= MIN_PREFIX_REUSE:
                self._keep_prefix(seq)
            llama.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
            self._free_ids.append(seq.seq_id)
            seq.seq_id, seq.borrowed = -1, 0


class _RawLogprobs:
    """The log-softmax of one position's raw logits, computed only where asked: the log of the normalizer (float32
    exponentials summed in float64) and the k most likely tokens."""

    def __init__(self, logits: Any, k: int | None) -> None:
        self._logits = logits
        top = float(logits.max())
        self._log_z = top + math.log(float(np.exp(logits - top).sum(dtype=np.float64)))
        best = _top_ids(logits, top, min(k or 0, len(logits)))
        self._top = tuple((i, float(logits[i]) - self._log_z) for i in best)

    def of(self, token: int) -> TokenLogprob:
        return TokenLogprob(token, float(self._logits[token]) - self._log_z, self._top)


def _top_ids(logits: Any, top: float, k: int) -> list[int]:
    """The ids of the k largest logits, largest first. The few within a margin of the largest are found first (a
    full partition of the vocabulary costs more than the rest of the log probabilities)."""
    if k == 0:
        return []
    margin = 8.0
    while True:
        candidates = np.flatnonzero(logits >= top - margin)
        if len(candidates) >= k:
            break
        margin *= 4
    if len(candidates) > 4 * k:
        candidates = candidates[np.argpartition(logits[candidates], -k)[-k:]]
    return [int(i) for i in candidates[np.argsort(-logits[candidates], kind="stable")[:k]]]
