"""Anthropic's Messages API schemas (`anthropic_schemas.json`, written from Anthropic's published reference:
anthropic_schemas.NOTE) as validators: the message, its content blocks and usage, every stream event, the error
body and the token count."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

_FILE = Path(__file__).with_name("anthropic_schemas.json")

# The stream's event types, each with the schema its data follows.
EVENTS = {
    "message_start": "RawMessageStartEvent",
    "content_block_start": "RawContentBlockStartEvent",
    "content_block_delta": "RawContentBlockDeltaEvent",
    "content_block_stop": "RawContentBlockStopEvent",
    "message_delta": "RawMessageDeltaEvent",
    "message_stop": "RawMessageStopEvent",
    "ping": "PingEvent",
    "error": "ErrorResponse",
}


@functools.cache
def _defs() -> dict[str, Any]:
    return json.loads(_FILE.read_text())["$defs"]


def validate(schema: str, payload: Any) -> None:
    """Raise `jsonschema.ValidationError` unless `payload` (parsed JSON) is a valid `schema` of Anthropic's."""
    root = {"$ref": f"#/$defs/{schema}", "$defs": _defs()}
    jsonschema.Draft202012Validator(root).validate(payload)
