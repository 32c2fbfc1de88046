"""Copy the parts of OpenAI's OpenAPI document that the conformance tests check into tests/conformance/.

    python scripts/vendor_openai_schemas.py ../shared/openai-openapi.json

The document is from the public `openai/openai-openapi` repository (MIT; the notice is in
tests/conformance/openai-openapi.LICENSE). Only the named component schemas and what they reference are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "CreateEmbeddingResponse",
    "Response",  # /v1/responses
    "ResponseStreamEvent",
    "ResponseItemList",
]
OUT = Path(__file__).resolve().parent.parent / "tests" / "conformance" / "openai_schemas.json"
PREFIX = "#/components/schemas/"


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].removeprefix(PREFIX)} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def main(source: str) -> None:
    document = json.loads(Path(source).read_text())
    schemas = document["components"]["schemas"]
    keep: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep[name] = schemas[name]
            todo.extend(_refs(schemas[name]))
    vendored = {
        "source": f"openai/openai-openapi, OpenAPI {document['openapi']}, API version {document['info']['version']}",
        "license": "MIT (tests/conformance/openai-openapi.LICENSE)",
        "components": {"schemas": dict(sorted(keep.items()))},
    }
    OUT.write_text(json.dumps(vendored, indent=1, sort_keys=False) + "\n")
    print(f"{len(keep)} schemas -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
