"""One generation's path through the worker, without HTTP: a `GenerateRequest` in, `GenerateChunk`s out.

Owns the steps between the worker's route and the engine, in the order a request takes them:

    Pipeline.prepare(req)          every error here is a 400, before the engine sees the request
      prompt_ids                   the chat template (with the tools: worker/tools.py), a completion's text, or ids
      engine_request               the one check that the request fits the model; the engine's request
      output_grammar, constraint   the grammar the output must follow, if any (JSON for `json_schema`, a call for a
                                   forced tool choice): compiled in a thread (lmfleet.engine.grammar), advanced
                                   through the resumed ids. A request without one never waits for a thread.
    Pipeline.start(prepared, engine)
      admission                    the engine's first output, or its refusal as the public error (`refusal`)
      _Output                      per engine output: detokenizing and stop strings (worker/textgen.py), tool calls
                                   parsed out of the text (worker/tools.py), log probabilities: one `GenerateChunk`

The first chunk carries the prompt's token ids, so the API server can resume the generation elsewhere; a resumed
request's text starts where the client's stopped (protocol.worker). However the chunk stream ends (finished, a stop
string, the client gone, cancelled) it closes the engine's stream, which aborts the request in the engine.

Does not own: HTTP, settings, readiness and fleet membership (worker/app.py), text handling itself
(worker/textgen.py), tool-call formats (worker/tools.py), compiling grammars (lmfleet.engine.grammar), batching and
sampling (lmfleet.engine).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

from lmfleet import errors
from lmfleet.engine.base import (
    EngineOutput,
    EngineRejected,
    EngineRequest,
    FinishReason,
    Rejection,
    SamplingParams,
    Tokenizer,
    TokenLogprob,
)
from lmfleet.engine.grammar import Constraint, GrammarError, Grammars
from lmfleet.engine.runner import AsyncEngine
from lmfleet.protocol.errors import ErrorInfo
from lmfleet.protocol.worker import ChatMessageIn, GenerateChunk, GenerateRequest, ToolCallChunk, ToolFunction
from lmfleet.protocol.worker import FinishReason as WireFinishReason
from lmfleet.protocol.worker import TokenLogprob as WireLogprob
from lmfleet.worker import textgen, tools

_REFUSALS: dict[Rejection, Callable[[str], errors.LmfleetError]] = {
    Rejection.QUEUE_FULL: lambda detail: errors.QueueFull(detail),
    Rejection.NOT_RUNNING: lambda detail: errors.ServiceUnavailable(detail),
    Rejection.DUPLICATE_ID: lambda detail: errors.InvalidRequest(detail, param="request_id"),
    Rejection.UNSUPPORTED: lambda detail: errors.InvalidRequest(detail),
}


def refusal(exc: EngineRejected) -> errors.LmfleetError:
    """An engine's refusal at admission as the public error: 429 queue full, 503 not running, 400 otherwise (the
    embedding and scoring routes map their runner's refusals with it too)."""
    return _REFUSALS[exc.reason](exc.detail)


class OutputGrammar(NamedTuple):
    """The grammar a request's output must follow: the parameter that asked for it (named in its 400) and how to
    compile it (slow: in a thread)."""

    param: str
    compile: Callable[[], str]


@dataclass
class Prepared:
    """A request checked against the model: its prompt ids and the engine's request (with any constraint)."""

    request: GenerateRequest
    prompt: list[int]
    engine_request: EngineRequest


