"""The public wire format of reranking and scoring. Data only (pydantic, no I/O).

`POST /v1/rerank` (and `/rerank`) in the shape vLLM, Jina and Cohere's v1 API share: `query`, `documents` (strings,
or objects with `text`), `top_n`, `return_documents` -> `{"id", "model", "results": [{"index", "relevance_score",
"document": {"text"}}], "usage"}`, results sorted by score, highest first. `POST /v1/score` (and `/score`) in
vLLM's: `text_1`, `text_2`, one to one, one to many (`text_1` a single text) or many to many (equal lengths) ->
`{"id", "object": "list", "created", "model", "data": [{"index", "object": "score", "score"}], "usage"}`, in input
order.

Owns: parsing both requests once (limits in `Field`s; knobs lmfleet does not implement are refused by name), their
translation to the worker's `ScorePairsRequest`, and building the answers from the worker's scores (rerank: ties in
input order, cut to `top_n`; each result's document unless `return_documents` is false). Does not own: how a pair
is scored or whether it fits the model (the worker), which models score (lmfleet.api.routing).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from lmfleet.protocol.openai import MAX_NAME_CHARS
from lmfleet.protocol.worker import MAX_SCORE_PAIRS, ScorePairsRequest

Text = Annotated[str, Field(min_length=1)]

# Parameters of vLLM's and Cohere's that change what is scored or how; refused when set rather than ignored.
_REFUSED = {
    "truncate_prompt_tokens": "truncation is not supported: a pair longer than the model's context is refused",
    "max_tokens_per_doc": "truncation is not supported: a pair longer than the model's context is refused",
    "max_chunks_per_doc": "documents are not chunked",
    "rank_fields": "only a document's `text` is ranked",
    "use_activation": "the model's own activation is always applied",
    "activation": "the model's own activation is always applied",
    "softmax": "the model's own activation is always applied",
}


class _Refusing(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)
    truncate_prompt_tokens: int | None = None
    use_activation: bool | None = None
    activation: bool | None = None
    softmax: bool | None = None

    @field_validator("truncate_prompt_tokens", "use_activation", "activation", "softmax", mode="before")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise PydanticCustomError("unsupported", _REFUSED[info.field_name or ""])
        return value


def _document_texts(value: Any) -> Any:
    """`documents` as their texts: a document is a string, or an object with a `text` string (Cohere's and Jina's
    form; its other keys are not read)."""
    if not isinstance(value, list):
        return value
    texts = []
    for item in value:
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise PydanticCustomError(
                "document_type", "each document must be a string or an object with a `text` string"
            )
        texts.append(text)
    return texts


Documents = Annotated[
    list[Text],
    BeforeValidator(_document_texts),
    Field(min_length=1, max_length=MAX_SCORE_PAIRS),
    WithJsonSchema(
        {
            "type": "array",
            "items": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "object",
                        "properties": {"text": {"type": "string", "minLength": 1}},
                        "required": ["text"],
                    },
                ]
            },
            "minItems": 1,
            "maxItems": MAX_SCORE_PAIRS,
        }
    ),
]


class RerankRequest(_Refusing):
    """`POST /v1/rerank`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "ms-marco-minilm",
                    "query": "What is the capital of France?",
                    "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
                    "top_n": 1,
                }
            ]
        }
    )

    query: Text
    documents: Documents
    top_n: int | None = Field(
        None, ge=0, strict=True, description="Only the best `top_n` results; omitted, null or 0 (vLLM's): all."
    )
    return_documents: bool = Field(True, strict=True, description="Each result carries its document's text.")
    max_tokens_per_doc: int | None = None
    max_chunks_per_doc: int | None = None
    rank_fields: list[str] | None = None

    @field_validator("max_tokens_per_doc", "max_chunks_per_doc", "rank_fields", mode="before")
    @classmethod
    def _refuse_cohere(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise PydanticCustomError("unsupported", _REFUSED[info.field_name or ""])
        return value

    def to_score_request(self, request_id: str, model: str) -> ScorePairsRequest:
        return ScorePairsRequest(request_id=request_id, model=model, text_1=[self.query], text_2=self.documents)


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Texts = Annotated[
    list[Text],
    BeforeValidator(_listed),
    Field(min_length=1, max_length=MAX_SCORE_PAIRS),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "maxItems": MAX_SCORE_PAIRS,
                },
            ]
        }
    ),
]


class ScoreRequest(_Refusing):
    """`POST /v1/score`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "ms-marco-minilm",
                    "text_1": "What is the capital of France?",
                    "text_2": ["Paris is the capital of France.", "Berlin is in Germany."],
                }
            ]
        }
    )

    text_1: Texts
    text_2: Texts

    @field_validator("text_2")
    @classmethod
    def _one_or_as_many(cls, value: list[str], info: ValidationInfo) -> list[str]:
        first = info.data.get("text_1")
        if first is not None and len(first) not in (1, len(value)):
            raise PydanticCustomError("pairs", "text_1 must be one text, or as many texts as text_2 (1:1, 1:N or N:N)")
        return value

    def to_score_request(self, request_id: str, model: str) -> ScorePairsRequest:
        return ScorePairsRequest(request_id=request_id, model=model, text_1=self.text_1, text_2=self.text_2)


# -- answers -----------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int  # the document's position in the request
    relevance_score: float
    document: RerankDocument | None = None  # absent with `return_documents: false`


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage

    @classmethod
    def build(
        cls, response_id: str, model: str, request: RerankRequest, scores: list[float], prompt_tokens: int
    ) -> RerankResponse:
        texts = request.documents
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep their input order
        if request.top_n:
            order = order[: request.top_n]
        return cls(
            id=response_id,
            model=model,
            results=[
                RerankResult(
                    index=i,
                    relevance_score=scores[i],
                    document=RerankDocument(text=texts[i]) if request.return_documents else None,
                )
                for i in order
            ],
            usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )

    def to_json(self) -> dict[str, Any]:
        """The body: a result without its document has no `document` key."""
        body = self.model_dump(mode="json")
        for result in body["results"]:
            if result["document"] is None:
                del result["document"]
        return body


class ScoreData(BaseModel):
    index: int  # the pair's position: text_2's index
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage

    @classmethod
    def build(
        cls, response_id: str, created: int, model: str, scores: list[float], prompt_tokens: int
    ) -> ScoreResponse:
        return cls(
            id=response_id,
            created=created,
            model=model,
            data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
            usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )
