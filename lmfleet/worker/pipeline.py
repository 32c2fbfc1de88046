"""One generation's path through the worker, without HTTP: a `GenerateRequest` in, `GenerateChunk`s out.

Owns the steps between the worker's route and the engine, in the order a request takes them:

    Pipeline.prepare(req)          every error here is a 400, before the engine sees the request
      prompt_ids                   the chat template (with the tools: worker/tools.py; the template kwargs), a
                                   completion's text, or ids
      engine_request               the one check that the request fits the model; the engine's request
      thinking                     a chat answer of a model with a reasoning parser: does the output start inside
                                   the reasoning (worker/reasoning.py)
      output_grammar, constraint   the grammar the output must follow, if any (JSON for `json_schema`, a call for a
                                   forced tool choice; after free reasoning, when the answer thinks first):
                                   compiled in a thread (lmfleet.engine.grammar), advanced through the resumed ids.
                                   A request without one never waits for a thread.
    Pipeline.start(prepared, engine)
      admission                    the engine's first output, or its refusal as the public error (`refusal`)
      _Output                      per engine output: detokenizing and stop strings (worker/textgen.py), the
                                   reasoning split from the answer (worker/reasoning.py), tool calls parsed out of
                                   the answer (worker/tools.py), log probabilities: one `GenerateChunk`

The first chunk carries the prompt's token ids, so the API server can resume the generation elsewhere; a resumed
request's text starts where the client's stopped (protocol.worker). It also carries how many of the context's
leading tokens the engine served from its prefix cache (`EngineOutput.cached_tokens` of the first output, 0 from an
engine without one): of a resumed request's context, the prompt and the resumed ids as this worker's engine saw
them; what the API server reports for the whole request is its business (lmfleet.api.upstream). However the chunk
stream ends (finished, a stop string, the client gone, cancelled) it closes the engine's stream, which aborts the
request in the engine.

Does not own: HTTP, settings, readiness and fleet membership (worker/app.py), text handling itself
(worker/textgen.py), tool-call formats (worker/tools.py), reasoning formats (worker/reasoning.py), compiling grammars
(lmfleet.engine.grammar), batching and sampling (lmfleet.engine).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

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
from lmfleet.worker import reasoning, textgen, tools

_REFUSALS: dict[Rejection, Callable[[str], errors.LmfleetError]] = {
    Rejection.QUEUE_FULL: lambda detail: errors.QueueFull(detail),
    Rejection.NOT_RUNNING: lambda detail: errors.ServiceUnavailable(detail),
    Rejection.DUPLICATE_ID: lambda detail: errors.InvalidRequest(detail, param="request_id"),
    Rejection.UNSUPPORTED: lambda detail: errors.InvalidRequest(detail),
}

# The prompt's last ids decoded to see whether the chat template opened (or closed) the reasoning.
_PROMPT_TAIL = 32


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
    thinking: reasoning.Thinking | None  # a chat answer's reasoning, when the model has a parser


class Pipeline:
    """The text side of generation for one model, built once per worker from its tokenizer and limits."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_model_len: int,
        vocab_size: int,
        tool_parser: str = tools.AUTO,
        reasoning_parser: str = reasoning.AUTO,
    ):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size  # ids both the engine and the tokenizer can handle
        self.grammars = Grammars(tokenizer)
        template = tokenizer.chat_template
        self.native_tools = tools.takes_tools(template)  # else the generic tool prompt (Hermes)
        self.tool_format = tools.detect(template if self.native_tools else None, tool_parser)
        self.reasoning_format = reasoning.detect(template, reasoning_parser)  # None: answers are not split
        self.speller = textgen.LogprobSpeller(tokenizer)

    # -- before the engine ---------------------------------------------------------------------------------------

    async def prepare(self, req: GenerateRequest) -> Prepared:
        """The prompt, the fit check, then the output grammar if the request has one (compiling takes a while, so
        after the cheap checks, and in a thread); InvalidRequest / ContextLengthExceeded."""
        prompt = self.prompt_ids(req)
        engine_req = self.engine_request(req, prompt)
        thinking = self.thinking(req, prompt)
        grammar = self.output_grammar(req, thinking)
        if grammar is not None:  # only then a thread: a plain request never queues behind other requests' compiles
            constraint = await asyncio.to_thread(self.constraint, req, grammar)
            engine_req.params = dataclasses.replace(engine_req.params, constraint=constraint)
        return Prepared(req, prompt, engine_req, thinking)

    def chat_ids(
        self,
        messages: Sequence[ChatMessageIn],
        offered: Sequence[ToolFunction],
        *,
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """A chat's prompt ids: the messages and the offered tools through the model's template (or the generic
        tool prompt). Generation and /worker/tokenize render with it, so a count is the generation's count."""
        rendered, specs = tools.prepare(
            [m.model_dump(exclude_none=True) for m in messages], offered, native=self.native_tools
        )
        return textgen.render_chat(
            self.tokenizer,
            rendered,
            add_generation_prompt=add_generation_prompt,
            tools=specs,
            template_kwargs=template_kwargs,
        )

    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            if not req.messages:
                raise errors.InvalidRequest("messages must not be empty", param="messages")
            offered = req.tools if req.tool_choice != "none" else []
            return self.chat_ids(
                req.messages,
                offered,
                add_generation_prompt=req.add_generation_prompt,
                template_kwargs=req.chat_template_kwargs,
            )
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

    def thinking(self, req: GenerateRequest, prompt: list[int]) -> reasoning.Thinking | None:
        """For a chat answer of a model with a reasoning parser: whether its output starts inside the reasoning, from
        the end of the prompt (resumed ids that are plain context are part of it)."""
        if self.reasoning_format is None or not req.split_reasoning:
            return None
        context = prompt[-_PROMPT_TAIL:] + (list(req.resume_token_ids) if req.resume_text_chars is None else [])
        return self.reasoning_format.after(self.tokenizer.decode(context, skip_special_tokens=False))

    def output_grammar(self, req: GenerateRequest, thinking: reasoning.Thinking | None) -> OutputGrammar | None:
        """Which grammar the output must follow, if any (JSON output, a forced tool call; after the reasoning, free,
        when the answer thinks first); quick: nothing compiles here."""
        grammar = self._answer_grammar(req)
        if grammar is None or thinking is None:
            return grammar
        answer = grammar.compile
        return OutputGrammar(grammar.param, lambda: self.grammars.then(thinking.grammar_lead(), answer()))

    def _answer_grammar(self, req: GenerateRequest) -> OutputGrammar | None:
        if req.json_schema is not None:
            schema, strict = req.json_schema, req.json_schema_strict
            return OutputGrammar("response_format", lambda: self.grammars.json_schema(schema, strict=strict))
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
            output.cached_tokens = first.cached_tokens or 0
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
        names=[t.name for t in req.tools],
        single=not req.parallel_tool_calls,
        skip_content=req.resume_text_chars or 0,
        skip_calls=req.resume_tool_chars,
    )


