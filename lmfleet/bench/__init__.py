"""`lmfleet bench`: a load generator for any OpenAI-compatible endpoint, and the in-process raw-decode baseline.

Owns: the benchmark command line (`build_parser`, `main`), one sweep over concurrency levels against
``/chat/completions`` or ``/completions`` (our API server, vLLM, FastChat, llama.cpp server, transformers serve),
its own SSE parsing, the per-level summary (requests ok / failed, output tokens, output tok/s, request/s, time to
first token, inter-token latency and end-to-end latency percentiles), the terminal table and the JSON report.
With ``--raw`` it instead measures a model's own aligned-batch greedy decode in process, one batch size per level,
through `lmfleet.bench.raw` (imported only then: this module never imports torch at import time).

Does not own: any server. It is bounded by construction: each level sends a fixed number of requests, each with a
deadline, then stops. Output tokens come from the server's ``usage`` (streams request
``stream_options.include_usage``); a stream without usage counts its content chunks, a non-streamed answer without
usage counts whitespace-separated words (``token_source`` in the JSON says which were used).

    lmfleet bench --base-url http://127.0.0.1:8000/v1 --concurrency 1,4,16 --max-tokens 64 --json out.json
    lmfleet bench --raw --model-path DIR --dtype bfloat16 --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
MAX_ERROR_MESSAGES = 5  # distinct error messages kept per level
_MAX_MESSAGE_CHARS = 300

# Common English words: most are one token in any BPE vocabulary, so N words is roughly N prompt tokens.
_WORDS = (
    "the of and to in is was for that on as with by it at from his an were are which this be or has had not "
    "first one their its new after but who they have her she two been other when there all during into school "
    "time may years more most only over city some world would where later up such used many can state about "
    "national out known university united then made also three united between team under name part work water "
    "house river music game early long family group people season village area line well high small power"
).split()


class BenchError(Exception):
    """A setup problem the user must fix (server unreachable, no model, missing engine); main() exits with 2."""


# ---------------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Summary:
    """Distribution of one latency, in milliseconds."""

    n: int
    mean: float
    p50: float
    p95: float
    p99: float


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, interpolating linearly between ranks (numpy's
    default), so percentiles are monotone in q and lie within [min, max]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summarize(values_s: Sequence[float]) -> Summary | None:
    """Summarize durations given in seconds as milliseconds; None when there are none."""
    if not values_s:
        return None
    ms = sorted(v * 1000.0 for v in values_s)
    return Summary(
        n=len(ms),
        mean=sum(ms) / len(ms),
        p50=percentile(ms, 50),
        p95=percentile(ms, 95),
        p99=percentile(ms, 99),
    )


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class RequestResult:
    """What one request produced. Times are seconds from sending the request."""

    ok: bool
    latency: float
    error: str | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_source: str = "usage"  # usage | chunks | words
    ttft: float | None = None  # first content chunk (streams only)
    itl: list[float] = field(default_factory=list)  # gaps between content chunks (streams only)


@dataclass
class LevelResult:
    """One row of the report: one concurrency level (or, with --raw, one batch size)."""

    concurrency: int
    requests: int
    ok: int
    errors: int
    error_messages: list[str]
    output_tokens: int
    prompt_tokens: int | None
    duration_s: float
    output_tok_s: float
    requests_per_s: float | None
    ttft_ms: Summary | None
    itl_ms: Summary | None
    e2e_ms: Summary | None
    token_source: dict[str, int]

    @classmethod
    def from_results(cls, concurrency: int, results: Sequence[RequestResult], duration_s: float) -> LevelResult:
        good = [r for r in results if r.ok]
        messages: list[str] = []
        for r in results:
            if not r.ok and r.error and r.error not in messages and len(messages) < MAX_ERROR_MESSAGES:
                messages.append(r.error)
        out = sum(r.output_tokens for r in good)
        prompts = [r.prompt_tokens for r in good if r.prompt_tokens is not None]
        sources: dict[str, int] = {}
        for r in good:
            sources[r.token_source] = sources.get(r.token_source, 0) + 1
        duration_s = max(duration_s, 1e-9)
        return cls(
            concurrency=concurrency,
            requests=len(results),
            ok=len(good),
            errors=len(results) - len(good),
            error_messages=messages,
            output_tokens=out,
            prompt_tokens=sum(prompts) if prompts else None,
            duration_s=duration_s,
            output_tok_s=out / duration_s,
            requests_per_s=len(good) / duration_s,
            ttft_ms=summarize([r.ttft for r in good if r.ttft is not None]),
            itl_ms=summarize([gap for r in good for gap in r.itl]),
            e2e_ms=summarize([r.latency for r in good]),
            token_source=sources,
        )


@dataclass
class BenchReport:
    mode: str  # "http" or "raw"
    config: dict[str, Any]
    levels: list[LevelResult]

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "config": self.config, "levels": [asdict(level) for level in self.levels]}


# ---------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BenchSettings:
    base_url: str = DEFAULT_BASE_URL
    model: str | None = None  # None: the first model of GET /models
    api_key: str | None = field(default=None, repr=False)
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int | None = None  # per level; None: 2 x concurrency. Never fewer than the concurrency.
    prompt_tokens: int = 20
    prompt: str | None = None
    max_tokens: int = 64
    endpoint: str = "chat"
    stream: bool = True
    ignore_eos: bool = False
    logprobs: int | None = None  # ask for log probabilities with this many alternatives per token
    temperature: float = 0.0
    response_format: dict[str, Any] | None = field(default=None, repr=False)  # chat: structured output
    timeout: float = 300.0  # seconds per request, end to end
    warmup: int = 1
    json_path: str | None = None  # "-" for stdout
    quiet: bool = False
    raw: bool = False
    model_path: str | None = None
    dtype: str = "float32"
    device: str = "cpu"

    def requests_for(self, concurrency: int) -> int:
        return max(self.requests if self.requests is not None else 2 * concurrency, concurrency)

    def public_config(self) -> dict[str, Any]:
        """The settings as recorded in the JSON report (never the API key)."""
        cfg = asdict(self)
        del cfg["api_key"]
        cfg["concurrency"] = list(self.concurrency)
        cfg["requests_per_level"] = {str(c): self.requests_for(c) for c in self.concurrency}
        return cfg


def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,16, got {text!r}") from None
    if not levels or any(c < 1 or c > 10_000 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers from 1 to 10000, got {text!r}")
    return levels


def _bounded(kind: type, low: float, high: float | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    return parse


def build_parser(prog: str = "lmfleet bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Load-test an OpenAI-compatible endpoint over a sweep of concurrency levels "
        "(or, with --raw, measure a model's own batched decode in process).",
    )
    target = p.add_argument_group("target")
    target.add_argument("--base-url", default=DEFAULT_BASE_URL, help="API root, ending in /v1 (default: %(default)s)")
    target.add_argument("--model", default=None, help="model name (default: the first of GET /models)")
    target.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY; none when unset)")
    target.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat", help="default: %(default)s")
    target.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="stream responses (default: on)"
    )
    target.add_argument(
        "--timeout",
        type=_bounded(float, 0.001),
        default=300.0,
        help="seconds per request, end to end (default: %(default)s)",
    )

    load = p.add_argument_group("load")
    load.add_argument(
        "--concurrency", type=_concurrency_list, default=(1, 4, 16), help="levels to sweep, e.g. 1,4,16 (default)"
    )
    load.add_argument(
        "--requests",
        type=_bounded(int, 1, 1_000_000),
        default=None,
        help="requests per level (default: 2x the level; never fewer than the level)",
    )
    load.add_argument(
        "--warmup",
        type=_bounded(int, 0, 10_000),
        default=1,
        help="unmeasured requests sent before the sweep (default: %(default)s)",
    )
    prompt = load.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt-tokens",
        type=_bounded(int, 1, 1_000_000),
        default=20,
        help="approximate prompt length in words, different words per request (default: %(default)s)",
    )
    prompt.add_argument("--prompt", default=None, help="send this exact prompt in every request")
    load.add_argument("--max-tokens", type=_bounded(int, 1, 10_000_000), default=64, help="default: %(default)s")
    load.add_argument("--temperature", type=_bounded(float, 0.0, 100.0), default=0.0, help="default: 0")
    load.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send the vLLM extension ignore_eos=true so every request generates exactly --max-tokens "
        "(real OpenAI rejects unknown fields)",
    )
    load.add_argument(
        "--logprobs",
        type=_bounded(int, 0, 20),
        default=None,
        metavar="K",
        help="ask for log probabilities with K alternatives per token (chat: logprobs + top_logprobs=K; "
        "completions: logprobs=K, at most 5 on OpenAI)",
    )

    load.add_argument(
        "--response-format",
        type=_response_format,
        default=None,
        metavar="json_object|SCHEMA",
        help="chat: ask for JSON (json_object) or JSON valid against a schema (a file, or inline JSON)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--json", dest="json_path", metavar="PATH", default=None, help="write results as JSON (- for stdout)"
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar or status lines")

    raw = p.add_argument_group("raw decode (in process, needs the worker extras)")
    raw.add_argument("--raw", action="store_true", help="measure the model's aligned-batch decode, batch = level")
    raw.add_argument("--model-path", default=None, help="model directory for --raw")
    raw.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="default: %(default)s")
    raw.add_argument("--device", default="cpu", help="default: %(default)s")
    return p


def _response_format(value: str) -> dict[str, Any]:
    """`--response-format`: json_object, or a JSON schema (inline, or a file holding one)."""
    if value == "json_object":
        return {"type": "json_object"}
    try:
        text = value if value.lstrip().startswith("{") else Path(value).read_text()
        schema = json.loads(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not json_object, a JSON schema or a file holding one: {exc}") from None
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema, "strict": True}}


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        base_url=args.base_url.rstrip("/"),
        model=args.model,
        api_key=args.api_key if args.api_key is not None else (os.environ.get("OPENAI_API_KEY") or None),
        concurrency=tuple(args.concurrency),
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        endpoint=args.endpoint,
        stream=args.stream,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        temperature=args.temperature,
        response_format=args.response_format,
        timeout=args.timeout,
        warmup=args.warmup,
        json_path=args.json_path,
        quiet=args.quiet,
        raw=args.raw,
        model_path=args.model_path,
        dtype=args.dtype,
        device=args.device,
    )


# ---------------------------------------------------------------------------------------------------- endpoints


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _chat_delta_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return ""
    # Reasoning models stream their thinking in a separate field; it is output all the same.
    return _text(delta.get("content")) or _text(delta.get("reasoning_content")) or _text(delta.get("reasoning"))


def _chat_message_text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    if not isinstance(message, dict):
        return ""
    return _text(message.get("content")) + _text(message.get("reasoning_content"))


@dataclass(frozen=True)
class Endpoint:
    """How one OpenAI route takes a prompt and where its text comes back."""

    path: str
    prompt_body: Callable[[str], dict[str, Any]]
    logprobs_body: Callable[[int], dict[str, Any]]  # ask for log probabilities with k alternatives
    stream_text: Callable[[dict[str, Any]], str]  # a streamed choice -> the text it adds
    full_text: Callable[[dict[str, Any]], str]  # a non-streamed choice -> its text


ENDPOINTS: dict[str, Endpoint] = {
    "chat": Endpoint(
        path="/chat/completions",
        prompt_body=lambda prompt: {"messages": [{"role": "user", "content": prompt}]},
        logprobs_body=lambda k: {"logprobs": True, "top_logprobs": k},
        stream_text=_chat_delta_text,
        full_text=_chat_message_text,
    ),
    "completions": Endpoint(
        path="/completions",
        prompt_body=lambda prompt: {"prompt": prompt},
        logprobs_body=lambda k: {"logprobs": k},
        stream_text=lambda choice: _text(choice.get("text")),
        full_text=lambda choice: _text(choice.get("text")),
    ),
}


def make_prompt(settings: BenchSettings, index: int) -> str:
    """The prompt of request `index`: --prompt as given, else --prompt-tokens words drawn with seed `index`, so
    prompts differ from the first word and no server can answer from a prefix cache."""
    if settings.prompt is not None:
        return settings.prompt
    rng = random.Random(index)
    return " ".join(rng.choice(_WORDS) for _ in range(settings.prompt_tokens))


def build_payload(settings: BenchSettings, model: str, prompt: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        **ENDPOINTS[settings.endpoint].prompt_body(prompt),
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": settings.stream,
    }
    if settings.stream:
        payload["stream_options"] = {"include_usage": True}
    if settings.ignore_eos:
        payload["ignore_eos"] = True
    if settings.response_format is not None and settings.endpoint == "chat":  # completions take no response_format
        payload["response_format"] = settings.response_format
    if settings.logprobs is not None:
        payload.update(ENDPOINTS[settings.endpoint].logprobs_body(settings.logprobs))
    return payload


# ---------------------------------------------------------------------------------------------------- HTTP


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


async def _raise_for_status(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    raw = await resp.aread()
    try:
        message = _error_text(json.loads(raw))
    except ValueError:
        message = raw.decode("utf-8", "replace").strip() or resp.reason_phrase
    raise _RequestFailed(f"HTTP {resp.status_code}: {message}"[:_MAX_MESSAGE_CHARS])


def _usage(obj: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None, None
    out, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return (out if isinstance(out, int) else None), (prompt if isinstance(prompt, int) else None)


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
            await _raise_for_status(resp)
            data = resp.json().get("data")
            return str(data[0]["id"])
        except (httpx.HTTPError, _RequestFailed, ValueError, AttributeError, LookupError, TypeError) as exc:
            hint = "" if self.settings.base_url.endswith("/v1") else " (does --base-url need to end in /v1?)"
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise BenchError(f"could not get a model from GET {url}: {reason}{hint}; pass --model") from None

    async def one(self, model: str, index: int) -> RequestResult:
        """Send request `index`; never raises (except on cancellation): failures are results."""
        payload = build_payload(self.settings, model, make_prompt(self.settings, index))
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
        await _raise_for_status(resp)
        latency = time.perf_counter() - start
        try:
            body = resp.json()
        except ValueError:
            raise _RequestFailed(f"response is not JSON: {resp.text[:200]!r}") from None
        if not isinstance(body, dict) or _is_error_event(body):
            raise _RequestFailed(_error_text(body))
        out, prompt = _usage(body)
        if out is not None:
            return RequestResult(ok=True, latency=latency, output_tokens=out, prompt_tokens=prompt)
        choices: list[Any] = body["choices"] if isinstance(body.get("choices"), list) else []
        words = sum(len(self.endpoint.full_text(c).split()) for c in choices if isinstance(c, dict))
        return RequestResult(ok=True, latency=latency, output_tokens=words, prompt_tokens=prompt, token_source="words")

    async def _stream(self, payload: dict[str, Any], start: float) -> RequestResult:
        url = self.settings.base_url + self.endpoint.path
        content_times: list[float] = []
        usage_out: int | None = None
        usage_prompt: int | None = None
        events = 0
        done = False
        async with self.http.stream("POST", url, json=payload, headers=self.headers) as resp:
            await _raise_for_status(resp)
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
                choices = obj.get("choices")
                if isinstance(choices, list) and any(
                    isinstance(c, dict) and self.endpoint.stream_text(c) for c in choices
                ):
                    content_times.append(time.perf_counter() - start)
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


def _progress(total: int, desc: str, settings: BenchSettings) -> Any:
    from tqdm import tqdm

    disable = settings.quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=disable, leave=False)


def _status(settings: BenchSettings, message: str) -> None:
    if not settings.quiet:
        print(message, file=sys.stderr, flush=True)


async def run_http(settings: BenchSettings, *, http_client: httpx.AsyncClient | None = None) -> BenchReport:
    """Run the sweep against `settings.base_url`. `http_client` is for tests; by default one is made here with a
    connection for every concurrent request."""
    if http_client is None:
        peak = max(settings.concurrency)
        limits = httpx.Limits(max_connections=peak + 4, max_keepalive_connections=peak + 4)
        timeout = httpx.Timeout(settings.timeout, connect=min(settings.timeout, 10.0))
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as http:
            return await run_http(settings, http_client=http)

    bench = HttpBench(settings, http_client)
    model = settings.model or await bench.default_model()
    config = settings.public_config() | {"model": model}
    for key in ("raw", "model_path", "dtype", "device"):
        config.pop(key)
    mode = "stream" if settings.stream else "no stream"
    _status(settings, f"benchmarking {model!r} at {settings.base_url} ({settings.endpoint}, {mode})")
    next_index = 0
    if settings.warmup:
        warm_c = min(settings.warmup, max(settings.concurrency))
        with _progress(settings.warmup, "warmup", settings) as bar:
            warm, _ = await bench.run_level(model, warm_c, settings.warmup, next_index, bar)
        next_index += settings.warmup
        failed = [r for r in warm if not r.ok]
        if failed:
            _status(settings, f"warmup: {len(failed)}/{len(warm)} requests failed, first: {failed[0].error}")
    levels = []
    for c in settings.concurrency:
        n = settings.requests_for(c)
        with _progress(n, f"concurrency {c}", settings) as bar:
            results, duration = await bench.run_level(model, c, n, next_index, bar)
        next_index += n
        levels.append(LevelResult.from_results(c, results, duration))
    return BenchReport(mode="http", config=config, levels=levels)


# ---------------------------------------------------------------------------------------------------- raw decode


def run_raw(settings: BenchSettings) -> BenchReport:
    """Measure the raw decode (lmfleet.bench.raw) at each level as the batch size, on the model at --model-path."""
    if not settings.model_path:
        raise BenchError("--raw needs --model-path")
    try:
        from lmfleet.bench.raw import load_model, raw_decode

        _status(settings, f"loading {settings.model_path} ({settings.dtype}, {settings.device})")
        model = load_model(settings.model_path, dtype=settings.dtype, device=settings.device)
    except ImportError as exc:
        raise BenchError(f"--raw needs torch and transformers (pip install 'lmfleet[transformers]'): {exc}") from None

    prompt_len, new_tokens = settings.prompt_tokens, settings.max_tokens
    if settings.warmup:
        raw_decode(model, 1, prompt_len=prompt_len, new_tokens=min(new_tokens, 8))
    levels = []
    with _progress(len(settings.concurrency), "raw decode", settings) as bar:
        for batch in settings.concurrency:
            run = raw_decode(model, batch, prompt_len=prompt_len, new_tokens=new_tokens)
            tok_s, out = run.tok_s, run.tokens
            levels.append(
                LevelResult(
                    concurrency=batch,
                    requests=batch,
                    ok=batch,
                    errors=0,
                    error_messages=[],
                    output_tokens=out,
                    prompt_tokens=batch * prompt_len,
                    duration_s=out / tok_s if tok_s > 0 else math.inf,
                    output_tok_s=tok_s,
                    requests_per_s=None,
                    ttft_ms=None,
                    itl_ms=None,
                    e2e_ms=None,
                    token_source={"exact": batch},
                )
            )
            bar.update(1)
    config = settings.public_config()
    for key in ("base_url", "model", "endpoint", "stream", "timeout", "requests", "requests_per_level", "prompt"):
        config.pop(key, None)
    return BenchReport(mode="raw", config=config, levels=levels)


# ---------------------------------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: BenchReport) -> str:
    """Plain-text table, one row per level: TTFT and ITL in milliseconds, end-to-end latency in seconds."""
    columns: list[tuple[str, str, list[str]]] = [  # (group, header, cells)
        ("", "batch" if report.mode == "raw" else "conc", [str(lv.concurrency) for lv in report.levels]),
        ("", "ok", [str(lv.ok) for lv in report.levels]),
        ("", "err", [str(lv.errors) for lv in report.levels]),
        ("", "out tok", [str(lv.output_tokens) for lv in report.levels]),
        ("", "out tok/s", [_num(lv.output_tok_s) for lv in report.levels]),
        ("", "req/s", [_num(lv.requests_per_s, 2) for lv in report.levels]),
    ]
    for group, attr, scale, digits in (
        ("TTFT ms", "ttft_ms", 1, 1),
        ("ITL ms", "itl_ms", 1, 1),
        ("E2E s", "e2e_ms", 1000, 2),
    ):
        for q in ("p50", "p95", "p99"):
            cells = []
            for lv in report.levels:
                s = getattr(lv, attr)
                cells.append(_num(None if s is None else getattr(s, q) / scale, digits))
            columns.append((group, q, cells))

    widths = [max(len(header), *(len(c) for c in cells)) for _, header, cells in columns]
    # Group headers span their columns (joined by two spaces) and are centered over them.
    group_line: list[str] = []
    i = 0
    while i < len(columns):
        j = i
        while j < len(columns) and columns[j][0] == columns[i][0]:
            j += 1
        span = sum(widths[i:j]) + 2 * (j - i - 1)
        group_line.append(columns[i][0].center(span) if columns[i][0] else " " * span)
        i = j
    lines = ["  ".join(group_line).rstrip()]
    lines.append("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for row in range(len(report.levels)):
        lines.append("  ".join(cells[row].rjust(w) for (_, _, cells), w in zip(columns, widths, strict=True)))
    for lv in report.levels:
        if lv.errors:
            lines.append(f"level {lv.concurrency}: {lv.errors} of {lv.requests} requests failed:")
            lines.extend(f"  - {m}" for m in lv.error_messages)
    estimated = sorted({src for lv in report.levels for src in lv.token_source if src in ("chunks", "words")})
    if estimated:
        lines.append(f"note: no usage from the server; output tokens counted as {' and '.join(estimated)}")
    return "\n".join(lines)


def _write_json(report: BenchReport, path: str) -> None:
    text = json.dumps(report.to_json(), indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 when every level had at least one successful request, 1 when some level had none,
    2 for a usage or setup error, 130 when interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.raw and not args.model_path:
        parser.error("--raw needs --model-path")
    if args.raw and args.prompt is not None:
        parser.error("--raw builds its own prompts: use --prompt-tokens, not --prompt")
    if args.model_path and not args.raw:
        parser.error("--model-path is only used with --raw")
    if args.json_path not in (None, "-") and not os.path.isdir(os.path.dirname(args.json_path) or "."):
        parser.error(f"--json: directory of {args.json_path!r} does not exist")
    settings = settings_from_args(args)
    table_out: TextIO = sys.stderr if settings.json_path == "-" else sys.stdout
    try:
        report = run_raw(settings) if settings.raw else asyncio.run(run_http(settings))
    except BenchError as exc:
        print(f"lmfleet bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmfleet bench: interrupted", file=sys.stderr)
        return 130
    print(format_table(report), file=table_out, flush=True)
    if settings.json_path:
        try:
            _write_json(report, settings.json_path)
        except OSError as exc:
            print(f"lmfleet bench: error: cannot write {settings.json_path}: {exc}", file=sys.stderr)
            return 2
    return 0 if all(level.ok > 0 for level in report.levels) else 1


if __name__ == "__main__":
    sys.exit(main())
