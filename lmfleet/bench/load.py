"""The HTTP side of `lmfleet bench`: one pooled client sending each level's requests and reading the answers.

Owns `run_http` (the warmup, then each concurrency level: that many clients sending requests back to back until the
level's count is sent), `run_multi_turn` (the warmup, then every user's conversation at once, each turn sent once
the previous one is answered), `HttpBench` (one request: its deadline, its own SSE parsing, the error shapes of
OpenAI, vLLM, FastAPI and FastChat) and how tokens are counted: from the server's ``usage`` (streams request
``stream_options.include_usage``), else a stream's content chunks, else a non-streamed answer's whitespace-separated
words; the prompt tokens served from the server's cache from ``usage.prompt_tokens_details.cached_tokens`` (OpenAI,
lmfleet, vLLM, llama-server), else llama-server's ``timings.cache_n``. A failure is a result, never an exception
that ends the run. Does not own: the payload
(lmfleet.bench.payload), the summary (lmfleet.bench.stats), printing (lmfleet.bench.report).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from lmfleet.bench.payload import ENDPOINTS, Conversation, build_payload, make_prompt
from lmfleet.bench.report import BenchReport, progress, status
from lmfleet.bench.settings import BenchError, BenchSettings
from lmfleet.bench.stats import LevelResult, MultiTurnResult, RequestResult

_MAX_MESSAGE_CHARS = 300


class _RequestFailed(Exception):
    pass


def _error_text(body: Any) -> str:
    """The message of an OpenAI-shaped error body (or of the shapes vLLM / FastAPI / FastChat use)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return json.dumps(body)[:_MAX_MESSAGE_CHARS] if body is not None else "no body"


def _is_error_event(obj: dict[str, Any]) -> bool:
    return obj.get("error") is not None or obj.get("object") == "error"