def _text_stream(
    tokenizer: Tokenizer, prompt: list[int], req: GenerateRequest, *, parsing_calls: bool, splitting: bool
) -> tuple[textgen.TextStream, str]:
    """The request's text stream and the text of its resumed ids still to send. Without `resume_text_chars` the
    resumed ids are context only (their text is not sent); with it they are decoded again and only what the client
    has not got is sent. With tools or a reasoning split, the resumed ids are left for the caller to push: the call
    parser and the split skip what was delivered. Tool-call markers are special tokens: kept in the text while calls
    are parsed."""
    resumed = list(req.resume_token_ids)
    if req.resume_text_chars is None:
        return textgen.TextStream(tokenizer, prompt + resumed, req.stop, special=parsing_calls), ""
    text = textgen.TextStream(tokenizer, prompt, req.stop, special=parsing_calls)
    if splitting:
        return text, ""
    return text, text.resume(resumed, 0 if parsing_calls else req.resume_text_chars)


class _Output:
    """One request's output side: engine outputs in, `GenerateChunk`s out. Holds its text stream, its reasoning split
    (a chat answer of a model that thinks), its tool-call parser (when tools are offered), the count of ids
    generated (resumed ones included) and of those the reasoning's, and the prompt's ids and cached count until the
    first chunk carries them."""

    def __init__(self, pipeline: Pipeline, prepared: Prepared) -> None:
        req = prepared.request
        self._req = req
        self._tokenizer = pipeline.tokenizer
        self._speller = pipeline.speller
        self._prompt = prepared.prompt
        self._calls = _call_stream(req, pipeline.tool_format)
        thinking = prepared.thinking
        self._split = (
            None
            if thinking is None
            else thinking.stream(
                skip_reasoning=req.resume_reasoning_chars,
                skip_content=0 if self._calls is not None else req.resume_text_chars or 0,
            )
        )
        self._text, self._pending = _text_stream(
            pipeline.tokenizer,
            prepared.prompt,
            req,
            parsing_calls=self._calls is not None,
            splitting=self._split is not None,
        )
        self._reasoning_tokens = 0  # of the ids done, those of the reasoning
        self._pending_reasoning = ""
        if self._split is not None and req.resume_text_chars is not None:
            self._done = 0  # the resumed ids go through the split again, counted as they go
            self._pending_reasoning, self._pending, _ = self._push(req.resume_token_ids)
        else:
            self._done = len(req.resume_token_ids)
        self._opening: list[int] | None = prepared.prompt  # the first chunk's prompt_token_ids
        self.cached_tokens = 0  # the first chunk's cached_tokens: the engine's, from its first output

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
        reasoning, content = self._end("")
        delta, thought = self._pending + content, self._pending_reasoning + reasoning
        return self._chunk(delta, [], self._spelled(None, 0), reasoning=thought, finish_reason="stop")

    def step(self, out: EngineOutput) -> GenerateChunk:
        """The chunk for one engine output (several merged, when the reader fell behind). It has a finish reason
        when the completion ends here: a stop string (the ids after the one completing it are not part of the
        completion), an engine error, or the engine finished the sequence."""
        reasoning, piece, used = self._push(out.new_token_ids)
        ids = out.new_token_ids[:used]
        delta, self._pending = self._pending + piece, ""
        thought, self._pending_reasoning = self._pending_reasoning + reasoning, ""
        logprobs = self._spelled(out.logprobs, len(ids))
        if self._text.stopped:
            reasoning, content = self._end("")
            return self._chunk(delta + content, ids, logprobs, reasoning=thought + reasoning, finish_reason="stop")
        if out.finish_reason is FinishReason.ERROR:
            err = errors.UpstreamError(f"generation failed: {out.error or 'engine error'}")
            return self._chunk(delta, ids, logprobs, reasoning=thought, finish_reason="error", error=err)
        if out.finish_reason is not None:
            reasoning, content = self._end(self._text.finish())  # what was held back; a stop string may end in it
            reason = "stop" if self._text.stopped else out.finish_reason.value
            return self._chunk(
                delta + content,
                ids,
                logprobs,
                reasoning=thought + reasoning,
                finish_reason=cast(WireFinishReason, reason),
            )
        return self._chunk(delta, ids, logprobs, reasoning=thought)

    def ended_early(self) -> GenerateChunk:
        """The last chunk when the engine's stream ended before a finished output."""
        err = errors.UpstreamError("engine ended the stream early")
        return self._chunk("", [], self._spelled(None, 0), finish_reason="error", error=err)

    def _push(self, ids: Sequence[int]) -> tuple[str, str, int]:
        """The reasoning and the content of `ids`, and how many of them the output took (a stop string may end it
        inside the run). Until the answer starts the ids go one at a time, so that the reasoning's are counted
        whatever the ids' grouping into engine outputs."""
        split = self._split
        if split is None:
            text, used = self._text.push_counted(ids)
            self._done += used
            return "", text, used
        reasoning = content = ""
        used = 0
        while used < len(ids) and not split.answering and not self._text.stopped:
            r, c = split.push(self._text.push(ids[used : used + 1]))
            reasoning, content, used = reasoning + r, content + c, used + 1
            self._done += 1
            if split.reasoned:
                self._reasoning_tokens = self._done
        if used < len(ids) and not self._text.stopped:
            text, n = self._text.push_counted(ids[used:])
            r, c = split.push(text)
            reasoning, content, used = reasoning + r, content + c, used + n
            self._done += n
        return reasoning, content, used

    def _end(self, text: str) -> tuple[str, str]:
        """The end of the output, `text` held back until now: its reasoning and content, and the split's last."""
        split = self._split
        if split is None:
            return "", text
        thinking = not split.answering
        reasoning, content = split.push(text)
        more_reasoning, more_content = split.finish()
        if thinking and split.reasoned:
            self._reasoning_tokens = self._done
        return reasoning + more_reasoning, content + more_content

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
        reasoning: str = "",
        finish_reason: WireFinishReason | None = None,
        error: errors.LmfleetError | None = None,
    ) -> GenerateChunk:
        """A chunk of `delta` (the answer) and `reasoning`, with tool calls parsed out of the answer; the last one (a
        finish reason) also takes what the parser still holds, and says "tool_calls" rather than "stop" when it found
        any."""
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
            reasoning=reasoning,
            tool_calls=pieces,
            token_ids=ids,
            finish_reason=finish_reason,
            stop_string=self._text.stop_string if finish_reason == "stop" else None,
            prompt_tokens=len(self._prompt),
            completion_tokens=self._done,
            reasoning_tokens=self._reasoning_tokens,
            error=ErrorInfo(**error.body()["error"]) if error is not None else None,
            prompt_token_ids=opening,
            cached_tokens=self.cached_tokens if opening is not None else 0,
            logprobs=logprobs,
        )
