"""The llama.cpp engine: continuous batching over a GGUF model through llama-cpp-python's C API (no PyTorch).

Owns its settings (`LlamaCppSettings`, speculative decoding's among them) and `load`, which reads one `.gguf` file
(and a draft model's, when speculating with one) and returns the engine with the tokenizer of the file's own
vocabulary and chat template. This module imports no llama_cpp: `engine` (the batching
engine) and `tokenizer` do, when `load` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmfleet.engine.base import BatchSettings, LoadedModel
from lmfleet.engine.speculative import SpecSettings


@dataclass(frozen=True)
class LlamaCppSettings(BatchSettings):
    """`max_batch_tokens` is the prompt tokens one `llama_decode` carries beside the running sequences' tokens;
    `max_model_len` is the context (n_ctx): one KV pool of that many tokens that all sequences share, allocated at
    load; None means the model's trained context, capped at `engine.DEFAULT_CONTEXT_CAP` (8192)."""

    n_threads: int | None = None  # None: every core (os.cpu_count())
    flash_attn: bool = True  # about 1.4x at 16 sequences (engine); llama-server's default too
    # speculative decoding (lmfleet.engine.speculative.SpecSettings, whose defaults these are)
    spec_type: str = SpecSettings.type
    draft_model_path: str | None = None
    spec_draft_n_max: int = SpecSettings.draft_max
    spec_draft_n_min: int = SpecSettings.draft_min
    spec_ngram_size_n: int = SpecSettings.ngram_max
    spec_ngram_min_n: int = SpecSettings.ngram_min
    spec_max_running: int = SpecSettings.max_running
    spec_verify_cost: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError("n_threads must be positive")
        self.speculative  # noqa: B018 (checks the speculative settings)

    @property
    def speculative(self) -> SpecSettings:
        return SpecSettings(
            type=self.spec_type,
            draft_max=self.spec_draft_n_max,
            draft_min=self.spec_draft_n_min,
            ngram_max=self.spec_ngram_size_n,
            ngram_min=self.spec_ngram_min_n,
            max_running=self.spec_max_running,
            draft_model=self.draft_model_path,
            verify_cost=self.spec_verify_cost,
        )


def load(model_path: str, settings: LlamaCppSettings) -> LoadedModel:
    """Load the `.gguf` file at `model_path`: the engine and its tokenizer share the one loaded model."""
    import llama_cpp.llama_cpp as llama

    from lmfleet.engine.llamacpp.engine import LlamaCppEngine
    from lmfleet.engine.llamacpp.tokenizer import GGUFTokenizer

    engine = LlamaCppEngine(
        model_path,
        max_num_seqs=settings.max_num_seqs,
        max_batch_tokens=settings.max_batch_tokens,
        max_model_len=settings.max_model_len,
        n_threads=settings.n_threads,
        flash_attn=settings.flash_attn,
        prefix_cache=settings.prefix_cache,
        prefix_cache_host_bytes=settings.prefix_cache_host_bytes,
        speculative=settings.speculative,
    )
    try:
        tokenizer = GGUFTokenizer(engine.model)
    except BaseException:
        engine.close()
        raise
    buf = bytes(256)
    llama.llama_model_desc(engine.model, buf, len(buf))
    kind = buf.split(b"\0", 1)[0].decode("utf-8", errors="replace")  # e.g. "llama 256M Q4_1"
    device = "gpu" if llama.llama_supports_gpu_offload() else "cpu"  # a GPU build offloads every layer by default
    description = (
        f"engine=llamacpp model={Path(model_path).name} type={kind.replace(' ', '/') or '?'} device={device} "
        f"context={engine.max_model_len} kv_cache={engine.max_model_len} tokens threads={engine.n_threads} "
        f"parameters={llama.llama_model_n_params(engine.model) / 1e6:.0f}M "
        f"size={llama.llama_model_size(engine.model) / 1e6:.0f}MB "
        f"max_num_seqs={settings.max_num_seqs}"
    )
    if settings.spec_type != "none":
        draft = f" draft={Path(settings.draft_model_path).name}" if settings.draft_model_path else ""
        description += f" speculative={settings.spec_type}{draft} max_running={settings.spec_max_running}"
    return LoadedModel(engine, tokenizer, description)
