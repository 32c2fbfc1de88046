"""`PoolingEngine`: one forward of a transformers encoder over a batch of token-id sequences, pooled per sequence;
`CrossEncoderEngine`: one forward of a sequence classifier over a batch of (query, document) pairs, a score each.

Right-padded batch with an attention mask; pooling (mean, cls, max, last token) over the real tokens only, then L2
normalization when the model prescribes it (lmfleet.engine.embedding.config.Pooling). Vectors come back as float32
values. A pair's score is its single logit, in float32, through the model's activation
(lmfleet.engine.embedding.config.Scoring), with the pair's segment ids for a model that takes them. Does not own:
batching requests together (lmfleet.engine.pooling), text, HTTP.
"""

from __future__ import annotations

from typing import Any

import torch

from lmfleet.engine.base import TokenPair
from lmfleet.engine.embedding.config import Pooling


class PoolingEngine:
    def __init__(
        self,
        model: Any,
        pooling: Pooling,
        *,
        max_model_len: int,
        pad_token_id: int,
        matryoshka_dimensions: tuple[int, ...] | None,
        max_num_seqs: int,
        max_batch_tokens: int,
    ) -> None:
        self.model = model
        self.pooling = pooling
        self._max_model_len = max_model_len
        self._pad = pad_token_id
        self._matryoshka = matryoshka_dimensions
        self._max_num_seqs = max_num_seqs
        self._max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device
        self.forwards = 0  # forward passes run (tests read it)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def matryoshka_dimensions(self) -> tuple[int, ...] | None:
        return self._matryoshka

    @property
    def max_num_seqs(self) -> int:
        return self._max_num_seqs

    @property
    def max_batch_tokens(self) -> int:
        return self._max_batch_tokens

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        assert batch and all(0 < len(s) <= self._max_model_len for s in batch), "inputs fit (the worker checked)"
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        self.forwards += 1
        vectors = _pool(states, mask, self.pooling.mode)
        if self.pooling.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return vectors.cpu().tolist()


def _pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(batch, tokens, hidden) → (batch, hidden) over the tokens `mask` marks."""
    if mode == "cls":
        return states[:, 0]
    if mode == "lasttoken":
        return states[torch.arange(states.shape[0], device=states.device), mask.sum(dim=1) - 1]
    keep = mask.unsqueeze(-1).to(states.dtype)
    if mode == "max":
        return states.masked_fill(keep == 0, float("-inf")).max(dim=1).values
    return (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)


_ACTIVATE = {"sigmoid": torch.sigmoid, "identity": lambda x: x, "tanh": torch.tanh}  # embedding.ACTIVATIONS


class CrossEncoderEngine:
    def __init__(
        self,
        model: Any,
        activation: str,
        *,
        max_model_len: int,
        pad_token_id: int,
        segments: bool,
        max_num_seqs: int,
        max_batch_tokens: int,
    ) -> None:
        self.model = model
        self.activation = activation
        self._activate = _ACTIVATE[activation]
        self._max_model_len = max_model_len
        self._pad = pad_token_id
        self._segments = segments  # the model takes token_type_ids (BERT does; RoBERTa-likes have one segment)
        self._max_num_seqs = max_num_seqs
        self._max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device
        self.forwards = 0  # forward passes run (tests read it)

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_num_seqs(self) -> int:
        return self._max_num_seqs

    @property
    def max_batch_tokens(self) -> int:
        return self._max_batch_tokens

    @torch.inference_mode()
    def score(self, batch: list[TokenPair]) -> list[float]:
        assert batch and all(0 < len(p.ids) <= self._max_model_len for p in batch), "pairs fit (the worker checked)"
        width = max(len(p.ids) for p in batch)
        ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for row, pair in enumerate(batch):
            ids[row, : len(pair.ids)] = torch.tensor(pair.ids, dtype=torch.long)
            mask[row, : len(pair.ids)] = 1
            types[row, : len(pair.ids)] = torch.tensor(pair.segments, dtype=torch.long)
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self._segments:
            inputs["token_type_ids"] = types.to(self.device)
        logits = self.model(**inputs).logits.float()[:, 0]
        self.forwards += 1
        return [float(s) for s in self._activate(logits).cpu().tolist()]