async def _raise_forstatus(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    raw = await resp.aread()
    try:
        message = _error_text(json.loads(raw))
    except ValueError:
        message = raw.decode("utf-8", "replace").strip() or resp.reason_phrase
    raise _RequestFailed(f"HTTP {resp.status_code}: {message}"[:_MAX_MESSAGE_CHARS])


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None, None
    return _int(usage.get("completion_tokens")), _int(usage.get("prompt_tokens"))


def _cached(obj: dict[str, Any]) -> int | None:
    """The prompt tokens an answer (or a chunk of it) says were served from the server's cache, if it says."""
    usage, timings = obj.get("usage"), obj.get("timings")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    if isinstance(details, dict) and _int(details.get("cached_tokens")) is not None:
        return _int(details.get("cached_tokens"))
    return _int(timings.get("cache_n")) if isinstance(timings, dict) else None


class HttpBench:
    """Sends the requests of one benchmark over one pooled client."""

    def __init__(self, settings: BenchSettings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.http = http
        self.endpoint = ENDPOINTS[settings.endpoint]
        self.headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}

    async def default_model(self) -> str:
        url = self.settings.base_url + "/models"
        try:
            resp = await self.http.get(url, headers=self.headers, timeout=min(self.settings.timeout, 30.0))
            await _raise_forstatus(resp)
            data = resp.json().get("data")
            return str(data[0]["id"])
        except (httpx.HTTPError, _RequestFailed, ValueError, AttributeError, LookupError, TypeError) as exc:
            hint = "" if self.settings.base_url.endswith("/v1") else " (does --base-url need to end in /v1?)"
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise BenchError(f"could not get a model from GET {url}: {reason}{hint}; pass --model") from None

    async def one(self, model: str, index: int) -> RequestResult:
        """Send request `index`; never raises (except on cancellation): failures are results."""
        return await self.send(build_payload(self.settings, model, make_prompt(self.settings, index)))

    async def send(self, payload: dict[str, Any]) -> RequestResult:
        """Send one request; never raises (except on cancellation): failures are results."""
        start = time.perf_counter()
        send = self._stream if self.settings.stream else self._complete
        try:
            return await asyncio.wait_for(send(payload, start), timeout=self.settings.timeout)
        except asyncio.TimeoutError:
            error = f"timed out after {self.settings.timeout:g} s"
        except _RequestFailed as exc:
            error = str(exc)
        except httpx.TimeoutException:
            error = f"timed out after {self.settings.timeout:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # a malformed answer must count as one failed request, not end the run
            error = f"{type(exc).__name__}: {exc}"
        return RequestResult(ok=False, latency=time.perf_counter() - start, error=error[:_MAX_MESSAGE_CHARS])

    async def _complete(self, payload: dict[str, Any], start: float) -> RequestResult:
        url = self.settings.base_url + self.endpoint.path
        resp = await self.http.post(url, json=payload, headers=self.headers)
        await _raise_forstatus(resp)
        latency = time.perf_counter() - start
        try:
            body = resp.json()
        except ValueError:
            raise _RequestFailed(f"response is not JSON: {resp.text[:200]!r}") from None
        if not isinstance(body, dict) or _is_error_event(body):
            raise _RequestFailed(_error_text(body))
        out, prompt = _usage(body)
        choices: list[Any] = [c for c in body.get("choices") or [] if isinstance(c, dict)]
        text = self.endpoint.full_text(choices[0]) if choices else ""
        result = RequestResult(
            ok=True,
            latency=latency,
            output_tokens=out or 0,
            prompt_tokens=prompt,
            cached_tokens=_cached(body),
            text=text,
        )
        if out is None:
            result.output_tokens = sum(len(self.endpoint.full_text(c).split()) for c in choices)
            result.token_source = "words"
        return result

    async def _stream(self, payload: dict[str, Any], start: float) -> RequestResult:
        url = self.settings.base_url + self.endpoint.path
        content_times: list[float] = []
        usage_out: int | None = None
        usage_prompt: int | None = None
        cached: int | None = None
        pieces: list[str] = []  # the first choice's text
        events = 0
        done = False
        async with self.http.stream("POST", url, json=payload, headers=self.headers) as resp:
            await _raise_forstatus(resp)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, "event:", "id:", ": keep-alive" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    raise _RequestFailed(f"invalid SSE data: {data[:200]!r}") from None
                if not isinstance(obj, dict):
                    raise _RequestFailed(f"invalid SSE data: {data[:200]!r}")
                if _is_error_event(obj):
                    raise _RequestFailed(f"stream error: {_error_text(obj)}")
                events += 1
                out, prompt = _usage(obj)
                if out is not None:
                    usage_out, usage_prompt = out, prompt
                cached = _cached(obj) if cached is None else cached
                choices = obj.get("choices")
                if isinstance(choices, list) and any(
                    isinstance(c, dict) and self.endpoint.stream_text(c) for c in choices
                ):
                    content_times.append(time.perf_counter() - start)
                    pieces.extend(
                        self.endpoint.stream_text(c) for c in choices if isinstance(c, dict) and not c.get("index")
                    )
        latency = time.perf_counter() - start
        if not done and events == 0:
            raise _RequestFailed("stream ended without any data event")
        itl = [b - a for a, b in zip(content_times, content_times[1:], strict=False)]
        return RequestResult(
            ok=True,
            latency=latency,
            output_tokens=usage_out if usage_out is not None else len(content_times),
            prompt_tokens=usage_prompt,
            token_source="usage" if usage_out is not None else "chunks",
            ttft=content_times[0] if content_times else None,
            itl=itl,
            cached_tokens=cached,
            text="".join(pieces),
        )

    async def run_level(
        self, model: str, concurrency: int, n_requests: int, first_index: int, progress: Any = None
    ) -> tuple[list[RequestResult], float]:
        """`concurrency` clients each send requests back to back until `n_requests` have been sent."""
        indices = iter(range(first_index, first_index + n_requests))
        results: list[RequestResult] = []

        async def client() -> None:
            for index in indices:  # the iterator is shared: each index goes to exactly one client
                results.append(await self.one(model, index))
                if progress is not None:
                    progress.update(1)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(min(concurrency, n_requests))))
        return results, time.perf_counter() - start


