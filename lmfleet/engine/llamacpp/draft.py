"""A draft model for speculative decoding in the llama.cpp engine: a second, smaller GGUF model of the same vocabulary
with its own context, which proposes each speculating row's next tokens greedily.

Owns the draft model, its context and batch, and which tokens each of its sequences holds. A row is known by the
target's llama.cpp sequence id, which is also its sequence id here. The draft keeps itself in step with the rows
lazily: before drafting it compares what a sequence holds with the row's tokens (prompt + generated), drops its cells
past the shared prefix (rejected drafts, or an earlier request that had the same sequence id) and computes the rest
in the same decode as the other rows' catch-up; then each further drafted token is one decode over every row still
drafting. A decode that fails (its cache full of sequences no longer speculating) clears the draft's cache and
drafts nothing that step: the target goes on without speculation.

Does not own: the verification and when a row speculates (lmfleet.engine.speculative, the engine), the target's
cache. llama.cpp is initialised by the engine before this loads.
"""

from __future__ import annotations

import logging
from typing import Any

import llama_cpp.llama_cpp as llama
import numpy as np

logger = logging.getLogger("lmfleet.engine")


class DraftModel:
    """The draft model for one engine. Single-threaded like the engine; `close()` frees it."""

    def __init__(
        self,
        model_path: str,
        target: Any,
        *,
        n_ctx: int,
        n_seq_max: int,
        n_batch: int,
        n_threads: int,
        flash_attn: bool,
    ) -> None:
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._held: dict[int, list[int]] = {}  # sequence id -> the tokens its cells hold, at positions 0..len-1
        params = llama.llama_model_default_params()
        params.use_extra_bufts = False  # as the engine's model (lmfleet.engine.llamacpp.engine)
        self._model = llama.llama_model_load_from_file(model_path.encode(), params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load the draft model {model_path}")
        try:
            self._vocab_size = _check_vocabularies(model_path, self._model, target)
            ctx_params = llama.llama_context_default_params()
            ctx_params.n_ctx = n_ctx
            ctx_params.n_batch = n_batch
            ctx_params.n_seq_max = n_seq_max
            ctx_params.n_threads = ctx_params.n_threads_batch = n_threads
            ctx_params.kv_unified = True
            ctx_params.flash_attn_type = (
                llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            ctx_params.no_perf = True
            self._ctx = llama.llama_init_from_model(self._model, ctx_params)
            if not self._ctx:
                raise ValueError("llama.cpp could not create the draft model's context")
            self._memory = llama.llama_get_memory(self._ctx)
            self._n_batch = n_batch
            self._batch = llama.llama_batch_init(n_batch, 0, 1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None

    def propose(self, rows: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """For each (sequence id, tokens, k): the k tokens the draft model predicts greedily after `tokens`. All rows
        draft nothing when the draft's decode fails."""
        drafts: list[list[int]] = [[] for _ in rows]
        # catch up: every row's tokens not held yet (at least its last, for the logits), in batches of n_batch
        items: list[tuple[int, int, int, int]] = []  # (row, sequence id, position, token)
        for r, (seq_id, tokens, _) in enumerate(rows):
            held = self._held.get(seq_id, [])
            shared = _shared_prefix(held, tokens, len(tokens) - 1)
            if shared < len(held):
                llama.llama_memory_seq_rm(self._memory, seq_id, shared, -1)
            self._held[seq_id] = list(tokens)
            items.extend((r, seq_id, pos, tokens[pos]) for pos in range(shared, len(tokens)))
        last = {r: i for i, (r, *_) in enumerate(items)}  # the index of each row's last item
        for start in range(0, len(items), self._n_batch):
            chunk = items[start : start + self._n_batch]
            wants = [(r, j) for j, (r, *_) in enumerate(chunk) if last[r] == start + j]
            if not self._decode([(seq_id, pos, token) for _, seq_id, pos, token in chunk], [j for _, j in wants]):
                return [[] for _ in rows]
            for r, j in wants:
                drafts[r].append(self._argmax(j))
        # then one decode per further token, over the rows still drafting
        while True:
            going = [r for r, (_, _, k) in enumerate(rows) if len(drafts[r]) < k]
            if not going:
                return drafts
            batch = []
            for r in going:
                seq_id, tokens, _ = rows[r]
                pos, token = len(tokens) + len(drafts[r]) - 1, drafts[r][-1]
                batch.append((seq_id, pos, token))
                self._held[seq_id].append(token)
            if not self._decode(batch, list(range(len(batch)))):
                return [[] for _ in rows]
            for j, r in enumerate(going):
                drafts[r].append(self._argmax(j))

    def _decode(self, items: list[tuple[int, int, int]], logits_at: list[int]) -> bool:
        """One llama_decode of (sequence id, position, token) items with logits at the given indices; on failure
        the draft's cache is cleared (the next proposal recomputes) and False returned."""
        b = self._batch
        for j, (seq_id, pos, token) in enumerate(items):
            b.token[j] = token
            b.pos[j] = pos
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = seq_id
            b.logits[j] = 0
        for j in logits_at:
            b.logits[j] = 1
        b.n_tokens = len(items)
        rc = llama.llama_decode(self._ctx, b)
        if rc != 0:
            logger.info("draft model decode returned %d: clearing its cache, no drafts this step", rc)
            llama.llama_memory_clear(self._memory, True)
            self._held.clear()
        return rc == 0

    def _argmax(self, index: int) -> int:
        logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(self._ctx, index), shape=(self._vocab_size,))
        return int(np.argmax(logits))


def _shared_prefix(held: list[int], tokens: list[int], limit: int) -> int:
    """How many leading tokens `held` and `tokens` share, at most `limit`."""
    n = min(len(held), limit)
    i = 0
    while i < n and held[i] == tokens[i]:
        i += 1
    return i


def _check_vocabularies(path: str, draft: Any, target: Any) -> int:
    """The shared vocabulary's size; ValueError unless the draft model's vocabulary is the target's, token for token
    (its drafted ids must mean the target's tokens)."""
    dv, tv = llama.llama_model_get_vocab(draft), llama.llama_model_get_vocab(target)
    n = int(llama.llama_vocab_n_tokens(dv))
    if n != int(llama.llama_vocab_n_tokens(tv)) or llama.llama_vocab_type(dv) != llama.llama_vocab_type(tv):
        raise ValueError(f"the draft model {path} does not use the model's vocabulary (a different tokenizer)")
    for token in range(n):
        if llama.llama_vocab_get_text(dv, token) != llama.llama_vocab_get_text(tv, token):
            raise ValueError(f"the draft model {path} does not use the model's vocabulary (token {token} differs)")
    return n
