"""The raw request edge every lmfleet process shares: body size and JSON well-formedness, before any route runs.

`RequestGuard` is a pure ASGI middleware. For a request with a body it
  * answers 413 when the body is over `max_bytes` (at once when Content-Length says so, else as soon as the
    streamed body passes the limit), and
  * when the body may be parsed as JSON (no Content-Type, `application/json` or `application/*+json`),
    answers 400 unless it is one JSON object in UTF-8 (a leading BOM is tolerated) with no duplicate keys, no
    integer too long to convert, no lone UTF-16 surrogate (`"\\ud800"`) and at most `max_depth` levels of
    nesting;
then hands the app the buffered body, unchanged, and the parsed object under `scope[PARSED_BODY]`: routes of the
class `ParsedBodyRoute` read it instead of parsing the JSON again (one parse per request per process). Every
refusal is an error in the request's style (lmfleet.errors: OpenAI's shape unless the route speaks another) whose
message says what is wrong; it quotes nothing from the body but a duplicated key's name.

`check_json(body)` is the same check as a plain function (tests, and any caller that already holds a body).

`BearerSecrets` is the one comparison of `Authorization: Bearer <token>` (or a bare token, as `x-api-key` holds
one) against configured secrets (API keys, the fleet's registration secret): over SHA-256 digests with
`hmac.compare_digest` and no short-circuit, so neither a secret's content nor its length shows in the timing.

Does not own: what the fields mean or their limits (pydantic models in lmfleet.protocol validate the parsed
object; NaN and Infinity, which Python's JSON accepts, are left to them, so the 400 names
the parameter), authentication (the API server's key gate runs before this, so an unauthenticated
client's body is never read), CORS.

Cost: one `json.loads` with an `object_pairs_hook` (a Python call per JSON object, a few per request), and a
walk over the values only when the raw bytes could hide a problem; the C parser does the rest. Bodies that are
not JSON (or empty) pass untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Coroutine, Iterable, Sequence
from email.message import Message as _ContentType
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmfleet import errors


class BearerSecrets:
    """Does a request's Authorization header (or another header holding a secret as it is) carry one of these
    secrets? Holds digests, never the secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(s.encode("utf-8")).digest() for s in secrets]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, authorization: str | None) -> bool:
        """`Authorization: Bearer <secret>`."""
        scheme, _, token = (authorization or "").partition(" ")
        return self.match_token(token) and scheme.lower() == "bearer"

    def match_token(self, token: str | None) -> bool:
        """The secret itself, as a header such as `x-api-key` holds it (surrounding spaces aside)."""
        # latin-1 undoes the header decoding, so the comparison is over the bytes the client sent
        presented = hashlib.sha256((token or "").strip().encode("latin-1", "replace")).digest()
        matches = [hmac.compare_digest(presented, d) for d in self._digests]  # no short-circuit
        return token is not None and any(matches)


