"""FastChat's model-worker protocol on an lmfleet worker, beside its own `/worker/*` routes: FastChat's controller,
API server and Gradio web server use an lmfleet worker as they use a FastChat model worker.

    POST /worker_generate_stream    GenerateParams -> StreamChunk objects, each followed by one NUL byte
    POST /worker_generate           GenerateParams -> the last StreamChunk
    POST /worker_get_status         WorkerStatus (FastChat's three fields and lmfleet's; open, like /worker/status)
    POST /count_token               {"model", "prompt"} -> {"count", "error_code": 0}
    POST /model_details             -> {"context_length"}
    POST /worker_get_conv_template  -> {"conv": Conversation}
    POST /worker_get_embeddings     EmbeddingsParams -> {"embedding": [...], "token_num"} (embedding models)

Every route but `/worker_get_status` takes the fleet secret when one is set, like `/worker/*`.

Owns: turning FastChat's generation parameters into a `GenerateRequest` and the worker's chunks back into FastChat's
objects (cumulative text, the prompt in front with `echo`, usage, log probabilities), errors in-band with FastChat's
error codes (`error_code`), and the model's conversation template (`Templates`): the FastChat template named by
`--conv-template`, else one mapped from the model's own chat template where FastChat has the same format (ChatML,
checked token for token), else FastChat's generic one, with a warning once.

Does not own: generation (`Worker.generate`: validation, the context check, stop strings held back, the engine),
the wire shapes (lmfleet.protocol.fastchat), registration with a FastChat controller (worker/registration.py).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import struct
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from lmfleet import errors
from lmfleet.engine.base import Tokenizer
from lmfleet.protocol.fastchat import (
    FALLBACK_TEMPLATE,
    TEMPLATES,
    Conversation,
    EmbeddingsParams,
    ErrorCode,
    GenerateParams,
    SepStyle,
    StreamChunk,
    Usage,
)
from lmfleet.protocol.worker import EmbedRequest, GenerateChunk, GenerateRequest
from lmfleet.worker import textgen

if TYPE_CHECKING:
    from lmfleet.worker.app import Worker

logger = logging.getLogger("lmfleet.worker")

# lmfleet's errors as FastChat's codes, the most specific first.
_CODES: tuple[tuple[type[errors.LmfleetError], ErrorCode], ...] = (
    (errors.ContextLengthExceeded, ErrorCode.CONTEXT_OVERFLOW),
    (errors.InvalidRequest, ErrorCode.PARAM_OUT_OF_RANGE),
    (errors.AuthenticationFailed, ErrorCode.INVALID_AUTH_KEY),
    (errors.QueueFull, ErrorCode.ENGINE_OVERLOADED),
)


def error_code(exc: errors.LmfleetError) -> ErrorCode:
    return next((code for cls, code in _CODES if isinstance(exc, cls)), ErrorCode.INTERNAL_ERROR)


def _in_band(exc: errors.LmfleetError) -> StreamChunk:
    return StreamChunk(text=exc.message, error_code=error_code(exc))


def _invalid(exc: ValidationError) -> StreamChunk:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return StreamChunk(
        text=f"invalid {where or 'body'}: {first.get('msg')}", error_code=ErrorCode.VALIDATION_TYPE_ERROR
    )


def _line(chunk: StreamChunk) -> bytes:
    return chunk.model_dump_json().encode() + b"\0"


def generate_request(params: GenerateParams, prompt_tokens: int, max_model_len: int) -> GenerateRequest:
    """FastChat's parameters as lmfleet's request. FastChat's worker samples greedily below temperature 1e-5 or
    top_p 1e-8, turns top_k off at -1, and fits `max_new_tokens` into the context (it cuts the prompt; here the
    completion stops at the context's end). InvalidRequest for what it can do and this worker cannot."""
    if params.images:
        raise errors.InvalidRequest("this worker serves a text model: images are not supported", param="images")
    if params.repetition_penalty > 1.0:
        raise errors.InvalidRequest(
            "repetition_penalty is not supported by lmfleet workers; use presence_penalty or frequency_penalty",
            param="repetition_penalty",
        )
    if params.max_new_tokens < 1:
        raise errors.InvalidRequest("max_new_tokens must be at least 1", param="max_new_tokens")
    greedy = params.temperature < 1e-5 or params.top_p < 1e-8
    room = max_model_len - prompt_tokens
    try:
        return GenerateRequest(
            request_id=f"fastchat-{uuid.uuid4().hex}",
            model=params.model,
            prompt=params.prompt,
            max_tokens=params.max_new_tokens if params.max_new_tokens < room else None,  # None: to the context's end
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=max(params.top_k, 0),
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            stop=params.stop_strings,
            stop_token_ids=params.stop_token_ids or [],
            echo=params.echo,
            logprobs=params.logprobs,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise errors.InvalidRequest(f"{param}: {first.get('msg', 'invalid value')}", param=param or None) from None


class _Accumulator:
    """The worker's chunks as FastChat's cumulative objects."""

    def __init__(self) -> None:
        self.text = ""
        self.logprobs: dict[str, list[Any]] | None = None
        self._offset = 0

    def push(self, chunk: GenerateChunk) -> StreamChunk | None:
        """The object for this chunk; None when it adds nothing (text held back, nothing finished)."""
        if chunk.error is not None or chunk.finish_reason in ("error", "abort"):
            message = chunk.error.message if chunk.error is not None else "the generation was aborted"
            return StreamChunk(text=message, error_code=ErrorCode.INTERNAL_ERROR)
        self.text += chunk.text
        if chunk.logprobs:
            lp = self.logprobs = self.logprobs or {
                "text_offset": [],
                "tokens": [],
                "token_logprobs": [],
                "top_logprobs": [],
            }
            for entry in chunk.logprobs:
                lp["text_offset"].append(self._offset)
                lp["tokens"].append(entry.token)
                lp["token_logprobs"].append(entry.logprob)
                lp["top_logprobs"].append({alt.token: alt.logprob for alt in entry.top})
                self._offset += len(entry.token)
        if not chunk.text and not chunk.logprobs and chunk.finish_reason is None:
            return None
        usage = Usage(
            prompt_tokens=chunk.prompt_tokens,
            completion_tokens=chunk.completion_tokens,
            total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
        )
        return StreamChunk(text=self.text, usage=usage, finish_reason=chunk.finish_reason, logprobs=self.logprobs)


class _NulStream(StreamingResponse):
    """A generation as FastChat streams it: JSON objects, each followed by a NUL byte. However the response ends
    (finished, client gone, cancelled) the generation is closed, which aborts it in the engine."""

    def __init__(self, objects: AsyncGenerator[StreamChunk, None]) -> None:
        super().__init__(self._bytes(objects), media_type="application/octet-stream")
        self._objects = objects

    @staticmethod
    async def _bytes(objects: AsyncGenerator[StreamChunk, None]) -> AsyncIterator[bytes]:
        async for obj in objects:
            yield _line(obj)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._objects.aclose()


async def _generation(worker: Worker, body: dict[str, Any]) -> AsyncGenerator[StreamChunk, None]:
    """FastChat's objects for one generation, an error (before or after the first token) as the last, in-band."""
    try:
        params = GenerateParams.model_validate(body)
    except ValidationError as exc:
        yield StreamChunk(
            text=f"invalid parameters: {exc.errors()[0].get('msg')}", error_code=ErrorCode.VALIDATION_TYPE_ERROR
        )
        return
    try:
        prompt_tokens = len(worker.pipeline.prompt_ids(GenerateRequest(request_id="count", prompt=params.prompt)))
        first, rest = await worker.generate(generate_request(params, prompt_tokens, worker.max_model_len))
    except errors.LmfleetError as exc:
        yield _in_band(exc)
        return
    acc = _Accumulator()
    try:
        chunk: GenerateChunk | None = first
        while chunk is not None:
            obj = acc.push(chunk)
            if obj is not None:
                yield obj
                if obj.error_code or obj.finish_reason is not None:
                    return
            chunk = await anext(rest, None)
        yield StreamChunk(text="the generation ended early", error_code=ErrorCode.INTERNAL_ERROR)
    finally:
        await rest.aclose()


# -- the conversation template ----------------------------------------------------------------------------------

# Plain words the chat template renders around (found again in its output to read the template's format).
_SYSTEM, _USER, _ASSISTANT, _USER2 = "Answer briefly", "Hello there", "Hi, what can I do", "Tell me a story"


def chat_conversation(tokenizer: Tokenizer) -> Conversation | None:
    """A FastChat template that builds exactly the prompts the model's own chat template builds, token for token
    (several turns, with a system message), or None. ChatML-style templates (FastChat's CHATML separator style) are
    recognised; a template that adds no system block when none is given maps to one that adds an empty one."""
    user, assistant = {"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}
    system, again = {"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER2}
    probes = {"turns": [user, assistant, again], "system": [system, user], "both": [system, user, assistant, again]}
    try:
        ids = {name: textgen.render_chat(tokenizer, messages) for name, messages in probes.items()}
        ids["alone"] = textgen.render_chat(tokenizer, [user])
    except errors.InvalidRequest:
        return None
    text = {name: tokenizer.decode(i, skip_special_tokens=False) for name, i in ids.items()}
    for conv in _chatml_candidates(text):
        checked = ("both", "system") if conv.system_message == "" else tuple(probes)
        if all(textgen.encode_prompt(tokenizer, conv.prompt(probes[name])) == ids[name] for name in checked):
            sep_ids = tokenizer.encode(conv.sep, add_special_tokens=False)
            return conv.model_copy(update={"stop_token_ids": sep_ids if len(sep_ids) == 1 else None})
    return None


def _chatml_candidates(text: dict[str, str]) -> list[Conversation]:
    """ChatML-style readings of the probes' texts: turns `role\\nmessage<sep>\\n`, the generation slot `role\\n`,
    a system block `<system template><sep>\\n`. Where the separator ends and a role begins is ambiguous from the
    text alone: every split is a candidate (each is checked by the caller)."""
    turns = text["turns"]
    x = turns.find(_USER)
    y = turns.find(_ASSISTANT, x + len(_USER))
    z = turns.find(_USER2, y + len(_ASSISTANT))
    if min(x, y, z) < 0:
        return []
    to_assistant, to_user = turns[x + len(_USER) : y], turns[y + len(_ASSISTANT) : z]
    if turns[z + len(_USER2) :] != to_assistant or not to_assistant.endswith("\n") or not to_user.endswith("\n"):
        return []
    found = []
    for k, c in enumerate(to_assistant):
        sep = to_assistant[:k]
        if c != "\n" or not sep or not to_user.startswith(sep + "\n"):
            continue
        roles = (to_user[k + 1 : -1], to_assistant[k + 1 : -1])
        block = _system_block(text["system"], roles[0], sep)
        default = _system_block(text["alone"], roles[0], sep)
        if not all(roles) or block is None or block.count(_SYSTEM) != 1 or default is None:
            continue
        template = block.replace("{", "{{").replace("}", "}}").replace(_SYSTEM, "{system_message}")
        before, _, after = block.partition(_SYSTEM)
        if default and not (default.startswith(before) and default.endswith(after)):
            continue
        message = default[len(before) : len(default) - len(after)] if default else ""
        found.append(
            Conversation(
                name="chatml",
                system_template=template,
                system_message=message,
                roles=roles,
                sep_style=SepStyle.CHATML,
                sep=sep,
            )
        )
    return found


def _system_block(text: str, user_role: str, sep: str) -> str | None:
    """The system prompt in front of the first user turn of `text` ("" for none), or None if it is not
    `<prompt><sep>\\n`."""
    head, found, _ = text.partition(user_role + "\n" + _USER)
    if not found:
        return None
    if head == "":
        return ""
    return head[: -len(sep) - 1] if head.endswith(sep + "\n") else None


class Templates:
    """The worker's FastChat conversation template, worked out on first use and kept for the worker's life."""

    def __init__(self) -> None:
        self._for: tuple[Worker, Conversation] | None = None

    def get(self, worker: Worker) -> Conversation:
        if self._for is None or self._for[0] is not worker:
            self._for = (worker, self._choose(worker))
        return self._for[1]

    @staticmethod
    def _choose(worker: Worker) -> Conversation:
        name = worker.settings.conv_template
        if name is not None:
            return TEMPLATES[name]
        conv = chat_conversation(worker.tokenizer)
        if conv is not None:
            logger.info("FastChat clients get a %s conversation template mapped from the chat template", conv.name)
            return conv
        logger.warning(
            "the chat template of %s has no FastChat equivalent: FastChat API servers will prompt it with FastChat's "
            "%s template; pass --conv-template NAME to choose one (%s)",
            worker.settings.names[0],
            FALLBACK_TEMPLATE,
            ", ".join(TEMPLATES),
        )
        return TEMPLATES[FALLBACK_TEMPLATE]


# -- the routes -------------------------------------------------------------------------------------------------


class _CountTokenRequest(BaseModel):
    prompt: str


def _vector(values: list[float], encoding: str | None) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


def add_routes(app: FastAPI, *, dependencies: Sequence[Any] = ()) -> None:
    """FastChat's worker routes on the worker `app`; `dependencies` (the fleet secret's check) guard all but
    `/worker_get_status`."""
    templates = Templates()
    guarded = list(dependencies)

    @app.post("/worker_generate_stream", dependencies=guarded, tags=["fastchat"])
    async def generate_stream(body: dict[str, Any], request: Request) -> StreamingResponse:
        return _NulStream(_generation(request.state.worker, body))

    @app.post("/worker_generate", dependencies=guarded, tags=["fastchat"])
    async def generate(body: dict[str, Any], request: Request) -> dict[str, Any]:
        last = StreamChunk(text="the generation produced nothing", error_code=ErrorCode.INTERNAL_ERROR)
        async with contextlib.aclosing(_generation(request.state.worker, body)) as objects:
            async for obj in objects:
                last = obj
        return last.model_dump()

    @app.post("/worker_get_status", tags=["fastchat"])
    async def get_status(request: Request) -> dict[str, Any]:
        return request.state.worker.status().model_dump(mode="json")

    @app.post("/count_token", dependencies=guarded, tags=["fastchat"])
    async def count_token(body: _CountTokenRequest, request: Request) -> dict[str, int]:
        worker: Worker = request.state.worker
        return {
            "count": len(worker.pipeline.prompt_ids(GenerateRequest(request_id="count", prompt=body.prompt))),
            "error_code": 0,
        }

    @app.post("/model_details", dependencies=guarded, tags=["fastchat"])
    async def model_details(request: Request) -> dict[str, int]:
        return {"context_length": request.state.worker.max_model_len}

    @app.post("/worker_get_conv_template", dependencies=guarded, tags=["fastchat"])
    async def conv_template(request: Request) -> dict[str, Any]:
        return {"conv": templates.get(request.state.worker).model_dump(mode="json")}

    @app.post("/worker_get_embeddings", dependencies=guarded, tags=["fastchat"])
    async def embeddings(body: dict[str, Any], request: Request) -> dict[str, Any]:
        worker: Worker = request.state.worker
        try:
            params = EmbeddingsParams.model_validate(body)
            inputs: list[str | list[int]] = list(params.input)
            answer = await worker.embed(EmbedRequest(request_id=f"fastchat-{uuid.uuid4().hex}", input=inputs))
        except ValidationError as exc:
            return {
                "text": f"invalid parameters: {exc.errors()[0].get('msg')}",
                "error_code": ErrorCode.VALIDATION_TYPE_ERROR,
            }
        except errors.LmfleetError as exc:
            return _in_band(exc).model_dump(include={"text", "error_code"})
        vectors = [_vector(v, params.encoding_format) for v in answer.embeddings]
        return {"embedding": vectors, "token_num": answer.prompt_tokens}
