"""What the API server lets in: which routes are public, and the per-request limits its operator set by flag.

Owns
  * `PUBLIC_PATHS`: the only routes reachable without an API key (health, readiness, the docs and the schema, the
    web page's files; and `GET /`, which redirects to the page); `/metrics` too when the operator says so
    (`--metrics-public`).
    Everything else, including any route added later and any unknown path, needs a key when keys are
    configured: `needs_key` is a deny-by-default test, so a new route cannot be left open by mistake.
  * `presented_key`: where a request's key is read, on every route: `Authorization: Bearer <key>` (OpenAI's
    clients, and Anthropic's with an auth token), else `x-api-key: <key>` (Anthropic's clients and Claude Code).
    One rule everywhere rather than a header per route: the keys and their check are the same, and a client of
    one protocol that lists models or reads a stored response needs no second way to say who it is.
  * `RequestLimits`: limits the operator may tighten with flags (`--max-n`, `--max-stop`, `--max-stop-chars`,
    `--max-messages`, `--max-message-chars`), checked after the request is parsed. The ceilings are the
    `Field()` limits of lmfleet.protocol.openai (what `/openapi.json` documents); a limit can be set lower,
    never higher. Each refusal is a 400 naming the parameter.

Does not own: comparing keys (the gate in lmfleet.api.app, with lmfleet.guard's constant-time comparison), body
size and JSON sanity (lmfleet.guard), `max_tokens` against the model's context (the worker knows the context; it
answers 400 context_length_exceeded).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from starlette.datastructures import Headers
from starlette.types import Scope

from lmfleet import errors
from lmfleet.docs import ASSET_PATHS
from lmfleet.protocol.openai import MAX_MESSAGES, MAX_N, MAX_STOP, MAX_STOP_CHARS

UI_PATHS = frozenset({"/ui", "/ui/app.js", "/ui/markdown.js", "/ui/style.css"})  # lmfleet/api/ui/static/

# Reachable without a key: probes, the docs pages and their assets (lmfleet.docs), the schema, and the web page's
# files (lmfleet.api.ui: the page asks for a key itself; its data, `/v1/fleet` and the OpenAI routes, need one).
PUBLIC_PATHS = frozenset(
    {"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", *ASSET_PATHS, *UI_PATHS}
)
PUBLIC_GETS = frozenset({"/"})  # GET / sends a browser to the page; POST / is FastChat's chat route (key needed)

DEFAULT_MAX_MESSAGE_CHARS = 1_000_000  # one message's (or prompt's) text; ~250k tokens of English


def route_path(scope: Scope) -> str:
    """The path the router matches (without the `root_path` a proxy may mount the app under)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def is_public(method: str, path: str, public: frozenset[str] = PUBLIC_PATHS) -> bool:
    return path in public or (method in ("GET", "HEAD") and path in PUBLIC_GETS)


def needs_key(scope: Scope, public: frozenset[str] = PUBLIC_PATHS) -> bool:
    """Deny by default: only `public` paths (`PUBLIC_PATHS`, plus /metrics with `--metrics-public`) and `GET /` go
    without a key."""
    return not is_public(scope["method"], route_path(scope), public)


def presented_key(headers: Headers) -> str | None:
    """The API key a request presents: the token of `Authorization: Bearer <key>`, else `x-api-key`; None when it
    presents neither."""
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    key = headers.get("x-api-key")
    return None if key is None else key.strip()


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits, each at most the protocol's ceiling (ValueError otherwise)."""

    max_n: int = MAX_N  # choices per prompt
    max_stop: int = MAX_STOP  # stop sequences per request
    max_stop_chars: int = MAX_STOP_CHARS  # characters per stop sequence
    max_messages: int = MAX_MESSAGES  # chat messages per request
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS  # characters of one message's content, or one prompt

    def __post_init__(self) -> None:
        ceilings = {
            "max_n": MAX_N,
            "max_stop": MAX_STOP,
            "max_stop_chars": MAX_STOP_CHARS,
            "max_messages": MAX_MESSAGES,
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
            if f.name in ceilings and value > ceilings[f.name]:
                raise ValueError(f"{f.name} can be at most {ceilings[f.name]}, got {value}")

    def check(self, body: Any) -> None:
        """InvalidRequest naming the parameter when a parsed ChatCompletionRequest / CompletionRequest passes a
        limit. The models' own Field limits have already held."""
        if body.n > self.max_n:
            raise _over("n", f"at most {self.max_n} choices per request, got {body.n}")
        stop = body.stop or []
        if len(stop) > self.max_stop:
            raise _over("stop", f"at most {self.max_stop} stop sequences, got {len(stop)}")
        for i, s in enumerate(stop):
            if len(s) > self.max_stop_chars:
                raise _over(f"stop.{i}", f"a stop sequence has at most {self.max_stop_chars} characters")
        messages = getattr(body, "messages", None)
        if messages is not None:
            if len(messages) > self.max_messages:
                raise _over("messages", f"at most {self.max_messages} messages, got {len(messages)}")
            for i, m in enumerate(messages):
                if m.content is not None and len(m.content) > self.max_message_chars:
                    raise _over(f"messages.{i}.content", f"a message has at most {self.max_message_chars} characters")
        for prompt in getattr(body, "prompt", None) or []:
            if isinstance(prompt, str) and len(prompt) > self.max_message_chars:
                raise _over("prompt", f"a prompt has at most {self.max_message_chars} characters")


def _over(param: str, why: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{param}: {why} on this server", param=param)