class Pipeline:
    """The text side of generation for one model, built once per worker from its tokenizer and limits."""

    def __init__(self, tokenizer: Tokenizer, *, max_model_len: int, vocab_size: int, tool_parser: str = tools.AUTO):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size  # ids both the engine and the tokenizer can handle
        self.grammars = Grammars(tokenizer)
        template = tokenizer.chat_template
        self.native_tools = tools.takes_tools(template)  # else the generic tool prompt (Hermes)
        self.tool_format = tools.detect(template if self.native_tools else None, tool_parser)
        self.speller = textgen.LogprobSpeller(tokenizer)

    # -- before the engine ---------------------------------------------------------------------------------------

    async def prepare(self, req: GenerateRequest) -> Prepared:
        """The prompt, the fit check, then the output grammar if the request has one (compiling takes a while, so
        after the cheap checks, and in a thread); InvalidRequest / ContextLengthExceeded."""
        prompt = self.prompt_ids(req)
        engine_req = self.engine_request(req, prompt)
        grammar = self.output_grammar(req)
        if grammar is not None:  # only then a thread: a plain request never queues behind other requests' compiles
            constraint = await asyncio.to_thread(self.constraint, req, grammar)
            engine_req.params = dataclasses.replace(engine_req.params, constraint=constraint)
        return Prepared(req, prompt, engine_req)

    def chat_ids(
        self, messages: Sequence[ChatMessageIn], offered: Sequence[ToolFunction], *, add_generation_prompt: bool
    ) -> list[int]:
        """A chat's prompt ids: the messages and the offered tools through the model's template (or the generic
        tool prompt). Generation and /worker/tokenize render with it, so a count is the generation's count."""
        rendered, specs = tools.prepare(
            [m.model_dump(exclude_none=True) for m in messages], offered, native=self.native_tools
        )
        return textgen.render_chat(self.tokenizer, rendered, add_generation_prompt=add_generation_prompt, tools=specs)

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            if not req.messages:
                raise errors.InvalidRequest("messages must not be empty", param="messages")
            offered = req.tools if req.tool_choice != "none" else []
            return self.chat_ids(req.messages, offered, add_generation_prompt=req.add_generation_prompt)
        if req.prompt is not None:
            return textgen.encode_prompt(self.tokenizer, req.prompt)
        return list(req.prompt_token_ids or [])

    def engine_request(self, req: GenerateRequest, prompt: list[int]) -> EngineRequest:
        """The one check that a request fits the model (a prompt, ids inside the vocabulary, prompt + resumed ids +
        max_tokens within the context), then the engine's request (prompt + any resumed ids)."""
        if not prompt:
            raise errors.InvalidRequest("the prompt is empty", param="prompt")
        for name, ids in (("prompt", prompt), ("resume_token_ids", req.resume_token_ids)):
            if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
                raise errors.InvalidRequest(f"token ids must be in [0, {self.vocab_size})", param=name)
        if any(not 0 <= t < self.vocab_size for t in req.logit_bias):
            raise errors.InvalidRequest(f"logit_bias token ids must be in [0, {self.vocab_size})", param="logit_bias")
        context = prompt + list(req.resume_token_ids)
        room = self.max_model_len - len(context)
        wanted = (req.max_tokens - len(req.resume_token_ids)) if req.max_tokens is not None else room
        if room < 1 or wanted > room:
            raise errors.ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + (req.max_tokens or 1)} tokens ({len(prompt)} in the messages, "
                f"{req.max_tokens or 1} in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens" if req.max_tokens is not None and room >= 1 else "messages",
            )
        params = SamplingParams(
            max_new_tokens=max(wanted, 1),
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=tuple(sorted(req.logit_bias.items())),
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,
        )
        return EngineRequest(request_id=req.request_id, prompt_token_ids=context, params=params)

    def output_grammar(self, req: GenerateRequest) -> OutputGrammar | None:
        """Which grammar the output must follow, if any (JSON output, a forced tool call); quick: nothing compiles
        here."""
        if req.json_schema is not None:
            schema = req.json_schema
            return OutputGrammar("response_format", lambda: self.grammars.json_schema(schema))
        if req.tool_choice == "required" and req.tools:
            forced = [t for t in req.tools if req.tool_name in (None, t.name)]
            parallel = req.parallel_tool_calls and req.tool_name is None
            return OutputGrammar(
                "tools", lambda: self.grammars.lark(self.tool_format.grammar(forced, parallel=parallel))
            )
        return None

    def constraint(self, req: GenerateRequest, grammar: OutputGrammar) -> Constraint:
        """The output grammar compiled and advanced through the resumed ids. Takes a while: call it in a thread.
        InvalidRequest naming the parameter whose schema llguidance cannot compile."""
        try:
            constraint = self.grammars.constraint(grammar.compile())
        except GrammarError as exc:
            raise errors.InvalidRequest(f"this schema cannot be enforced: {exc}", param=grammar.param) from None
        if not constraint.advance_all(list(req.resume_token_ids)):
            raise errors.InvalidRequest("the resumed ids do not follow the output grammar", param="resume_token_ids")
        return constraint

    # -- in the engine -------------------------------------------------------------------------------------------

    async def start(
        self, prepared: Prepared, engine: AsyncEngine
    ) -> tuple[GenerateChunk, AsyncGenerator[GenerateChunk, None]]:
        """Admit the request and produce its first chunk; then the rest. A refusal raises here (the caller answers
        with JSON): 429 queue full, 503 engine not running, 400 a request id in use."""
        chunks = self._chunks(prepared, engine.generate(prepared.engine_request))
        try:
            first = await anext(chunks)
        except BaseException:
            await chunks.aclose()
            raise
        return first, chunks

    async def _chunks(
        self, prepared: Prepared, outputs: AsyncGenerator[EngineOutput, None]
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Admission, the echoed prompt, then one chunk per engine output until one ends the completion (or the
        engine's stream ends without saying why). Closing this closes `outputs`, which aborts the request."""
        output = _Output(self, prepared)
        try:
            first = await _admitted(outputs)
            if prepared.request.echo:
                yield output.echo(first)
            if output.stopped:  # the resumed ids already end in a stop string
                yield output.resumed_stop()
                return
            out: EngineOutput | None = first
            while out is not None:
                chunk = output.step(out)
                yield chunk
                if chunk.finish_reason is not None:
                    return  # after a stop string, closing `outputs` (finally) aborts the sequence in the engine
                out = await anext(outputs, None)
            yield output.ended_early()
        finally:
            await outputs.aclose()


async def _admitted(outputs: AsyncGenerator[EngineOutput, None]) -> EngineOutput:
    """The engine's first output; its refusal (raised before anything is yielded) as the public error."""
    try:
        return await anext(outputs)
    except EngineRejected as exc:
        raise refusal(exc) from None


def _call_stream(req: GenerateRequest, fmt: tools.ToolFormat) -> tools.CallStream | None:
    """When tools are offered, calls are parsed out of the text (and never sent as text); a resumed request skips the
    content and the arguments the client already has."""
    if not req.tools or req.tool_choice == "none":
        return None
    return tools.CallStream(
        fmt,
        single=not req.parallel_tool_calls,
        skip_content=req.resume_text_chars or 0,
        skip_calls=req.resume_tool_chars,
    )


def _text_stream(
    tokenizer: Tokenizer, prompt: list[int], req: GenerateRequest, *, parsing_calls: bool
) -> tuple[textgen.TextStream, str]:
    """The request's text stream and the text of its resumed ids still to send. Without `resume_text_chars` the
    resumed ids are context only (their text is not sent); with it they are decoded again and only what the client
    has not got is sent (with tools, all of it: the call parser skips what was delivered). Tool-call markers are
    special tokens: kept in the text while calls are parsed."""
    resumed = list(req.resume_token_ids)
    if req.resume_text_chars is None:
        return textgen.TextStream(tokenizer, prompt + resumed, req.stop, special=parsing_calls), ""
    text = textgen.TextStream(tokenizer, prompt, req.stop, special=parsing_calls)
    return text, text.resume(resumed, 0 if parsing_calls else req.resume_text_chars)


class _Output:
    """One request's output side: engine outputs in, `GenerateChunk`s out. Holds its text stream, its tool-call
    parser (when tools are offered), the count of ids generated (resumed ones included) and the prompt's ids until
    the first chunk carries them."""

    def __init__(self, pipeline: Pipeline, prepared: Prepared) -> None:
        req = prepared.request
        self._req = req
        self._tokenizer = pipeline.tokenizer
        self._speller = pipeline.speller
        self._prompt = prepared.prompt
        self._calls = _call_stream(req, pipeline.tool_format)
        self._text, self._pending = _text_stream(
            pipeline.tokenizer, prepared.prompt, req, parsing_calls=self._calls is not None
        )
        self._done = len(req.resume_token_ids)
        self._opening: list[int] | None = prepared.prompt  # the first chunk's prompt_token_ids

    @property
    def stopped(self) -> bool:
        return self._text.stopped

    def echo(self, first: EngineOutput) -> GenerateChunk:
        """The prompt's text as given, or its ids' text; with log probabilities, the engine's for the prompt."""
        req = self._req
        echoed = first.prompt_logprobs if req.logprobs is not None else None
        text = req.prompt if req.prompt is not None else self._tokenizer.decode(self._prompt)
        return self._chunk(text, [], self._speller.prompt_entries(self._prompt, echoed) if echoed else None)

    def resumed_stop(self) -> GenerateChunk:
        """The last chunk of a request whose resumed ids already end in a stop string."""
        return self._chunk(self._pending, [], self._spelled(None, 0), finish_reason="stop")

    def step(self, out: EngineOutput) -> GenerateChunk:
        """The chunk for one engine output (several merged, when the reader fell behind). It has a finish reason
        when the completion ends here: a stop string (the ids after the one completing it are not part of the
        completion), an engine error, or the engine finished the sequence."""
        piece, used = self._text.push_counted(out.new_token_ids)
        ids = out.new_token_ids[:used]
        self._done += used
        delta, self._pending = self._pending + piece, ""
        logprobs = self._spelled(out.logprobs, len(ids))
        if self._text.stopped:
            return self._chunk(delta, ids, logprobs, finish_reason="stop")
        if out.finish_reason is FinishReason.ERROR:
            err = errors.UpstreamError(f"generation failed: {out.error or 'engine error'}")
            return self._chunk(delta, ids, logprobs, finish_reason="error", error=err)
        if out.finish_reason is not None:
            delta += self._text.finish()  # what was held back; a stop string may still end in it
            reason = "stop" if self._text.stopped else out.finish_reason.value
            return self._chunk(delta, ids, logprobs, finish_reason=cast(WireFinishReason, reason))
        return self._chunk(delta, ids, logprobs)

    def ended_early(self) -> GenerateChunk:
        """The last chunk when the engine's stream ended before a finished output."""
        err = errors.UpstreamError("engine ended the stream early")
        return self._chunk("", [], self._spelled(None, 0), finish_reason="error", error=err)

    def _spelled(self, logprobs: Sequence[TokenLogprob] | None, n: int) -> list[WireLogprob] | None:
        """The engine's log probabilities for a chunk's n ids, spelled, when the request asked for them."""
        if self._req.logprobs is None:
            return None
        return self._speller.entries((logprobs or [])[:n])

    def _chunk(
        self,
        delta: str,
        ids: list[int],
        logprobs: list[WireLogprob] | None,
        *,
        finish_reason: WireFinishReason | None = None,
        error: errors.LmfleetError | None = None,
    ) -> GenerateChunk:
        """A chunk of `delta`, with tool calls parsed out of it; the last one (a finish reason) also takes what the
        parser still holds, and says "tool_calls" rather than "stop" when it found any."""
        pieces: list[ToolCallChunk] = []
        if self._calls is not None:
            delta, pieces = self._calls.push(delta)
            if finish_reason is not None:
                rest, more = self._calls.finish()
                delta, pieces = delta + rest, pieces + more
                if self._calls.calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
        opening, self._opening = self._opening, None
        return GenerateChunk(
            request_id=self._req.request_id,
            text=delta,
            tool_calls=pieces,
            token_ids=ids,
            finish_reason=finish_reason,
            stop_string=self._text.stop_string if finish_reason == "stop" else None,
            prompt_tokens=len(self._prompt),
            completion_tokens=self._done,
            error=ErrorInfo(**error.body()["error"]) if error is not None else None,
            prompt_token_ids=opening,
            logprobs=logprobs,
        )
