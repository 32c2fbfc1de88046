"""A generation's path through the worker (lmfleet.worker.pipeline) driven directly, without HTTP: the real engine
runner over a scripted engine and the byte tokenizer. Stop strings, resumed generations, tool calls, log
probabilities, cancellation, and a request without a grammar never waiting behind another request's compile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from lmfleet import errors
from lmfleet.engine.base import Engine
from lmfleet.engine.runner import AsyncEngine
from lmfleet.protocol.worker import GenerateChunk, GenerateRequest, ToolFunction
from lmfleet.worker.pipeline import Pipeline
from lmfleet.worker.textgen import TextStream
from tests.fakes import ByteTokenizer, PausingEngine, ScriptedEngine, fake_logprob

SCRIPT = "Hello wörld 🙂 again."
SCRIPT_IDS = list(SCRIPT.encode())
PROMPT = [ord("x")]  # the prompt "x" in the byte tokenizer


@contextlib.asynccontextmanager
async def serving(engine: Engine, tokenizer: ByteTokenizer | None = None) -> AsyncIterator[Run]:
    runner = AsyncEngine(engine, max_queued=4)
    runner.start()
    tok = tokenizer or ByteTokenizer()
    try:
        yield Run(Pipeline(tok, max_model_len=engine.max_model_len, vocab_size=len(tok)), runner)
    finally:
        await runner.stop()


class Run:
    """A pipeline over a running engine."""

    def __init__(self, pipeline: Pipeline, runner: AsyncEngine) -> None:
        self.pipeline = pipeline
        self.runner = runner

    async def start(self, **body: Any) -> tuple[GenerateChunk, Any]:
        body.setdefault("request_id", "r1")
        prepared = await self.pipeline.prepare(GenerateRequest(**body))
        return await self.pipeline.start(prepared, self.runner)

    async def generate(self, **body: Any) -> list[GenerateChunk]:
        first, rest = await self.start(**body)
        return [first] + [c async for c in rest]


def text_of(chunks: list[GenerateChunk]) -> str:
    return "".join(c.text for c in chunks)


def ids_of(chunks: list[GenerateChunk]) -> list[int]:
    return sum((c.token_ids for c in chunks), [])


async def settles(check: Callable[[], bool]) -> bool:
    for _ in range(500):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def test_the_first_chunk_carries_the_prompt_ids_and_every_chunk_counts_what_was_generated() -> None:
    async with serving(ScriptedEngine(SCRIPT)) as run:
        chunks = await run.generate(messages=[{"role": "user", "content": "hi"}])
    prompt = list(b"user: hi\nassistant:")
    assert chunks[0].prompt_token_ids == prompt and all(c.prompt_token_ids is None for c in chunks[1:])
    assert text_of(chunks) == SCRIPT and ids_of(chunks) == SCRIPT_IDS
    assert [c.finish_reason for c in chunks][-1] == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].completion_tokens == len(SCRIPT_IDS) and chunks[-1].prompt_tokens == len(prompt)


async def test_a_stop_string_cuts_the_text_and_the_ids_and_aborts_the_sequence() -> None:
    engine = PausingEngine(pause_at=len("Hello wörld".encode()))  # holds the sequence where the stop string ends
    async with serving(engine) as run:
        try:
            chunks = await run.generate(prompt="x", stop=["wörld"], ignore_eos=True, max_tokens=100)
        finally:
            engine.release.set()
        assert await settles(lambda: not engine.running)
    assert text_of(chunks) == "Hello " and chunks[-1].finish_reason == "stop"
    assert ids_of(chunks) == list("Hello wörld".encode())  # up to the id that completed the stop string
    assert chunks[-1].completion_tokens == len("Hello wörld".encode())
    assert "r1" in engine.aborted  # the engine would have gone on (ignore_eos): the pipeline ended it


@pytest.mark.parametrize("stop", [[], ["🙂 ag"]])
async def test_a_resumed_generation_sends_exactly_the_text_not_yet_delivered(stop: list[str]) -> None:
    async with serving(ScriptedEngine(SCRIPT, continuing=True)) as run:
        whole = await run.generate(prompt_token_ids=PROMPT, max_tokens=len(SCRIPT_IDS), stop=stop)
        generated = ids_of(whole)
        for cut in range(len(generated)):  # a replica died after sending `cut` ids
            delivered = TextStream(ByteTokenizer(), PROMPT, stop).push(generated[:cut])
            resumed = await run.generate(
                request_id=f"r{cut}",
                prompt_token_ids=PROMPT,
                resume_token_ids=generated[:cut],
                resume_text_chars=len(delivered),
                max_tokens=len(SCRIPT_IDS),
                stop=stop,
            )
            assert delivered + text_of(resumed) == text_of(whole), cut
            assert generated[:cut] + ids_of(resumed) == generated, cut  # each id once
            assert resumed[-1].finish_reason == whole[-1].finish_reason
            assert resumed[-1].completion_tokens == whole[-1].completion_tokens


async def test_resumed_ids_that_already_end_in_a_stop_string_stop_at_once() -> None:
    engine = ScriptedEngine(SCRIPT, continuing=True)
    async with serving(engine) as run:
        done = list("Hello wörld".encode())
        chunks = await run.generate(
            prompt_token_ids=PROMPT, resume_token_ids=done, resume_text_chars=len("Hello "), stop=["wörld"]
        )
    assert text_of(chunks) == "" and chunks[-1].finish_reason == "stop" and ids_of(chunks) == []


ADD = ToolFunction(
    name="add",
    parameters={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
)
CALL = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


async def test_a_tool_call_is_parsed_out_of_the_text_and_ends_with_tool_calls() -> None:
    async with serving(ScriptedEngine(CALL, max_model_len=4096)) as run:
        chunks = await run.generate(
            messages=[{"role": "user", "content": "1 + 2?"}], tools=[ADD.model_dump()], tool_choice="auto"
        )
    pieces = [p for c in chunks for p in c.tool_calls]
    assert text_of(chunks).strip() == "Let me add." and "tool_call" not in text_of(chunks)
    assert [(p.index, p.name) for p in pieces if p.name] == [(0, "add")] and pieces[0].id
    assert json.loads("".join(p.arguments for p in pieces)) == {"a": 1, "b": 2}
    assert chunks[-1].finish_reason == "tool_calls"
    assert ids_of(chunks) == list(CALL.encode())  # every id is accounted for, the call's too


async def test_log_probabilities_come_one_per_id_spelled() -> None:
    async with serving(ScriptedEngine(SCRIPT)) as run:
        chunks = await run.generate(prompt_token_ids=PROMPT, logprobs=2, max_tokens=8)
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in chunks)
    entries = [e for c in chunks for e in c.logprobs or []]
    assert [e.bytes for e in entries] == [[t] for t in SCRIPT_IDS[:8]]
    assert [e.logprob for e in entries] == [
        fake_logprob(len(PROMPT) + i, t, 2).logprob for i, t in enumerate(SCRIPT_IDS[:8])
    ]
    assert all(len(e.top) == 2 for e in entries)


async def test_a_refusal_at_admission_is_the_public_error_before_any_chunk() -> None:
    engine = PausingEngine(pause_at=1)
    async with serving(engine) as run:
        try:
            _, held = await run.start(prompt="x", ignore_eos=True, max_tokens=50)
            with pytest.raises(errors.InvalidRequest) as refused:
                await run.start(prompt="y")  # the same request id
            assert refused.value.param == "request_id"
            await held.aclose()
        finally:
            engine.release.set()


@pytest.mark.parametrize("how", ["closed", "cancelled"])
async def test_a_consumer_that_stops_reading_aborts_the_request_in_the_engine(how: str) -> None:
    engine = PausingEngine(pause_at=3)  # holds the request at three ids until released
    async with serving(engine) as run:
        try:
            first, rest = await run.start(prompt="x", ignore_eos=True, max_tokens=50)
            got = [first]
            if how == "closed":  # the reader takes what the engine has made so far, then closes the stream
                while len(ids_of(got)) < 3:
                    got.append(await anext(rest))
                await rest.aclose()
            else:  # the task reading the stream is cancelled while it waits for the engine
                reading = asyncio.Event()

                async def read() -> None:
                    reading.set()
                    async for chunk in rest:
                        got.append(chunk)

                reader = asyncio.create_task(read())
                await reading.wait()  # the reader ran up to its first wait: inside the stream, for the engine
                assert await settles(lambda: len(ids_of(got)) == 3)
                reader.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reader
        finally:
            engine.release.set()
        assert await settles(lambda: not engine.running)
    assert "r1" in engine.aborted and all(c.finish_reason is None for c in got)


# ---------------------------------------------------------------------------------------------------------------
# Grammar compiles run in a thread; a request without a grammar never waits for one


class HeldVocabulary(ByteTokenizer):
    """The byte tokenizer whose grammar vocabulary (built by the first grammar compile) is held until `release`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.compiling = asyncio.Event()
        self.release = threading.Event()
        self._loop = loop

    def grammar_vocabulary(self) -> Any:
        self._loop.call_soon_threadsafe(self.compiling.set)
        self.release.wait()
        return super().grammar_vocabulary()


