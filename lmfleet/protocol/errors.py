"""The error body every lmfleet process sends, OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
Data only; the exception tree that produces it is lmfleet.errors."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    message: str
    type: str = "upstream_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error on every route has this body."""

    error: ErrorInfo
