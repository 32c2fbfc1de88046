"""The one generation path: chat, completions, Responses and Anthropic's Messages (and the next protocol) are
answered here, and each endpoint only renders.

Owns, for one request that generates, in this order:
  1. the operator's limits on the request it generates with (lmfleet.api.access; an endpoint that translated its
     own request into that one names the parameter its way, `param`), then the model that answers it
     (`resolve_model`: the one it names, else the default, else the only one served; the one-reply routes use it
     too). The request's metrics are labelled with the model only once the fleet serves it;
  2. opening every choice on a worker, with failover (lmfleet.api.upstream), while watching for the client: one
     that leaves first gets a 499 and no worker goes on generating for it;
  3. the answer, streamed (SSE, stopped when the client leaves) or collected (one JSON body; 499 when the client
     leaves first), spelled by the endpoint's `Renderer` from the neutral deltas (upstream.ChoiceDelta: text,
     tool-call pieces, finish reason and the stop string that caused it), and usage;
  4. closing every worker stream and recording usage (lmfleet.api.metrics), whatever happened.

A new protocol is a new `Renderer` and a route that translates its request into a chat or completions request
and calls `AnswerPath.answer` (lmfleet.api.responses, lmfleet.api.messages). Errors before the 200 (limits, no
such model, no worker, a worker's 400 or 429) are raised as lmfleet.errors exceptions, so the route's error
handling spells them, as it spells the request's own validation errors; a failure after the 200 is the renderer's
to spell (`fail`).

Does not own: parsing requests (lmfleet.protocol), workers, failover and usage accounting (lmfleet.api.upstream),
how a delta is spelled (lmfleet.api.render for chat and completions, lmfleet.api.responses,
lmfleet.api.messages), SSE framing and disconnect watching (lmfleet.api.sse), request timing (lmfleet.metrics).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from lmfleet import errors
from lmfleet.api.access import RequestLimits
from lmfleet.api.metrics import ApiMetrics
from lmfleet.api.routing import Router
from lmfleet.api.sse import Event, EventStreamResponse, cancel_on_disconnect
from lmfleet.api.upstream import (
    ChoiceDelta,
    ChoiceSpec,
    ChoiceStream,
    ModelBackend,
    Timeouts,
    close_all,
    joined,
    merge,
    open_choices,
    usage_of,
)
from lmfleet.metrics import CLIENT_CLOSED_REQUEST, MODEL_KEY
from lmfleet.protocol.openai import ChatCompletionRequest, CompletionRequest, Usage

logger = logging.getLogger("lmfleet.api")


class Renderer(Protocol):
    """One answer in an endpoint's wire shape, made for it once its model is known.

    Streamed, the path calls `start(usage)` once the first chunk of every choice is in hand (the 200 goes out with
    what it returns; `usage` counts the prompt's tokens and none generated yet), `delta()` for each delta in
    arrival order (each choice's last one has its finish reason), then `end(usage)` after the last; or
    `fail(exc)` instead of the rest once the answer broke off after the 200 (no worker could make up for a
    failure, or a bug). Each returns the events to send now, perhaps none; `end` and
    `fail` return the stream's last ones. Not streamed, it calls `answer(choices, usage)` once, each choice's
    deltas joined into one (upstream.joined); a failure is then raised. Either way `settle()` runs before the last
    event or the body is sent (Responses stores the response there); what it raises is sent as `fail(exc)`, or
    raised."""

    @property
    def id(self) -> str:
        """The answer's id: choice i is generated as the worker request `{id}-{i}`; logs name it."""
        ...

    def start(self, usage: Usage) -> list[Event]: ...

    def delta(self, delta: ChoiceDelta) -> list[Event]: ...

    def end(self, usage: Usage) -> list[Event]: ...

    def fail(self, exc: errors.LmfleetError) -> list[Event]: ...

    def answer(self, choices: Sequence[ChoiceDelta], usage: Usage) -> BaseModel: ...

    async def settle(self) -> None: ...


GenerationRequest = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class AnswerPath:
    """What every answer shares, from the API server's settings: made once by `create_app`."""

    metrics: ApiMetrics  # usage, token timing and failover counts
    limits: RequestLimits
    timeouts: Timeouts
    default_model: str | None = None  # used when a request names no model
    on_tokens: Callable[[str, int], None] | None = None  # hears of every token relayed (lmfleet.api.fleet)

    async def resolve_model(self, request: Request, requested: str | None) -> str:
        """The model a request names (or the default, or the only one served). Labels the request's metrics with
        it when the fleet serves it: never with a name a client made up."""
        router: Router = request.state.router
        served = await router.models()
        if requested or self.default_model:
            model = router.resolve(requested or self.default_model or "")
        elif len(served) == 1:
            model = served[0]
        else:
            model = ""
        if model:
            if model in served:
                request.scope[MODEL_KEY] = model
            return model
        if not served:
            raise errors.NoWorkerAvailable("No model is being served right now.", headers={"Retry-After": "1"})
        raise errors.InvalidRequest(
            f"You must provide a model parameter; this server serves: {', '.join(sorted(served))}.", param="model"
        )

    async def answer(
        self,
        request: Request,
        body: GenerationRequest,
        renderer_for: Callable[[str], Renderer],
        *,
        param: Callable[[str], str] | None = None,
    ) -> Response:
        """Answer `request`, which generates as `body` says, in the shape of `renderer_for(model)`. `param(name)`:
        how the endpoint's clients name a parameter of `body` (a limit's 400 names it)."""
        try:
            self.limits.check(body)
        except errors.InvalidRequest as exc:
            if param is not None and exc.param is not None:
                named, exc.param = exc.param, param(exc.param)
                if exc.message.startswith(f"{named}:"):  # the message names it too (access.RequestLimits)
                    exc.message = exc.param + exc.message[len(named) :]
            raise
        model = await self.resolve_model(request, body.model)
        renderer = renderer_for(model)
        specs = [
            ChoiceSpec(i, body.prompt_index(i), body.to_generate_request(f"{renderer.id}-{i}", model, choice=i))
            for i in range(body.num_choices)
        ]
        backend = ModelBackend(
            request.state.router,
            request.state.workers,
            model,
            self.timeouts,
            on_tokens=self.on_tokens,
            metrics=self.metrics,
        )
        # Until the first chunk of every choice is in hand (a long prefill, a queue) the client may leave too.
        streams = await cancel_on_disconnect(request.receive, open_choices(specs, backend))
        if streams is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

        async def finish() -> None:
            await close_all(streams)
            self.metrics.usage(model, usage_of(streams))

        if body.stream:
            return EventStreamResponse(_stream(streams, renderer), cleanup=finish)
        try:
            result = await cancel_on_disconnect(request.receive, _collect(streams, renderer))
        finally:
            await finish()
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        await renderer.settle()
        return JSONResponse(result.model_dump(mode="json"))


async def _stream(streams: Sequence[ChoiceStream], renderer: Renderer) -> AsyncIterator[bytes]:
    """The SSE body: the renderer's events for the deltas of every choice in arrival order, then its last ones
    (`end`, or `fail` once the answer broke off). Stops where it is when the client goes away."""
    for event in renderer.start(usage_of(streams)):
        yield event.encode()
    try:
        async with contextlib.aclosing(merge(streams)) as deltas:
            async for delta in deltas:
                for event in renderer.delta(delta):
                    yield event.encode()
        last = renderer.end(usage_of(streams))
    except errors.LmfleetError as exc:
        logger.warning("%s failed mid-stream: %s", renderer.id, exc.message)
        last = renderer.fail(exc)
    except Exception:
        logger.exception("%s failed mid-stream", renderer.id)
        last = renderer.fail(errors.LmfleetError("internal server error"))
    try:
        await renderer.settle()
    except errors.LmfleetError as exc:
        last = renderer.fail(exc)
    except Exception:
        logger.exception("%s failed to settle", renderer.id)
        last = renderer.fail(errors.LmfleetError("internal server error"))
    for event in last:
        yield event.encode()


async def _collect(streams: Sequence[ChoiceStream], renderer: Renderer) -> BaseModel:
    """The whole answer as one object, usage included; the choices in the order of `streams`."""
    deltas: dict[int, list[ChoiceDelta]] = {s.spec.index: [] for s in streams}
    async with contextlib.aclosing(merge(streams)) as merged:
        async for delta in merged:
            deltas[delta.index].append(delta)
    return renderer.answer([joined(deltas[s.spec.index]) for s in streams], usage_of(streams))
