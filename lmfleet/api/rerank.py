"""Reranking and scoring: retrieval pipelines' second stage, in the shapes vLLM, Jina and Cohere serve.

Routes (lmfleet.api.app adds them with `add_routes`)
    POST /v1/rerank, /rerank     RerankRequest -> RerankResponse: documents by relevance to a query, best first
    POST /v1/score, /score       ScoreRequest -> ScoreResponse: a score per (text_1, text_2) pair, in order

Owns: turning each request into the worker's `ScorePairsRequest`, sending it to a worker of the model serving the
`score` task through the one-reply path (lmfleet.api.oneshot: failover to another replica), and spelling the
worker's scores as each endpoint's answer (lmfleet.protocol.rerank). The worker's errors name its own fields; a
rerank error names the client's (`query`, `documents`). Does not own: how a model scores (a cross-encoder's own
score, or an embedding model's cosine: lmfleet.worker.score), which models score (lmfleet.api.routing).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from lmfleet import errors
from lmfleet.api.oneshot import OneReply
from lmfleet.metrics import CLIENT_CLOSED_REQUEST
from lmfleet.protocol.rerank import RerankRequest, RerankResponse, ScoreRequest, ScoreResponse
from lmfleet.protocol.worker import ScorePairsResponse

_RERANK_PARAMS = {"text_1": "query", "text_2": "documents"}  # the worker's names for a rerank request's fields


def add_routes(app: FastAPI, one_reply: OneReply, *, errors_doc: dict[int | str, dict[str, Any]]) -> None:
    """The rerank and score routes on `app` (whose route class is ParsedBodyRoute); `errors_doc`: the error answers
    the OpenAPI document lists for each."""

    async def rerank(body: RerankRequest, request: Request) -> Response:
        response_id = f"rerank-{uuid.uuid4().hex}"
        try:
            got = await one_reply(
                request,
                body.model,
                "score",
                "/worker/score",
                lambda model: body.to_score_request(response_id, model),
                ScorePairsResponse,
            )
        except errors.InvalidRequest as exc:
            exc.param = _RERANK_PARAMS.get(exc.param or "", exc.param)
            raise
        if got is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        model, result = got
        answer = RerankResponse.build(response_id, model, body, result.scores, result.prompt_tokens)
        return JSONResponse(answer.to_json())

    async def score(body: ScoreRequest, request: Request) -> Response:
        response_id = f"score-{uuid.uuid4().hex}"
        got = await one_reply(
            request,
            body.model,
            "score",
            "/worker/score",
            lambda model: body.to_score_request(response_id, model),
            ScorePairsResponse,
        )
        if got is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        model, result = got
        answer = ScoreResponse.build(response_id, int(time.time()), model, result.scores, result.prompt_tokens)
        return JSONResponse(answer.model_dump(mode="json"))

    routes: list[tuple[str, Callable[..., Awaitable[Response]], type[BaseModel], str]] = [
        ("/v1/rerank", rerank, RerankResponse, "Rerank documents by relevance to a query"),
        ("/rerank", rerank, RerankResponse, "Rerank (= /v1/rerank)"),
        ("/v1/score", score, ScoreResponse, "Score text pairs"),
        ("/score", score, ScoreResponse, "Score (= /v1/score)"),
    ]
    for path, endpoint, model, summary in routes:
        app.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=model,
            responses=errors_doc,
            tags=["rerank"],
            summary=summary,
        )