class OneThread(ThreadPoolExecutor):
    """An executor with a single thread that counts what is handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_a_request_without_a_grammar_is_answered_while_a_grammar_compiles() -> None:
    pytest.importorskip("llguidance")
    asyncio.run(plain_while_a_compile_is_held())


async def plain_while_a_compile_is_held() -> None:
    loop = asyncio.get_running_loop()
    executor = OneThread()  # the loop's executor, with its one thread taken by the compile
    loop.set_default_executor(executor)
    tokenizer = HeldVocabulary(loop)
    async with serving(ScriptedEngine(SCRIPT), tokenizer) as run:
        try:
            structured = asyncio.create_task(
                run.generate(request_id="json", prompt="x", json_schema={"type": "object"})
            )
            await tokenizer.compiling.wait()
            # A deadlock guard, not a timing check: a plain request that queued for the executor would wait forever.
            plain = await asyncio.wait_for(run.generate(request_id="plain", prompt="x"), timeout=120)
            assert text_of(plain) == SCRIPT and plain[-1].finish_reason == "stop"
            assert not structured.done() and executor.submitted == 1  # the compile alone went to the thread
        finally:
            tokenizer.release.set()
        compiled = await structured  # the compile finishes once released; the fake engine follows its grammar
        assert compiled[-1].finish_reason == "stop"
