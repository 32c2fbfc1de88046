"""Requests answered in one reply by one worker: embeddings, tokenize, detokenize.

Owns: sending one JSON request to a worker of the model that serves the task (lmfleet.api.routing), and, when
that worker fails or is full (5xx, a transport failure, 429), to another one, each worker at most once (a failed
one is ejected, a full one is not); a client's mistake (4xx) comes back at once. Does not own: streams, resume
(lmfleet.api.upstream), the wire formats (lmfleet.protocol).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel

from lmfleet import errors
from lmfleet.api.fastchat_upstream import MixedWorkerClient
from lmfleet.api.routing import Router
from lmfleet.api.upstream import another_worker_may_help, next_worker, set_aside, worse
from lmfleet.protocol.worker import Task

R = TypeVar("R", bound=BaseModel)


class OneReply(Protocol):
    """The API server's one-reply call (lmfleet.api.app wraps `ask` with the model's resolution and the client's
    disconnect): (the model, a worker's answer to `path`), or None when the client left."""

    def __call__(
        self,
        request: Request,
        requested: str | None,
        task: Task | None,
        path: str,
        build: Callable[[str], BaseModel],
        answer: type[R],
    ) -> Awaitable[tuple[str, R] | None]: ...


async def ask(
    router: Router,
    workers: MixedWorkerClient,
    model: str,
    task: Task | None,
    path: str,
    request: BaseModel,
    answer: type[R],
) -> R:
    """`request` to `path` on a worker of `model` serving `task` (None: any), as `answer`."""
    tried = workers.unable(model)  # FastChat workers answer none of these routes
    failure: errors.LmfleetError | None = None
    while True:
        lease = await next_worker(router, model, tried, failure, task)
        try:
            return await workers.call(lease.address, path, request, answer)
        except errors.LmfleetError as exc:
            if not another_worker_may_help(exc):
                raise
            set_aside(router, model, lease.address, exc)
            failure = worse(failure, exc)
        finally:
            lease.release()