async def converse(bench: HttpBench, model: str, user: int) -> list[tuple[int, RequestResult]]:
    """One user's conversation, closed loop: each turn (from 1) sent once the previous one is answered, its prompt
    the whole history; a turn that fails ends it (it has no answer to go on from)."""
    settings = bench.settings
    conversation = Conversation(settings, user)
    results = []
    for turn in range(1, settings.turns + 1):
        messages = conversation.ask()
        result = await bench.send(build_payload(settings, model, messages))
        results.append((turn, result))
        if not result.ok:
            break
        conversation.answered(messages, result.text)
    return results


async def run_multi_turn(settings: BenchSettings, *, http_client: httpx.AsyncClient | None = None) -> BenchReport:
    """Run --multi-turn against `settings.base_url`: the warmup (prompts unlike the conversations', so nothing of
    theirs is cached before they start), then every user's conversation at once."""
    if http_client is None:
        async with _client(settings, settings.users) as http:
            return await run_multi_turn(settings, http_client=http)

    bench = HttpBench(settings, http_client)
    model = settings.model or await bench.default_model()
    config = settings.public_config() | {"model": model}
    for key in ("raw", "model_path", "dtype", "device"):
        config.pop(key)
    status(settings, f"multi-turn: {settings.users} users x {settings.turns} turns on {model!r} at {settings.base_url}")
    await _warm(bench, model, min(settings.warmup, settings.users))
    with progress(settings.users * settings.turns, "turns", settings) as bar:

        async def user(index: int) -> list[tuple[int, RequestResult]]:
            results = await converse(bench, model, index)
            bar.update(len(results))
            return results

        start = time.perf_counter()
        conversations = await asyncio.gather(*(user(u) for u in range(settings.users)))
        wall = time.perf_counter() - start
    results = [r for c in conversations for r in c]
    result = MultiTurnResult.from_results(settings.users, settings.turns, results, wall)
    return BenchReport(mode="multi-turn", config=config, levels=[], multi_turn=result)


def _client(settings: BenchSettings, peak: int) -> httpx.AsyncClient:
    """One pooled client with a connection for each of `peak` requests at once."""
    limits = httpx.Limits(max_connections=peak + 4, max_keepalive_connections=peak + 4)
    timeout = httpx.Timeout(settings.timeout, connect=min(settings.timeout, 10.0))
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


async def _warm(bench: HttpBench, model: str, concurrency: int) -> None:
    """The warmup's requests (indices from 0), not measured; failures only reported."""
    settings = bench.settings
    if not settings.warmup:
        return
    with progress(settings.warmup, "warmup", settings) as bar:
        warm, _ = await bench.run_level(model, concurrency, settings.warmup, 0, bar)
    failed = [r for r in warm if not r.ok]
    if failed:
        status(settings, f"warmup: {len(failed)}/{len(warm)} requests failed, first: {failed[0].error}")


async def run_http(settings: BenchSettings, *, http_client: httpx.AsyncClient | None = None) -> BenchReport:
    """Run the sweep against `settings.base_url`. `http_client` is for tests; by default one is made here with a
    connection for every concurrent request."""
    if http_client is None:
        async with _client(settings, max(settings.concurrency)) as http:
            return await run_http(settings, http_client=http)

    bench = HttpBench(settings, http_client)
    model = settings.model or await bench.default_model()
    config = settings.public_config() | {"model": model}
    for key in ("raw", "model_path", "dtype", "device"):
        config.pop(key)
    mode = "stream" if settings.stream else "no stream"
    status(settings, f"benchmarking {model!r} at {settings.base_url} ({settings.endpoint}, {mode})")
    await _warm(bench, model, min(settings.warmup, max(settings.concurrency)))
    next_index = settings.warmup
    levels = []
    for c in settings.concurrency:
        n = settings.requests_for(c)
        with progress(n, f"concurrency {c}", settings) as bar:
            results, duration = await bench.run_level(model, c, n, next_index, bar)
        next_index += n
        levels.append(LevelResult.from_results(c, results, duration))
    return BenchReport(mode="http", config=config, levels=levels)
