"""The API server's side of a fleet with FastChat parts in it: FastChat model workers, and FastChat's controller.

Owns:
  * `FastChatWorkerClient`: a generation on a FastChat model worker (`/worker_generate_stream`, lmfleet.protocol.
    fastchat) as lmfleet `GenerateChunk`s. A chat is rendered here with the worker's conversation template
    (`/worker_get_conv_template`, cached per worker) as FastChat's API server renders it; the prompt is counted
    (`/count_token`) against the worker's context (`/model_details`) so an overlong one is the same 400
    context_length_exceeded as on an lmfleet worker; the worker's cumulative text becomes deltas (a trailing U+FFFD,
    half a character, is held back); an in-band error becomes lmfleet's error for its code (`error_for`), and an HTTP
    error the worker answers with becomes a 502, never a body passed through. Its chunks carry no token ids, so a
    generation started on a FastChat worker cannot be resumed elsewhere (lmfleet.api.upstream then ends the stream
    with an error).
  * `MixedWorkerClient`: the `WorkerClient` lmfleet.api.upstream and lmfleet.api.oneshot use, speaking to each worker
    in its protocol (`WorkerStatus.protocol` in the router's view), and `unable`: the workers of a model that cannot
    take a request. A FastChat worker takes a text prompt or chat messages with sampling parameters; not token ids (a
    resumed generation), tools, structured output, log probabilities, logit bias, min_p, ignore_eos, a seed, a
    continued assistant message, or the one-reply routes (embeddings, tokenize).
  * `FallbackControllerClient`: the fleet view from a controller without lmfleet's `/workers` (FastChat's): the
    models (`/list_models`), a worker per model per refresh (`/get_worker_address`; the addresses seen are kept while
    they answer), and each worker's own `/worker_get_status` (an lmfleet worker's names its protocol). FastChat's
    controller keeps no heartbeat times: a worker's answer to that probe stands for one. Asking FastChat's
    shortest-queue policy for an address counts as a dispatch there until the worker's next heartbeat.

Does not own: failover, resume and timeouts (lmfleet.api.upstream), the pick of a worker (lmfleet.api.routing),
FastChat's wire shapes (lmfleet.protocol.fastchat).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from lmfleet import errors, requestid
from lmfleet.client import CONTROL_TIMEOUT, ControllerClient, WorkerClient, raise_for_error
from lmfleet.protocol.fastchat import Conversation, ErrorCode, StreamChunk
from lmfleet.protocol.worker import (
    FASTCHAT,
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    WorkerInfo,
    WorkerStatus,
    reported,
)

logger = logging.getLogger("lmfleet.api")

R = TypeVar("R", bound=BaseModel)

_CACHED_WORKERS = 1024  # conversation templates and context lengths kept, one per worker address


def error_for(code: int, text: str) -> errors.LmfleetError:
    """lmfleet's error for FastChat's in-band error code: the client's mistake stays a 400 (context overflow with
    its own code), an overloaded worker a 429, anything else (the worker's failure, its refusing the fleet's
    credentials) a 502 another worker may make up for."""
    if code == ErrorCode.CONTEXT_OVERFLOW:
        return errors.ContextLengthExceeded(text, param="messages")
    if code in (ErrorCode.RATE_LIMIT, ErrorCode.QUOTA_EXCEEDED, ErrorCode.ENGINE_OVERLOADED):
        return errors.QueueFull(text)
    if 40000 <= code < 50000 and code // 100 not in (401, 429):
        return errors.InvalidRequest(text)
    return errors.UpstreamError(f"the FastChat worker failed (error_code {code}): {text}")


def _failed(address: str, exc: Exception) -> errors.UpstreamError:
    logger.debug("FastChat worker %s: %s: %s", address, type(exc).__name__, exc)
    return errors.UpstreamError(f"worker unavailable ({type(exc).__name__})")


class _Cache(OrderedDict[str, Any]):
    """What a worker said about itself that does not change while it runs, for the last `_CACHED_WORKERS` workers."""

    def keep(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _CACHED_WORKERS:
            self.popitem(last=False)


class FastChatWorkerClient:
    """Talks FastChat to any FastChat model worker (the address is per call)."""

    def __init__(self, http: httpx.AsyncClient, *, secret: str | None = None) -> None:
        self.http = http
        self._headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._templates = _Cache()
        self._contexts = _Cache()

    async def _post(self, address: str, path: str, body: dict[str, Any]) -> Any:
        """One JSON answer; UpstreamError for a transport failure, an HTTP error or an answer that is not JSON."""
        try:
            resp = await self.http.post(address.rstrip("/") + path, json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise _failed(address, exc) from exc
        if resp.status_code != 200:
            raise errors.UpstreamError(f"the FastChat worker answered {path} with HTTP {resp.status_code}")
        try:
            return resp.json()
        except ValueError as exc:
            raise _failed(address, exc) from exc

    async def status(self, address: str, *, timeout: httpx.Timeout | float = CONTROL_TIMEOUT) -> WorkerStatus:
        """The worker's `/worker_get_status` (an lmfleet worker's names its protocol; a FastChat worker's does not)."""
        try:
            resp = await self.http.post(address.rstrip("/") + "/worker_get_status", timeout=timeout)
            if resp.status_code != 200:
                raise errors.UpstreamError(f"the worker answered /worker_get_status with HTTP {resp.status_code}")
            return reported(WorkerStatus.model_validate_json(resp.content))
        except (httpx.HTTPError, ValueError) as exc:  # ValueError includes pydantic's ValidationError
            raise _failed(address, exc) from exc

    async def conversation(self, address: str, model: str | None) -> Conversation:
        if address not in self._templates:
            answer = await self._post(address, "/worker_get_conv_template", {"model": model})
            try:
                self._templates.keep(address, Conversation.model_validate(answer["conv"]))
            except (KeyError, TypeError, ValidationError) as exc:
                raise _failed(address, exc) from exc
        conv: Conversation = self._templates[address]
        return conv

    async def context_length(self, address: str, model: str | None) -> int:
        if address not in self._contexts:
            answer = await self._post(address, "/model_details", {"model": model})
            if not isinstance(answer, dict) or not isinstance(answer.get("context_length"), int):
                raise errors.UpstreamError("the FastChat worker did not say its context length")
            self._contexts.keep(address, answer["context_length"])
        length: int = self._contexts[address]
        return length

    async def count(self, address: str, model: str | None, prompt: str) -> int:
        answer = await self._post(address, "/count_token", {"model": model, "prompt": prompt})
        if not isinstance(answer, dict) or not isinstance(answer.get("count"), int):
            raise errors.UpstreamError("the FastChat worker did not count the prompt's tokens")
        return int(answer["count"])

    async def params(self, address: str, request: GenerateRequest) -> dict[str, Any]:
        """FastChat's generation parameters for `request`: its chat rendered with the worker's template, its
        max_tokens fitted to the context left (ContextLengthExceeded when it does not fit)."""
        stop, stop_ids = list(request.stop), list(request.stop_token_ids)
        if request.messages is not None:
            conv = await self.conversation(address, request.model)
            try:
                prompt = conv.prompt([m.model_dump(exclude_none=True) for m in request.messages])
            except ValueError as exc:
                raise errors.InvalidRequest(str(exc), param="messages") from None
            stop += [s for s in conv.stop_strings if s not in stop]
            stop_ids += [i for i in conv.stop_token_ids or () if i not in stop_ids]
        elif request.prompt is not None:
            prompt = request.prompt
        else:
            raise errors.InvalidRequest("a FastChat worker takes a text prompt, not token ids", param="prompt")
        context = await self.context_length(address, request.model)
        tokens = await self.count(address, request.model, prompt)
        room = context - tokens
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            wanted = request.max_tokens or 1
            raise errors.ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{tokens + wanted} tokens ({tokens} in the messages, {wanted} in the completion). Please reduce "
                "the length of the messages or completion.",
                param="max_tokens" if request.max_tokens is not None and room >= 1 else "messages",
            )
        return {
            "model": request.model,
            "prompt": prompt,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k or -1,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "max_new_tokens": request.max_tokens or room,
            "stop": stop,
            "stop_token_ids": stop_ids,
            "echo": False,
        }

    async def generate(self, address: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream a generation as `GenerateChunk`s (deltas; no token ids). Errors before the first chunk raise
        before it; an in-band error after it raises after the chunks so far. Closing the iterator closes the
        connection, which FastChat's worker notices at its next token."""
        params = await self.params(address, request)
        request_id = requestid.current()
        headers = {**self._headers, requestid.HEADER: request_id} if request_id else self._headers
        sent = ""  # text passed on
        opening = request.echo  # with echo the first chunk is the prompt's text, as an lmfleet worker sends it
        try:
            async with self.http.stream(
                "POST", address.rstrip("/") + "/worker_generate_stream", json=params, headers=headers
            ) as resp:
                if resp.status_code != 200:
                    raise errors.UpstreamError(
                        f"the FastChat worker answered /worker_generate_stream with HTTP {resp.status_code}"
                    )
                async for obj in _objects(resp.aiter_bytes(), address):
                    if obj.error_code:
                        raise error_for(obj.error_code, obj.text)
                    if opening:
                        opening = False
                        yield GenerateChunk(request_id=request.request_id, text=request.prompt or params["prompt"])
                    text = obj.text if obj.finish_reason is not None else obj.text.rstrip("\ufffd")
                    delta = text[len(sent) :] if len(text) > len(sent) else ""
                    sent += delta
                    usage = obj.usage
                    yield GenerateChunk(
                        request_id=request.request_id,
                        text=delta,
                        finish_reason=_finish_reason(obj.finish_reason),
                        prompt_tokens=usage.prompt_tokens if usage else 0,
                        completion_tokens=usage.completion_tokens if usage else 0,
                    )
                    if obj.finish_reason is not None:
                        return
        except httpx.HTTPError as exc:
            raise _failed(address, exc) from exc


def _finish_reason(fastchat: str | None) -> FinishReason | None:
    """FastChat's worker ends with "stop" or "length"; anything else it might say counts as a stop."""
    if fastchat is None:
        return None
    return "length" if fastchat == "length" else "stop"


async def _objects(data: AsyncIterator[bytes], address: str) -> AsyncIterator[StreamChunk]:
    """FastChat's NUL-separated JSON objects."""
    pending = b""
    async for piece in data:
        *whole, pending = (pending + piece).split(b"\0")
        for raw in whole:
            if raw.strip():
                try:
                    yield StreamChunk.model_validate(json.loads(raw))
                except ValueError as exc:  # includes pydantic's ValidationError
                    raise _failed(address, exc) from exc


def fastchat_can_take(request: GenerateRequest) -> str | None:
    """None when a FastChat worker can take `request`, else what it cannot do."""
    if request.prompt_token_ids is not None or request.resume_token_ids:
        return "take token ids (nor continue a generation)"
    if request.tools and request.tool_choice != "none":
        return "call tools"
    if request.json_schema is not None:
        return "enforce a response format"
    if request.logprobs is not None:
        return "return log probabilities"
    if request.logit_bias or request.min_p or request.ignore_eos:
        return "apply logit_bias, min_p or ignore_eos"
    if request.seed is not None and request.temperature > 0:
        return "sample with a seed"
    if request.messages is not None:
        if not request.add_generation_prompt:
            return "continue an assistant message"
        if any(m.role not in ("system", "user", "assistant") for m in request.messages):
            return "take tool messages"
    return None


class MixedWorkerClient(WorkerClient):
    """A `WorkerClient` that speaks to each worker in its protocol, as `view()` (the router's workers) says; a worker
    the view does not know is spoken to as an lmfleet worker."""

    def __init__(
        self, http: httpx.AsyncClient, *, secret: str | None = None, view: Callable[[], Iterable[WorkerInfo]]
    ) -> None:
        super().__init__(http, secret=secret)
        self.fastchat = FastChatWorkerClient(http, secret=secret)
        self._view = view

    def _speaks_fastchat(self, address: str) -> bool:
        return any(w.address == address and w.status.protocol == FASTCHAT for w in self._view())

    def unable(self, model: str, request: GenerateRequest | None = None) -> set[str]:
        """The workers of `model` that cannot take `request` (None: a one-reply request, which FastChat workers
        never take), for the caller to leave out. InvalidRequest when that is all of them."""
        why = "answer embeddings or tokenize requests" if request is None else fastchat_can_take(request)
        if why is None:
            return set()
        serving = {w.address: w.status.protocol for w in self._view() if model in w.status.model_names}
        fastchat = {a for a, protocol in serving.items() if protocol == FASTCHAT}
        if fastchat and len(fastchat) == len(serving):
            raise errors.InvalidRequest(f"The model `{model}` is served by FastChat workers, which cannot {why}.")
        return fastchat

    async def generate(self, address: str, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if not self._speaks_fastchat(address):
            async for chunk in super().generate(address, request):
                yield chunk
            return
        why = fastchat_can_take(request)
        if why is not None:  # `unable` keeps such requests away; this is the guard behind it
            raise errors.InvalidRequest(f"a FastChat worker cannot {why}")
        async for chunk in self.fastchat.generate(address, request):
            yield chunk

    async def call(self, address: str, path: str, request: BaseModel, answer: type[R]) -> R:
        if self._speaks_fastchat(address):
            raise errors.InvalidRequest(f"{path} is not a FastChat worker's route")
        return await super().call(address, path, request, answer)

    async def ready(self, address: str, *, timeout: float = 2.0) -> bool:
        if not self._speaks_fastchat(address):
            return await super().ready(address, timeout=timeout)
        try:
            await self.fastchat.status(address, timeout=timeout)
        except errors.LmfleetError:
            return False
        return True


class FallbackControllerClient(ControllerClient):
    """A `ControllerClient` whose fleet view comes from FastChat's routes when the controller has no `/workers`."""

    def __init__(self, http: httpx.AsyncClient, address: str, *, secret: str | None = None) -> None:
        super().__init__(http, address, secret=secret)
        self._fastchat = FastChatWorkerClient(http)  # statuses only: open routes, no secret
        self._seen: dict[str, set[str]] = {}  # worker address -> the models the controller gave it out for

    async def workers(self) -> list[WorkerInfo]:
        resp = await self.get("/workers")
        if resp.status_code in (404, 405):  # not an lmfleet controller
            return await self._fastchat_view()
        await raise_for_error(resp)
        return [WorkerInfo.model_validate(w) for w in resp.json()["workers"]]

    async def _ask(self, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = await self.http.post(self.address + path, json=body, timeout=CONTROL_TIMEOUT)
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise errors.ServiceUnavailable(f"controller unavailable ({type(exc).__name__})") from exc

    async def _fastchat_view(self) -> list[WorkerInfo]:
        listed = await self._ask("/list_models")
        models = listed.get("models") if isinstance(listed, dict) else None
        if not isinstance(models, list):
            raise errors.ServiceUnavailable("the controller's /list_models answer has no model list")
        for model in models:
            got = await self._ask("/get_worker_address", {"model": model})
            address = got.get("address") if isinstance(got, dict) else None
            if isinstance(address, str) and address:
                self._seen.setdefault(address.rstrip("/"), set()).add(model)
        view = []
        for address, served in list(self._seen.items()):
            try:
                status = await self._fastchat.status(address)
            except errors.LmfleetError:
                del self._seen[address]  # gone: found again if the controller gives it out once more
                continue
            if not served & set(models) & set(status.model_names):
                del self._seen[address]
                continue
            view.append(WorkerInfo(address=address, status=status, last_heartbeat=time.monotonic()))
        return view
