"""OpenAI's published schemas (vendored from `openai/openai-openapi`, MIT: openai-openapi.LICENSE) as validators.

`scripts/vendor_openai_schemas.py` copies the schemas the tests check into `openai_schemas.json`. Parts of the
document still mark optional values OpenAPI 3.0's way (`nullable: true`); the loader turns that into JSON
Schema's `"null"` type so that a plain JSON Schema validator reads the document as OpenAI means it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

_FILE = Path(__file__).with_name("openai_schemas.json")


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _components() -> dict[str, Any]:
    return _nullable(json.loads(_FILE.read_text())["components"])


def validate(schema: str, payload: Any) -> None:
    """Raise `jsonschema.ValidationError` unless `payload` (parsed JSON) is a valid `schema` of OpenAI's."""
    root = {"$ref": f"#/components/schemas/{schema}", "components": _components()}
    jsonschema.Draft202012Validator(root).validate(payload)
