"""Stored responses (`store`, `previous_response_id`, `GET`/`DELETE /v1/responses/{id}`): an embedded SQLite database.

Owns one SQLite connection and the one thread that uses it: every call runs there, in order, so the event loop
never waits on the disk and no two statements race. A response is kept with the input items it was generated
from (those of the response it continued included), so a conversation can be continued from any stored response
with one read, and a deleted one never breaks the responses after it.

Where: `path` is a file (kept across restarts; created with owner-only permissions, since it holds prompts and
answers), `":memory:"`, or `""`: SQLite's private temporary database, on disk in the temp directory and removed
when the store closes, so a restarted API server keeps nothing. Each row records its `owner` (a digest of the
API key that made it, or "" without keys): another key cannot read, continue or delete it.

Does not own: what a response or an item looks like (lmfleet.protocol.responses), who may call (the API server's
key gate), when to store (lmfleet.api.responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("lmfleet.api")

TEMPORARY = ""  # SQLite's private temporary database: deleted when the store closes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,     -- the Response object, JSON
    input_items TEXT NOT NULL   -- the input items it was generated from, earlier ones first, JSON
)
"""


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]


class ResponseStore:
    """Use `ResponseStore.open(path)` (an async context manager)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmfleet-response-store")
        self._db: sqlite3.Connection | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str) -> AsyncIterator[ResponseStore]:
        store = cls(path)
        try:
            await store._run(store._connect)
            logger.info("stored responses: %s", path or "a temporary database (a restart keeps none)")
            yield store
        finally:
            await store._run(store._close)
            store._thread.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect(self) -> None:
        if self.path not in (TEMPORARY, ":memory:"):
            file = Path(self.path).expanduser()
            file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            file.touch(mode=0o600, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: one statement, one transaction
        if self.path not in (TEMPORARY, ":memory:"):
            self._db.execute("PRAGMA journal_mode=WAL")  # other API servers may share the file
            self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "the store is closed"
        return self._db

    async def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        row = (response["id"], owner, response["created_at"], json.dumps(response), json.dumps(input_items))
        await self._run(self._put, row)

    def _put(self, row: tuple[Any, ...]) -> None:
        self._conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)

    async def get(self, owner: str, response_id: str) -> Stored | None:
        return await self._run(self._get, owner, response_id)

    def _get(self, owner: str, response_id: str) -> Stored | None:
        row = self._conn.execute(
            "SELECT response, input_items FROM responses WHERE id = ? AND owner = ?", (response_id, owner)
        ).fetchone()
        return Stored(json.loads(row[0]), json.loads(row[1])) if row else None

    async def delete(self, owner: str, response_id: str) -> bool:
        return await self._run(self._delete, owner, response_id)

    def _delete(self, owner: str, response_id: str) -> bool:
        cursor = self._conn.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        return cursor.rowcount > 0
