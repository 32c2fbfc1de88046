"""The public wire format of `POST /v1/embeddings` (OpenAI's `CreateEmbeddingRequest` / `CreateEmbeddingResponse`).
Data only (pydantic, no I/O).

Owns: parsing the request once (`input` in OpenAI's four forms: a string, strings, token ids, lists of token ids;
`encoding_format` float or base64; `dimensions`), its translation to the worker's `EmbedRequest`, and spelling a
vector as OpenAI does (`base64`: the little-endian float32 bytes, base64-encoded). Does not own: which models allow
`dimensions` (the worker checks it against the model), the fit of each input (the worker).
"""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from lmfleet.protocol.worker import MAX_EMBED_INPUTS, MAX_TOKEN_ID, EmbedRequest, KeepAlive

MAX_NAME_CHARS = 256
_TOKEN_ID = {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}


def _inputs(value: Any) -> Any:
    """`input` in any of OpenAI's forms, as a list of inputs, each a string or a list of token ids."""

    def ids(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in v
        )

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value) or all(ids(v) and v for v in value):
            return value
        if ids(value):
            return [value]
    raise PydanticCustomError(
        "input_type",
        f"must be a string, a non-empty list of strings, a list of token ids (integers from 0 to {MAX_TOKEN_ID}), "
        "or a list of non-empty lists of token ids",
    )


Inputs = Annotated[
    list[str | list[int]],
    BeforeValidator(_inputs),
    Field(max_length=MAX_EMBED_INPUTS),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_EMBED_INPUTS},
                {"type": "array", "items": _TOKEN_ID},
                {
                    "type": "array",
                    "items": {"type": "array", "items": _TOKEN_ID},
                    "maxItems": MAX_EMBED_INPUTS,
                },
            ],
            "description": "A string, a list of strings, a list of token ids, or a list of token-id lists: one "
            "vector for each.",
        }
    ),
]


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`."""

    model_config = ConfigDict(
        extra="ignore",
        protected_namespaces=(),
        json_schema_extra={"examples": [{"model": "all-minilm-l6-v2", "input": ["A cat.", "A dog."]}]},
    )

    model: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)
    input: Inputs
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector's little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        strict=True,
        description="Shorter vectors (truncated, then L2-normalized): only for models trained for it (Matryoshka).",
    )
    user: str | None = Field(None, max_length=MAX_NAME_CHARS, description="Accepted; not used.")
    keep_alive: KeepAlive = Field(
        None,
        description="Ollama extension: how long the model stays loaded after this request on a worker that loads "
        "models on demand: seconds or a duration ('5m', '1h'); negative: forever; 0: unload once idle.",
    )

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _null_means_float(cls, value: Any) -> Any:
        return "float" if value is None else value

    def to_embed_request(self, request_id: str, model: str) -> EmbedRequest:
        return EmbedRequest(
            request_id=request_id, model=model, input=self.input, dimensions=self.dimensions, keep_alive=self.keep_alive
        )


def encode_base64(vector: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: the vector as little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a string with encoding_format base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage

    @classmethod
    def build(
        cls, model: str, vectors: list[list[float]], prompt_tokens: int, encoding_format: str
    ) -> EmbeddingResponse:
        spell = encode_base64 if encoding_format == "base64" else list
        return cls(
            data=[Embedding(index=i, embedding=spell(v)) for i, v in enumerate(vectors)],
            model=model,
            usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )
