"""PLACEHOLDER written by the lead so the registry imports; helper-1 replaces this file (same names)."""

from __future__ import annotations

from dataclasses import dataclass

from lmfleet.engine.base import LoadedModel


@dataclass(frozen=True)
class LlamaCppSettings:
    max_num_seqs: int = 16
    max_batch_tokens: int = 1024
    max_model_len: int | None = None
    n_threads: int | None = None


def load(model_path: str, settings: LlamaCppSettings) -> LoadedModel:
    raise NotImplementedError