PARSED_BODY = "lmfleet.parsed_body"  # the scope key RequestGuard leaves the parsed JSON body under
DEFAULT_MAX_DEPTH = 32  # an OpenAI chat body nests 4 deep; tool schemas rarely pass 10
_BOM = b"\xef\xbb\xbf"
# A `\uD800`-`\uDFFF` escape: only then can a string hold a lone surrogate (raw UTF-8 can not encode one).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class _Refused(ValueError):
    """A JSON body that parses but is not acceptable; the message is the client's error message."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Refused(f"request body has the key {json.dumps(dup)[:80]} more than once in one object")
    return obj


def _depth_and_strings(value: Any, max_depth: int, check_strings: bool) -> None:
    """Raise _Refused when containers nest deeper than `max_depth`, or (check_strings) a string holds a lone
    surrogate. Iterative: a hostile body must not exhaust the stack here either."""
    stack: list[tuple[Iterable[Any], int]] = [((value,), 0)]
    while stack:
        items, depth = stack.pop()
        for item in items:
            if isinstance(item, dict):
                if depth + 1 > max_depth:
                    raise _Refused(f"request body nests deeper than {max_depth} levels")
                if check_strings:
                    _strings_ok(item.keys())
                stack.append((item.values(), depth + 1))
            elif isinstance(item, list):
                if depth + 1 > max_depth:
                    raise _Refused(f"request body nests deeper than {max_depth} levels")
                stack.append((item, depth + 1))
            elif check_strings and isinstance(item, str):
                _strings_ok((item,))


def _strings_ok(strings: Iterable[str]) -> None:
    for s in strings:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused("request body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff)") from None


def check_json(body: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """The body as a dict, or `errors.InvalidRequest` saying what is wrong with it."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidRequest(f"request body is not valid UTF-8 (at byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Refused as exc:
        raise errors.InvalidRequest(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise errors.InvalidRequest(
            f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise errors.InvalidRequest(f"request body nests deeper than {max_depth} levels") from None
    except ValueError:  # an integer with more digits than Python converts
        raise errors.InvalidRequest("request body contains an integer with too many digits") from None
    if not isinstance(value, dict):
        raise errors.InvalidRequest(f"request body must be a JSON object, not {_json_kind(value)}")
    # The walk costs a Python step per value; skip it when the raw bytes show it cannot find anything (fewer
    # brackets than `max_depth`, no surrogate escape), as for a long list of token ids.
    check_strings = _SURROGATE_ESCAPE.search(body) is not None
    if check_strings or body.count(b"[") + body.count(b"{") > max_depth:
        try:
            _depth_and_strings(value, max_depth, check_strings=check_strings)
        except _Refused as exc:
            raise errors.InvalidRequest(str(exc)) from None
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(value), type(value).__name__
    )


def _is_json(headers: Headers) -> bool:
    """FastAPI's rule for parsing a body as JSON (a body without a Content-Type counts, as it does when FastAPI's
    strict content-type checking is off)."""
    content_type = headers.get("content-type")
    if not content_type:
        return True
    parsed = _ContentType()
    parsed["content-type"] = content_type
    if parsed.get_content_maintype() != "application":
        return False
    subtype = parsed.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


class RequestGuard:
    """See the module docstring. `max_bytes=None` means no size limit (JSON checks only)."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if max_depth < 1:
            raise ValueError("max_depth must be positive")
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    def _too_large(self) -> errors.PayloadTooLarge:
        return errors.PayloadTooLarge(f"The request body is larger than the limit of {self.max_bytes} bytes.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if self.max_bytes is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _reply(self._too_large(), scope, receive, send)
            return
        body = await self._read(receive)  # a request without a body reads as b"" at once
        if isinstance(body, errors.LmfleetError):
            await _reply(body, scope, receive, send)
            return
        if body is None:  # the client went away mid-body: nobody to answer
            return
        if body and _is_json(headers):
            try:
                scope[PARSED_BODY] = check_json(body, max_depth=self.max_depth)
            except errors.InvalidRequest as exc:
                await _reply(exc, scope, receive, send)
                return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | errors.PayloadTooLarge | None:
        """The whole body; PayloadTooLarge once it passes the limit; None if the client disconnected first."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.max_bytes is not None and size > self.max_bytes:
                return self._too_large()
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body once, then whatever the client sends next (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(exc: errors.LmfleetError, scope: Scope, receive: Receive, send: Send) -> None:
    await errors.response(exc, scope)(scope, receive, send)


class _ParsedBodyRequest(Request):
    async def json(self) -> Any:
        if PARSED_BODY in self.scope:
            return self.scope[PARSED_BODY]
        return await super().json()


class ParsedBodyRoute(APIRoute):
    """A FastAPI route whose body is the object `RequestGuard` already parsed (FastAPI's documented custom
    `APIRoute`/`Request` pair): set `app.router.route_class = ParsedBodyRoute` before adding routes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parsed_body_handler(request: Request) -> Response:
            return await handler(_ParsedBodyRequest(request.scope, request.receive))

        return parsed_body_handler
