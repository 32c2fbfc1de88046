"""The exception tree and the one map from it to an HTTP status and the error JSON of each wire we speak.

                                   status  OpenAI type, code                                Anthropic type
    LmfleetError                   500     internal_error (a bug; no internals in the text) api_error
    ├── InvalidRequest             400     invalid_request_error                            invalid_request_error
    │   └── ContextLengthExceeded  400     invalid_request_error, context_length_exceeded   invalid_request_error
    ├── AuthenticationFailed       401     invalid_request_error, invalid_api_key           authentication_error
    ├── Forbidden                  403     invalid_request_error, forbidden                 permission_error
    ├── NotFound                   404     invalid_request_error                            not_found_error
    │   └── ModelNotFound          404     invalid_request_error, model_not_found           not_found_error
    ├── MethodNotAllowed           405     invalid_request_error                            invalid_request_error
    ├── PayloadTooLarge            413     invalid_request_error                            request_too_large
    ├── QueueFull                  429     rate_limit_error (Retry-After)                   rate_limit_error
    ├── ServiceUnavailable         503     service_unavailable_error                        overloaded_error
    │   └── NoWorkerAvailable      503     service_unavailable_error, no_worker_available   overloaded_error
    └── UpstreamError              502     upstream_error (a worker failed mid-request)     api_error

Every process (controller, worker, API server) raises these and installs `install_handlers(app)`, so every error
on every route is spelled by this module: by default in OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``. The worker sends that body to the API server, which rebuilds the exception with `from_body` and passes
it on unchanged.

Error styles (`STYLES`): a request whose scope says `ERROR_STYLE` (set by `ErrorStyles`, a middleware the API
server puts in front of the routes of another protocol) gets its errors in that protocol's shape instead, from
every speller alike (these handlers, lmfleet.guard, the drain gate, the API-key gate): `anthropic` is
``{"type": "error", "error": {"type", "message"}, "request_id"}`` with the Anthropic type above (by status, so an
error rebuilt from a worker's body maps too) and the same HTTP status. lmfleet keeps its own statuses there: 502
and 503 are not in Anthropic's list, and the Anthropic clients treat every 5xx as retryable, as they treat 529.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.responses import JSONResponse
    from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("lmfleet")


class LmfleetError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(
        self,
        message: str = "internal error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(LmfleetError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(LmfleetError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(LmfleetError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(LmfleetError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(LmfleetError):
    status = 405
    type = "invalid_request_error"


class PayloadTooLarge(LmfleetError):
    status = 413
    type = "invalid_request_error"


class QueueFull(LmfleetError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str = "server is at capacity, retry later", *, retry_after: int = 1, **kw: Any):
        super().__init__(message, **kw)
        self.headers.setdefault("Retry-After", str(retry_after))


class ServiceUnavailable(LmfleetError):
    status = 503
    type = "service_unavailable_error"


class NoWorkerAvailable(ServiceUnavailable):
    code = "no_worker_available"


class UpstreamError(LmfleetError):
    status = 502
    type = "upstream_error"


_BY_STATUS: dict[int, type[LmfleetError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    429: QueueFull,
    502: UpstreamError,
    503: ServiceUnavailable,
}


# ---------------------------------------------------------------------------------------------------------------
# Error styles: the error JSON of each wire

ERROR_STYLE = "lmfleet.error_style"  # the scope key naming a request's style (a key of STYLES); absent: "openai"

# Anthropic's error types by HTTP status (its published list; other 4xx are invalid_request_error, other 5xx
# api_error).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_body(exc: LmfleetError) -> dict[str, Any]:
    """`exc` in Anthropic's error shape (also the data of a stream's `error` event), with the request's id."""
    from lmfleet import requestid

    body: dict[str, Any] = {"type": "error", "error": {"type": anthropic_type(exc.status), "message": exc.message}}
    request_id = requestid.current()
    if request_id is not None:
        body["request_id"] = request_id
    return body


STYLES: dict[str, Callable[[LmfleetError], dict[str, Any]]] = {
    "openai": LmfleetError.body,
    "anthropic": anthropic_body,
}


def response(exc: LmfleetError, scope: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error answer to the request of `scope`, in its style; `headers` on top of the exception's own."""
    from starlette.responses import JSONResponse

    body = STYLES[scope.get(ERROR_STYLE, "openai")](exc)
    return JSONResponse(body, status_code=exc.status, headers={**exc.headers, **(headers or {})} or None)


class ErrorStyles:
    """Pure ASGI middleware: a request whose path is one of `by_path`'s keys, or lies below one, has its errors
    spelled in that key's style. Put it outside every middleware that may answer with an error."""

    def __init__(self, app: ASGIApp, by_path: Mapping[str, str]) -> None:
        unknown = set(by_path.values()) - set(STYLES)
        if unknown:
            raise ValueError(f"unknown error styles: {sorted(unknown)}")
        self.app = app
        self._by_path = dict(by_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            for prefix, style in self._by_path.items():
                if path == prefix or path.startswith(prefix + "/"):
                    scope[ERROR_STYLE] = style
        await self.app(scope, receive, send)


def from_body(status: int, body: Any) -> LmfleetError:
    """Rebuild an error received from another lmfleet process (or any OpenAI-shaped server). A body without
    OpenAI's error shape is not such a peer's verdict on the request (a route the peer does not have, a proxy's
    page): it is the peer's failure, 502, unless the status says busy (429) or unavailable (503)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        if status not in (429, 503):
            return UpstreamError(f"upstream answered HTTP {status} without an error body")
        err = {"message": f"upstream returned HTTP {status}"}
    code = err.get("code")
    cls: type[LmfleetError] = _BY_STATUS.get(status, UpstreamError if status >= 500 else InvalidRequest)
    if code == ContextLengthExceeded.code:
        cls = ContextLengthExceeded
    elif code == ModelNotFound.code:
        cls = ModelNotFound
    exc = cls(str(err.get("message") or f"HTTP {status}"), param=err.get("param"), code=code)
    exc.status = status
    return exc


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable sentence and the offending parameter from pydantic/FastAPI validation errors."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if param is None and first.get("type") in ("missing", "model_attributes_type", "dict_type", "model_type"):
        # the body as a whole: missing, or not an object (e.g. sent as text/plain)
        return "the request body must be a JSON object sent as Content-Type: application/json", None
    msg = str(first.get("msg", "invalid value"))
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{extra}" if param else f"{msg}{extra}"), param


def install_handlers(app: Any) -> None:
    """Map every error a FastAPI app can raise to the error shape of the request's style (OpenAI's unless
    `ErrorStyles` says otherwise). Called by each create_app()."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(LmfleetError)
    async def _lmfleet(request: Request, exc: LmfleetError) -> JSONResponse:
        if exc.status >= 500:
            logger.warning("request failed: %s", exc.message)
        return response(exc, request.scope)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return response(InvalidRequest(message, param=param), request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = _BY_STATUS.get(exc.status_code, InvalidRequest if exc.status_code < 500 else LmfleetError)
        err = cls(str(exc.detail), headers=dict(exc.headers or {}))  # keeps a 405's `Allow`
        err.status = exc.status_code
        return response(err, request.scope)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return response(LmfleetError("internal server error"), request.scope)
