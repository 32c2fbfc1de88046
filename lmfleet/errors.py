"""The exception tree and the one map from it to OpenAI error JSON and an HTTP status.

    LmfleetError                      500 internal_error        (a bug; the message never carries internals)
    ├── InvalidRequest                400 invalid_request_error
    │   └── ContextLengthExceeded     400 invalid_request_error  code=context_length_exceeded
    ├── AuthenticationFailed          401 invalid_request_error  code=invalid_api_key
    ├── Forbidden                     403 invalid_request_error  code=forbidden
    ├── NotFound                      404 invalid_request_error
    │   └── ModelNotFound             404 invalid_request_error  code=model_not_found
    ├── MethodNotAllowed              405 invalid_request_error
    ├── PayloadTooLarge               413 invalid_request_error
    ├── QueueFull                     429 rate_limit_error       (Retry-After)
    ├── ServiceUnavailable            503 service_unavailable_error
    │   └── NoWorkerAvailable         503                        code=no_worker_available
    └── UpstreamError                 502 upstream_error          (a worker failed mid-request)

Every process (controller, worker, API server) raises these and installs `install_handlers(app)`, so every
error body on every route has the shape ``{"error": {"message", "type", "param", "code"}}``. The worker sends
the same body to the API server, which rebuilds the exception with `from_body` and passes it on unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

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
    """Map every error a FastAPI app can raise to the OpenAI error shape. Called by each create_app()."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def respond(exc: LmfleetError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(LmfleetError)
    async def _lmfleet(_request: Any, exc: LmfleetError) -> JSONResponse:
        if exc.status >= 500:
            logger.warning("request failed: %s", exc.message)
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Any, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return respond(InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        cls = _BY_STATUS.get(exc.status_code, InvalidRequest if exc.status_code < 500 else LmfleetError)
        err = cls(str(exc.detail), headers=dict(exc.headers or {}))  # keeps a 405's `Allow`
        err.status = exc.status_code
        return respond(err)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Any, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return respond(LmfleetError("internal server error"))
