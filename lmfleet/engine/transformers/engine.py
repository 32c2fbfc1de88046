"""Continuous batching over a Hugging Face causal LM (transformers 5.x, full-attention decoder models).

Owns: the model, one batched KV cache for the running batch (padding, merging and trimming its rows), per-request
sampling state (a `torch.Generator` per sampled request, token counts for penalties), the prefill budget, prefilling
from a cached prefix, and the `step()` loop. Speaks token ids only. Does not own: the sequences' bookkeeping (queue,
admission order, aborts, finishing: `lmfleet.engine.sequences`), the cached prefixes themselves
(`lmfleet.engine.transformers.prefix`), threads (`lmfleet.engine.runner`), text, HTTP.

How the batch is kept (one `DynamicCache` shared by every running sequence):

    column:    0   1   2   3   4   5   6        every row is right-aligned: the newest token of every
    row 0:     .   .   a0  a1  a2  a3  a4       sequence sits in the last column, so one decode forward
    row 1:     b0  b1  b2  b3  b4  b5  b6       appends one column for all rows. `pad[i]` counts row i's
    row 2:     .   .   .   .   c0  c1  c2       leading padding; the 2D mask is `column >= pad[i]`, and
                                                 each row's position ids count its own tokens only.

One `step()`:
  1. apply aborts (rows dropped, waiting requests removed; each gets an ABORT output);
  2. decode: one forward over every running row (`logits_to_keep=1`), sample per request, finish rows on
     eos / stop ids / max_new_tokens / max_model_len; finished rows leave by index selection and leading columns
     that are padding in every remaining row are trimmed;
  3. admit waiting requests (FIFO) up to `max_num_seqs` running and `max_batch_tokens` padded prefill tokens (a
     single longer prompt is still admitted, alone), prefill them together in a fresh cache, sample their first
     token, and merge that cache into the running one (the shorter side padded on the left, rows concatenated).

Prefix cache (`prefix_cache=True`, the default): a prompt's keys and values are offered to the cache once prefilled,
and a request's prompt and output when it leaves the batch (finished or aborted, so a resumed stream finds them).
An admitted request whose prompt starts with a cached prefix (at least `MIN_REUSE` tokens, all but its last token at
most) starts from it: the fresh cache's first columns hold each row's cached prefix, right-aligned, and the prefill
computes only the rest, at positions that continue the prefix's (a row is `[pad][cached][pad][computed]`, the
padding masked), then closes each row's gap before the merge. Admission counts the tokens computed, not the cached
ones. A request that asks for its prompt's log probabilities computes its whole prompt. Cached keys and values were
computed in another batch, so (as with batch companions) reusing them can turn a near-tie, in lower precisions more
than in float32; `prefix_cache=False` turns the cache off.

Log probabilities (`SamplingParams.logprobs`) are the log-softmax of a row's raw logits, computed once per step
for the rows that ask, before sampling touches them; a prompt's (`prompt_logprobs`, for echo) come from a prefill
that keeps every position's logits ([prompt, vocab] floats), so such a request is prefilled alone.

A request's output never depends on its batch companions beyond floating-point rounding: padding is masked,
positions are per row, and a seeded request draws from its own generator exactly once per token.
Memory grows with what is cached; nothing is reserved up front. End-of-sequence and stop token ids are never
returned in `new_token_ids` (see `lmfleet.engine.base`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from lmfleet.engine.base import (
    BatchSettings,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    TokenLogprob,
)
from lmfleet.engine.sequences import Outputs, Seq, Sequences
from lmfleet.engine.transformers.prefix import CachedPrefix, PrefixKV

logger = logging.getLogger("lmfleet.engine")


@dataclass(eq=False)
class _Seq(Seq):
    """A sequence's sampling state (its last token sampled is not in the cache yet; its prompt's log probabilities
    are computed at prefill)."""

    generator: torch.Generator | None = None  # None for greedy requests
    counts: torch.Tensor | None = None  # generated-token counts over the vocabulary, only when penalties are set
    hit: CachedPrefix | None = None  # its prompt's cached leading tokens, found at admission, until its prefill


@dataclass
class _Batch:
    """The running batch's shared cache and each row's left padding; its rows are the running sequences, in order."""

    cache: DynamicCache | None = None
    pads: list[int] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0


class TransformersEngine:
    """The `Engine` protocol over a transformers causal LM. Single-threaded: call everything from one thread."""

    def __init__(
        self,
        model: Any,
        *,
        max_num_seqs: int = BatchSettings.max_num_seqs,
        max_batch_tokens: int = BatchSettings.max_batch_tokens,
        max_model_len: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        prefix_cache: bool = BatchSettings.prefix_cache,
        prefix_cache_host_bytes: int | None = BatchSettings.prefix_cache_host_bytes,
    ) -> None:
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_tokens must be positive")
        model.eval()
        self._model = model
        self._config = model.config.get_text_config(decoder=True)
        self._device = next(model.parameters()).device
        probe = DynamicCache(config=model.config)
        if any(type(layer) is not DynamicLayer for layer in probe.layers):
            raise ValueError(
                "TransformersEngine supports full-attention decoder models only (no sliding/linear layers)"
            )
        limit = getattr(self._config, "max_position_embeddings", None)
        if max_model_len is None:
            if limit is None:
                raise ValueError("the model config has no max_position_embeddings: pass max_model_len")
            max_model_len = int(limit)
        elif limit is not None and max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}")
        self._max_model_len = int(max_model_len)
        self._vocab_size = int(self._config.vocab_size)
        if eos_token_ids is None:
            eos_token_ids = _ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None)) or _ids(
                getattr(self._config, "eos_token_id", None)
            )
        self._eos = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        pad = _ids(getattr(self._config, "pad_token_id", None)) or self._eos or (0,)
        self._pad_id = pad[0]
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens

        self._seqs = Sequences[_Seq](
            max_num_seqs=max_num_seqs,
            max_model_len=self._max_model_len,
            vocab_size=self._vocab_size,
            eos_token_ids=self._eos,
        )
        self._batch = _Batch()
        self._greedy_batch = True  # every running row greedy without penalties: one argmax per step
        self._prefix = PrefixKV(prefix_cache_host_bytes) if prefix_cache else None

    # -- the Engine protocol ------------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def model(self) -> Any:
        return self._model

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def prefix_cache_budget(self) -> int | None:
        """The bytes the prefix cache may hold in host memory; None when it is off."""
        return self._prefix.budget if self._prefix is not None else None

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request that fits (lmfleet.engine.base); EngineRejected for a sampling option it cannot run."""
        self._seqs.add(request, self._new_seq)

    def _new_seq(self, request: EngineRequest, stop_ids: frozenset[int]) -> _Seq:
        p = request.params
        seq = _Seq(request, stop_ids)
        if p.temperature > 0:
            seq.generator = torch.Generator(device=self._device)
            seq.generator.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        if p.presence_penalty or p.frequency_penalty:
            seq.counts = torch.zeros(self._vocab_size, dtype=torch.float32, device=self._device)
        return seq

    def abort_request(self, request_id: str) -> None:
        self._seqs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self._seqs.has_unfinished()

    def stats(self) -> EngineStats:
        stats = self._seqs.stats(
            tokens_in_flight=sum(len(s.tokens) - 1 for s in self._seqs.running),
            kv_capacity=self.max_num_seqs * self._max_model_len,  # grows with use; at most this
        )
        if self._prefix is None:
            return stats
        p = self._prefix
        return replace(stats, prefix_cache_queries=p.queries, prefix_cache_hits=p.hits, prefix_cache_host_bytes=p.bytes)

    def step(self) -> list[EngineOutput]:
        outputs = Outputs()
        with torch.inference_mode():
            self._seqs.apply_aborts(outputs)
            self._drop_finished()
            if self._seqs.running:
                self._decode(outputs)
            admitted = self._seqs.admit(self._fits_prefill)
            if admitted:
                self._prefill(admitted, outputs)
        return outputs.list()

    # -- the steps ----------------------------------------------------------------------------------------------

    def _decode(self, outputs: Outputs) -> None:
        b = self._batch
        rows = self._seqs.running
        dev = self._device
        try:
            input_ids = torch.tensor([[s.tokens[-1]] for s in rows], dtype=torch.long, device=dev)
            position_ids = torch.tensor([[len(s.tokens) - 1] for s in rows], dtype=torch.long, device=dev)
            mask = None
            if any(b.pads):
                cols = torch.arange(b.width + 1, device=dev)
                mask = (cols[None, :] >= torch.tensor(b.pads, device=dev)[:, None]).long()
            out = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                cache=b.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logprobs = _raw_logprobs(out.logits[:, -1, :], rows)
            tokens = self._sample(out.logits[:, -1, :], rows, self._greedy_batch)
        except Exception as exc:  # a failed forward fails the batch, never the engine
            logger.exception("decode step failed; failing %d running requests", len(rows))
            self._fail(rows, exc, outputs)
            self._seqs.drop_finished()
            self._batch, self._greedy_batch = _Batch(), True
            return
        self._seqs.decoded += len(rows)
        for seq, token, lp in zip(rows, tokens, logprobs(tokens), strict=True):
            self._advance(seq, token, outputs, lp)
        self._drop_finished()

    def _fits_prefill(self, seq: _Seq, taken: list[_Seq]) -> bool:
        """Admit `seq` into this step's prefill if the padded prefill (longest part to compute x prompts) stays
        within `max_batch_tokens` (a single longer prompt is still admitted, alone), and neither it nor the prefill
        holds a request that keeps every position's logits (echo), which is prefilled alone. Looks up its prompt's
        cached prefix first (never for an echo, which computes its whole prompt)."""
        prompt = seq.request.prompt_token_ids
        seq.hit = None if self._prefix is None or _echoes(seq) else self._prefix.match(prompt[:-1])
        if not taken:
            return True
        longest = max(_to_compute(s) for s in [*taken, seq])
        if (len(taken) + 1) * longest > self.max_batch_tokens or _echoes(taken[0]) or _echoes(seq):
            seq.hit = None
            return False
        return True

    def _prefill(self, seqs: list[_Seq], outputs: Outputs) -> None:
        """Prefill the admitted `seqs` together in a fresh cache, then merge it into the batch's.

        A sequence with a cached prefix of `c` tokens starts from that prefix's K/V (the cache's leading columns,
        right-aligned like the rows) and computes only the rest of its prompt, at positions c.., its padding in the
        middle masked; the rows are then made contiguous again (one gather per layer) before the merge."""
        dev = self._device
        hits = [s.hit.length if s.hit is not None else 0 for s in seqs]
        lengths = [len(s.request.prompt_token_ids) - c for s, c in zip(seqs, hits, strict=True)]
        width, past = max(lengths), max(hits)
        pads = [width - n for n in lengths]  # each row's padding before its computed part
        past_pads = [past - c for c in hits]  # and before its cached part
        for seq, cached in zip(seqs, hits, strict=True):
            seq.cached_tokens = cached  # reported on its first output
        try:
            ids = torch.tensor(
                [[self._pad_id] * p + s.request.prompt_token_ids[c:] for s, p, c in zip(seqs, pads, hits, strict=True)],
                dtype=torch.long,
                device=dev,
            )
            cols = torch.arange(width, device=dev)[None, :]
            pad_t = torch.tensor(pads, device=dev)[:, None]
            position_ids = (cols - pad_t).clamp(min=0) + torch.tensor(hits, device=dev)[:, None]
            mask = None
            if any(past_pads):
                past_cols = torch.arange(past, device=dev)[None, :]
                mask = torch.cat([past_cols >= torch.tensor(past_pads, device=dev)[:, None], cols >= pad_t], 1).long()
            elif any(pads):
                mask = torch.cat([torch.ones(len(seqs), past, dtype=torch.bool, device=dev), cols >= pad_t], 1).long()
            cache = self._prefill_cache(seqs, past, past_pads, width)
            echo = any(s.params.prompt_logprobs is not None for s in seqs)
            out = self._model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=0 if echo else 1,  # every position's logits only when a prompt's logprobs are asked
            )
            if echo:
                _prompt_logprobs(out.logits, seqs, pads)  # an echo is prefilled alone, from no cached prefix
            logprobs = _raw_logprobs(out.logits[:, -1, :], seqs)
            tokens = self._sample(out.logits[:, -1, :], seqs, _all_greedy(seqs))
            if past:
                pads = _close_gaps(cache, past_pads, pads, past)
        except Exception as exc:
            logger.exception("prefill failed; failing %d new requests", len(seqs))
            self._fail(seqs, exc, outputs)
            self._seqs.drop_finished()  # the last rows of `running`, never in the cache
            return
        finally:
            for seq in seqs:
                seq.hit = None
        self._seqs.prefilled += sum(lengths)
        if self._prefix is not None:
            self._prefix.count(sum(len(s.request.prompt_token_ids) for s in seqs if not _echoes(s)), sum(hits))
            self._remember(cache, [(i, pads[i], s.request.prompt_token_ids) for i, s in enumerate(seqs)])
        for seq, token, lp in zip(seqs, tokens, logprobs(tokens), strict=True):
            self._advance(seq, token, outputs, lp)
        try:
            self._merge(_Batch(cache, pads))
        except Exception as exc:
            logger.exception("merging new requests into the batch failed; failing the batch")
            self._fail([s for s in self._seqs.running if s.finish is None], exc, outputs)
            self._seqs.drop_finished()
            self._batch, self._greedy_batch = _Batch(), True
            return
        self._drop_finished()

    def _prefill_cache(self, seqs: list[_Seq], past: int, past_pads: list[int], width: int) -> DynamicCache:
        """A fresh cache for a prefill: empty, or with each row's cached prefix in its first `past` columns
        (right-aligned, zeros before it) and room for the `width` columns the prefill computes, every layer's keys
        and values views into one buffer (one copy per cached span fills every layer)."""
        cache = DynamicCache(config=self._model.config)
        layers = [_GrowingLayer() for _ in cache.layers]
        cache.layers = list(layers)
        if not past:
            return cache
        like = next(s.hit for s in seqs if s.hit is not None).like  # [layers, 2, kv heads, tokens, head dim]
        n_layers, _, heads, _, dim = like.shape
        shape = (n_layers, 2, len(seqs), heads, past + width + _GrowingLayer.SPARE, dim)
        buffer = torch.empty(shape, dtype=like.dtype, device=self._device)
        for row, (seq, pad) in enumerate(zip(seqs, past_pads, strict=True)):
            buffer[:, :, row, :, :pad] = 0  # padding is masked, but must hold numbers (0 x NaN is NaN)
            if seq.hit is not None:
                seq.hit.copy_into(buffer[:, :, row, :, pad:past])
        for i, layer in enumerate(layers):
            layer.start(buffer[i, 0], buffer[i, 1], past)
        return cache

    def _remember(self, cache: DynamicCache, rows: Iterable[tuple[int, int, list[int]]]) -> None:
        """Offer the prefix cache each (row, padding, tokens) of `cache`: the row's columns from its padding on hold
        the keys and values of `tokens`; the prefix cache takes a copy of what it does not hold yet."""
        assert self._prefix is not None
        layers: list[Any] = list(cache.layers)
        like = layers[0].keys  # [rows, kv heads, columns, head dim], as every layer's keys and values
        token_bytes = 2 * len(layers) * like.shape[1] * like.shape[3] * like.element_size()
        for row, pad, tokens in rows:

            def span(start: int, end: int, row: int = row, pad: int = pad) -> torch.Tensor:
                out = like.new_empty((len(layers), 2, like.shape[1], end - start, like.shape[3]), device="cpu")
                for i, lay in enumerate(layers):
                    out[i, 0].copy_(lay.keys[row, :, pad + start : pad + end])
                    out[i, 1].copy_(lay.values[row, :, pad + start : pad + end])
                return out

            self._prefix.store(tokens, span, token_bytes)

    # -- sampling -----------------------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, seqs: Sequence[_Seq], greedy: bool) -> list[int]:
        """One token per row. `logits` is [rows, vocab] for `seqs` in order."""
        logits = _apply_constraints(logits, seqs)
        if greedy:
            return logits.argmax(dim=-1).tolist()
        logits = logits.float()
        penalized = [i for i, s in enumerate(seqs) if s.counts is not None]
        if penalized:
            logits = logits.clone()
            for i in penalized:
                s = seqs[i]
                counts = s.counts
                assert counts is not None
                logits[i] -= s.params.frequency_penalty * counts + s.params.presence_penalty * (counts > 0).float()
        biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        if biased:
            logits = logits.clone() if not penalized else logits
            for i in biased:
                ids, values = zip(*seqs[i].params.logit_bias, strict=True)
                logits[i, list(ids)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, s in enumerate(seqs) if s.generator is not None]
        if sampled:
            params = [seqs[i].params for i in sampled]
            x = logits[sampled] / torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
            if any(p.top_k > 0 or p.top_p < 1 for p in params):
                x = _top_k_top_p(
                    x,
                    torch.tensor([p.top_k for p in params], device=x.device),
                    torch.tensor([p.top_p for p in params], device=x.device, dtype=x.dtype),
                )
            probs = x.softmax(dim=-1)
            if any(p.min_p > 0 for p in params):
                min_p = torch.tensor([p.min_p for p in params], device=x.device, dtype=probs.dtype)[:, None]
                probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
            picks = [torch.multinomial(probs[j], 1, generator=seqs[i].generator) for j, i in enumerate(sampled)]
            for i, t in zip(sampled, torch.cat(picks).tolist(), strict=True):
                tokens[i] = t
        return tokens

    # -- the batch ----------------------------------------------------------------------------------------------

    def _advance(self, seq: _Seq, token: int, outputs: Outputs, logprob: TokenLogprob | None) -> None:
        """Record a sampled token (lmfleet.engine.sequences) and count it for the penalties of a sequence going on."""
        if not self._seqs.advance(seq, token, outputs, logprob) and seq.counts is not None:
            seq.counts[token] += 1

    def _fail(self, seqs: list[_Seq], exc: Exception, outputs: Outputs) -> None:
        self._seqs.fail(seqs, f"engine failure: {type(exc).__name__}: {exc}", outputs)

    def _drop_finished(self) -> None:
        """Remove finished sequences; their rows leave the batch (index selection) and columns that are then padding
        everywhere are trimmed."""
        b = self._batch
        keep = [i for i, s in enumerate(self._seqs.running) if s.finish is None]
        rows = len(self._seqs.running)
        if len(keep) == rows:
            self._seqs.drop_finished()
            return
        if self._prefix is not None and b.cache is not None:  # what the finished computed, for later requests
            width = b.width
            done = [(i, s) for i, s in enumerate(self._seqs.running) if s.finish not in (None, FinishReason.ERROR)]
            self._remember(b.cache, [(i, b.pads[i], s.tokens[: width - b.pads[i]]) for i, s in done])
        self._seqs.drop_finished()
        if not keep:
            self._batch = _Batch()
            self._greedy_batch = True
            return
        pads = [b.pads[i] for i in keep]
        trim = min(pads)
        index = torch.tensor(keep, device=self._device)
        assert b.cache is not None
        layer: Any  # every layer is a full-attention layer with tensors (checked in __init__)
        for layer in b.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self._batch = _Batch(b.cache, [p - trim for p in pads])
        self._greedy_batch = _all_greedy(self._seqs.running)

    def _merge(self, new: _Batch) -> None:
        """Append the rows of a freshly prefilled batch (the last sequences of `running`) to the batch's cache."""
        old = self._batch
        if old.cache is None:
            self._batch = new
        else:
            assert new.cache is not None
            w_old, w_new = old.width, new.width
            width = max(w_old, w_new)
            lo: Any
            ln: Any
            for lo, ln in zip(old.cache.layers, new.cache.layers, strict=True):
                lo.keys = torch.cat([_pad_left(lo.keys, width - w_old), _pad_left(ln.keys, width - w_new)])
                lo.values = torch.cat([_pad_left(lo.values, width - w_old), _pad_left(ln.values, width - w_new)])
            self._batch = _Batch(
                old.cache, [p + width - w_old for p in old.pads] + [p + width - w_new for p in new.pads]
            )
        self._greedy_batch = _all_greedy(self._seqs.running)


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a buffer with spare columns.

    `DynamicLayer.update` concatenates, copying the whole cache of every layer at every decode step (about a tenth
    of a step here); this one writes the new column in place and copies only when the buffer is full, or after the
    engine has replaced `keys`/`values` (rows merged, dropped or trimmed), when it adopts them into a new buffer.
    """

    SPARE = 64  # columns added per reallocation

    def __init__(self) -> None:
        super().__init__()
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._used = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        kbuf, vbuf = self._kbuf, self._vbuf
        assert self.keys is not None and self.values is not None
        adopted = kbuf is not None and self.keys.data_ptr() == kbuf.data_ptr() and self.keys.shape[-2] == self._used
        if kbuf is None or vbuf is None or not adopted or self._used + new > kbuf.shape[-2]:
            old_k = self.keys if self.keys.numel() else key_states[..., :0, :]
            old_v = self.values if self.values.numel() else value_states[..., :0, :]
            used = old_k.shape[-2]
            b, h, _, _ = key_states.shape
            kbuf = key_states.new_empty((b, h, used + new + self.SPARE, key_states.shape[-1]))
            vbuf = value_states.new_empty((b, h, used + new + self.SPARE, value_states.shape[-1]))
            kbuf[..., :used, :] = old_k
            vbuf[..., :used, :] = old_v
            self._kbuf, self._vbuf, self._used = kbuf, vbuf, used
        kbuf[..., self._used : self._used + new, :] = key_states
        vbuf[..., self._used : self._used + new, :] = value_states
        self._used += new
        self.keys = kbuf[..., : self._used, :]
        self.values = vbuf[..., : self._used, :]
        return self.keys, self.values

    def start(self, keys: torch.Tensor, values: torch.Tensor, used: int) -> None:
        """Begin with buffers whose first `used` columns are filled (a prefill's cached prefixes)."""
        self.device = keys.device
        self.is_initialized = True
        self._kbuf, self._vbuf, self._used = keys, values, used
        self.keys = keys[..., :used, :]
        self.values = values[..., :used, :]


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _all_greedy(seqs: Iterable[_Seq]) -> bool:
    """Every row takes the plain argmax of its logits: one argmax for the whole batch."""
    return all(s.generator is None and s.counts is None and not s.params.logit_bias for s in seqs)


def _apply_constraints(logits: torch.Tensor, seqs: Sequence[_Seq]) -> torch.Tensor:
    """`logits` with every id a row's constraint does not allow next set to -inf (rows without one untouched)."""
    rows = [i for i, s in enumerate(seqs) if s.params.constraint is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    shifts = torch.arange(8, dtype=torch.uint8)
    allowed = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for j, i in enumerate(rows):
        constraint = seqs[i].params.constraint
        assert constraint is not None
        bits = torch.frombuffer(bytearray(constraint.allowed()), dtype=torch.uint8)
        unpacked = ((bits[:, None] >> shifts) & 1).flatten().bool()[:vocab]
        allowed[j, : unpacked.numel()] = unpacked
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits


def _raw_logprobs(logits: torch.Tensor, seqs: Sequence[_Seq]) -> Callable[[list[int]], list[TokenLogprob | None]]:
    """The log-softmax of the raw logits ([rows, vocab]) of the rows that ask for log probabilities, taken before
    any sampling step changes them; returns a function of the sampled tokens giving each row's `TokenLogprob`."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return lambda tokens: [None] * len(tokens)
    lsm = logits[rows].float().log_softmax(dim=-1)

    def pick(tokens: list[int]) -> list[TokenLogprob | None]:
        found = _token_logprobs(lsm, [tokens[i] for i in rows], [seqs[i].params.logprobs or 0 for i in rows])
        out: list[TokenLogprob | None] = [None] * len(tokens)
        for i, lp in zip(rows, found, strict=True):
            out[i] = lp
        return out

    return pick


def _prompt_logprobs(logits: torch.Tensor, seqs: Sequence[_Seq], pads: Sequence[int]) -> None:
    """Each prompt token's log probability (after the first) for the rows that ask, from a prefill's logits at every
    position ([rows, width, vocab], rows left-padded by `pads`)."""
    for i, (seq, pad) in enumerate(zip(seqs, pads, strict=True)):
        k = seq.params.prompt_logprobs
        if k is None:
            continue
        prompt = seq.request.prompt_token_ids
        lsm = logits[i, pad : pad + len(prompt) - 1].float().log_softmax(dim=-1)
        seq.prompt_logprobs = [None, *_token_logprobs(lsm, prompt[1:], [k] * (len(prompt) - 1))]


def _token_logprobs(lsm: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """Row j of the log-probabilities `lsm`: token j's value and the ks[j] most likely (id, value)."""
    if not tokens:
        return []
    chosen = lsm.gather(1, torch.tensor(tokens, device=lsm.device)[:, None])[:, 0].tolist()
    k = max(ks)
    top_v, top_i = lsm.topk(k, dim=-1) if k else (lsm[:, :0], lsm[:, :0].long())
    values, ids = top_v.tolist(), top_i.tolist()
    return [
        TokenLogprob(t, c, tuple(zip(ids[j][:kj], values[j][:kj], strict=True)))
        for j, (t, c, kj) in enumerate(zip(tokens, chosen, ks, strict=True))
    ]


def _echoes(seq: _Seq) -> bool:
    return seq.params.prompt_logprobs is not None


def _to_compute(seq: _Seq) -> int:
    """The prompt tokens a sequence's prefill computes: those after its cached prefix."""
    return len(seq.request.prompt_token_ids) - (seq.hit.length if seq.hit is not None else 0)


def _close_gaps(cache: DynamicCache, past_pads: list[int], pads: list[int], past: int) -> list[int]:
    """Make each row of a prefill cache contiguous again and return its left padding.

    Row i was `[past_pads[i] padding][its cached prefix][pads[i] padding][what the prefill computed]`, the first
    two parts in `past` columns; it becomes `[padding][cached prefix][computed]`, right-aligned, with the columns
    that are then padding in every row trimmed."""
    if not any(pads):
        return past_pads
    layers: list[Any] = list(cache.layers)
    width = layers[0].keys.shape[2]
    dev = layers[0].keys.device
    cols = torch.arange(width, device=dev)[None, :]
    pad_t = torch.tensor(pads, device=dev)[:, None]
    lead = [pp + p for pp, p in zip(past_pads, pads, strict=True)]
    cached = (cols >= torch.tensor(lead, device=dev)[:, None]) & (cols < past + pad_t)
    trim = min(lead)
    source = torch.where(cached, cols - pad_t, cols)[:, trim:]
    for layer in layers:
        index = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)
    return [n - trim for n in lead]


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad a [batch, heads, seq, dim] cache tensor with `n` zero columns on the left of the sequence dim."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus (of the top-k renormalized)."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    vocab = x.shape[-1]
    ranks = torch.arange(vocab, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    sorted_x = sorted_x.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token; the first is always kept
    sorted_x = sorted_x.masked_fill(before > top_p[:, None], float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)
