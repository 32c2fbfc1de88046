"""What `--model-path` names, as every loader takes it: `ModelSource` (a GGUF file, a Hugging Face folder, a
sentence-transformers folder or a hub id). `lmfleet.engine.registry.locate` finds it; each engine package's `load`
reads it. Data only: no I/O, nothing imported from the engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class ModelSource:
    """What `--model-path` names: a GGUF file, a Hugging Face folder (a sentence-transformers one: "st-folder") or a
    hub id."""

    given: str  # as the user wrote it (FastChat names a model by it)
    kind: Literal["gguf", "folder", "st-folder", "hub"]
    path: Path | None = None  # the .gguf file, or the folder; None for a hub id

    @property
    def display(self) -> str:
        return str(self.path) if self.path is not None else self.given

    @property
    def short_name(self) -> str:
        """The file name without `.gguf`, or the folder's (or hub id's last part's) name: the name a user types."""
        if self.kind == "gguf" and self.path is not None:
            return self.path.stem
        return (self.path.name if self.path is not None else self.given.rsplit("/", 1)[-1]) or self.given

    def transformers_args(self) -> tuple[str, str | None]:
        """(what `from_pretrained` takes, its `gguf_file=`)."""
        if self.kind == "gguf" and self.path is not None:
            return str(self.path.parent), self.path.name
        return self.display, None
