"""A multi-model worker's models: each in its own one-model worker process, loaded on demand and unloaded when idle.

Why a process per model (as llama-server's router runs one llama-server per model): one process cannot give an
unloaded model's memory back reliably. Measured in one Python process (README, "Several models on one worker"):
llama.cpp's GGUF models return most of their memory when freed, but loading the MiniLM embedding model (torch)
leaves ~370 MiB resident after it is freed, and every later load leaves more. A child process returns everything
when it exits, and one model crashing (or leaking) cannot take the others down.

Owns `Supervisor`: per model a `Slot` with its state (unloaded → loading → loaded; failed when the load or the
process fails, and a later request loads it again), its process, the requests running through it and when it was
last used. `acquire(name)` answers once the model is loaded: it starts the one load of that model (every request
that arrives meanwhile awaits that same load, up to `Budget.load_timeout_s`, then gets 503 `model_loading`), and
holds the model (never unloaded while a request runs) until the `Lease` is released. Before a load the supervisor
makes room: while loading would exceed `Budget.max_loaded` or `Budget.memory_bytes` (the processes' resident
memory; an estimate before a model's first load, its measured peak after), it unloads the least recently used
model that is loaded, idle and not pinned; with none, it waits for one (503 `model_loading` at the deadline). A
loaded model idle for longer than its keep-alive (the request's `keep_alive`, else the model's, else the worker's)
is unloaded by `run()`, which also unloads idle models while the measured memory is over the budget.

Does not own: HTTP routes and proxying (lmfleet.worker.multi), what a model's process serves (lmfleet.worker.app,
the one-model worker), the catalog and the command line of a model's process (lmfleet.worker.catalog).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from lmfleet import errors
from lmfleet.protocol.worker import ModelLoadState, ModelState, WorkerStatus
from lmfleet.worker.catalog import Budget, ModelSpec, child_argv, estimate_bytes, rss_bytes

logger = logging.getLogger("lmfleet.worker")

STOP_TIMEOUT_S = 15.0  # after SIGTERM, a model's process gets this long before SIGKILL
_READY_POLL_S = 0.2
_REAP_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1


class ModelProcess(Protocol):
    """A model's running one-model worker."""

    address: str  # its base URL

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def stop(self) -> None: ...


class ChildWorker:
    """A model's one-model worker as a child process on a loopback port."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        self.proc = proc
        self.address = address

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM (the worker drains), then SIGKILL after STOP_TIMEOUT_S."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the worker that started it dies, so no model outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child_starter(shared: dict[str, Any], log: list[str]) -> Callable[[ModelSpec], Awaitable[ModelProcess]]:
    """Starts a model's one-model worker (lmfleet.worker.catalog.child_argv) on a free loopback port. The child
    inherits the environment (the fleet secret included) and the worker's stdout and stderr."""

    async def start(spec: ModelSpec) -> ModelProcess:
        port = free_port()
        argv = child_argv(spec, shared, port, log)
        proc = await asyncio.create_subprocess_exec(
            *argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None
        )
        return ChildWorker(proc, f"http://127.0.0.1:{port}")

    return start


@dataclass
class Slot:
    """One model the worker can serve, and where it stands."""

    spec: ModelSpec
    keep_alive_s: float  # now: the last request's keep_alive, else the model's, else the worker's
    pinned: bool
    state: ModelLoadState = "unloaded"
    process: ModelProcess | None = None
    active: int = 0  # requests holding a lease
    last_used: float = 0.0
    load_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None  # unloading: the process has not exited yet
    load_seconds: float | None = None
    peak_bytes: int = 0  # the most its process has held (the budget's estimate for its next load)
    tasks: list[str] = field(default_factory=list)
    engine: str | None = None
    context_length: int | None = None
    error: str | None = None  # why the last load or process failed

    def memory_bytes(self) -> int:
        return rss_bytes(self.process.pid) if self.process is not None else 0

    def state_now(self) -> ModelState:
        return ModelState(
            name=self.spec.name,
            state=self.state,
            tasks=self.tasks,
            engine=self.engine or self.spec.engine,
            pinned=self.pinned,
            memory_bytes=self.memory_bytes(),
            load_seconds=self.load_seconds,
            context_length=self.context_length,
        )


class Lease:
    """A request's hold on a loaded model: `address` is its process; `release()` (once) lets it go idle."""

    def __init__(self, supervisor: Supervisor, slot: Slot, keep_alive_s: float | None) -> None:
        self.address = slot.process.address if slot.process is not None else ""
        self._supervisor = supervisor
        self._slot = slot
        self._keep_alive_s = keep_alive_s
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._supervisor._release(self._slot, self._keep_alive_s)


class SupervisorHooks(Protocol):
    """What the supervisor reports (lmfleet.worker.metrics.ModelMetrics)."""

    def loaded(self, model: str, engine: str, seconds: float) -> None: ...

    def load_failed(self, model: str) -> None: ...

    def unloaded(self, model: str, reason: str) -> None: ...


class Supervisor:
    """The models of one multi-model worker (module docstring). Create it and call `run()` inside the app's
    lifespan; `close()` stops every model's process."""

    def __init__(
        self,
        specs: list[ModelSpec],
        budget: Budget,
        *,
        start: Callable[[ModelSpec], Awaitable[ModelProcess]],
        http: httpx.AsyncClient,
        hooks: SupervisorHooks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget
        self.slots = {
            s.name: Slot(s, s.keep_alive_s if s.keep_alive_s is not None else budget.keep_alive_s, s.pinned)
            for s in specs
        }
        for slot in self.slots.values():
            slot.tasks = ["embed", "score"] if slot.spec.engine == "embedding" else ["generate"]
        self._start = start
        self._http = http
        self._hooks = hooks
        self._background: set[asyncio.Future[None]] = set()  # unloads and watchers, referenced until done
        self._clock = clock
        self._room = asyncio.Lock()  # one load at a time makes room and starts its process
        self._changed = asyncio.Event()  # set (and replaced) when a model goes idle or its process ends

    # -- requests ----------------------------------------------------------------------------------------------

    def slot(self, name: str | None) -> Slot:
        if name is None or name not in self.slots:
            raise errors.ModelNotFound(
                f"this worker serves {', '.join(self.slots)}, not {name!r}", param="model", code="model_not_found"
            )
        return self.slots[name]

    async def acquire(self, name: str | None, keep_alive_s: float | None = None) -> Lease:
        """Hold model `name` loaded for one request, loading it first if needed (module docstring). 404 for a model
        this worker does not serve; 503 `model_loading` when it is not loaded within the load timeout, 503
        `model_load_failed` when its load failed."""
        slot = self.slot(name)
        deadline = self._clock() + self.budget.load_timeout_s
        while True:
            if slot.state == "loaded" and slot.stop_task is None and slot.process is not None:
                slot.active += 1
                slot.last_used = self._clock()
                if keep_alive_s is not None:
                    slot.keep_alive_s = keep_alive_s
                return Lease(self, slot, keep_alive_s)
            task = slot.stop_task or self._loading(slot)
            try:
                await asyncio.wait_for(asyncio.shield(task), max(deadline - self._clock(), 0.001))
            except TimeoutError:
                waited = f"after {self.budget.load_timeout_s:g}s"
                why = (
                    f"is still loading {waited}"
                    if slot.process is not None
                    else f"is waiting for room {waited}: every loaded model has requests running or is pinned"
                )
                raise errors.ServiceUnavailable(
                    f"model {slot.spec.name!r} {why}; retry later", code="model_loading"
                ) from None

    def _release(self, slot: Slot, keep_alive_s: float | None) -> None:
        slot.active -= 1
        slot.last_used = self._clock()
        if keep_alive_s is not None:
            slot.keep_alive_s = keep_alive_s
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- admin -------------------------------------------------------------------------------------------------

    async def load(self, name: str) -> ModelState:
        """Load `name` now (as a request would) and report it."""
        (await self.acquire(name)).release()
        return self.slot(name).state_now()

    async def unload(self, name: str) -> ModelState:
        """Unload `name` now; 400 `model_busy` while requests run on it."""
        slot = self.slot(name)
        if slot.load_task is not None:
            with contextlib.suppress(errors.LmfleetError):
                await asyncio.shield(slot.load_task)
        if slot.active:
            raise errors.InvalidRequest(
                f"model {name!r} has {slot.active} requests running; unload it once idle", code="model_busy"
            )
        if slot.process is not None:
            await self._stop(slot, "requested")
        return slot.state_now()

    def pin(self, name: str, pinned: bool) -> ModelState:
        slot = self.slot(name)
        slot.pinned = pinned
        return slot.state_now()

    def preload(self) -> None:
        """Start loading every pinned model (at start: a pinned model stays loaded)."""
        for slot in self.slots.values():
            if slot.pinned and slot.state == "unloaded":
                self._loading(slot)

    # -- loading -----------------------------------------------------------------------------------------------

    def _loading(self, slot: Slot) -> asyncio.Task[None]:
        """The one load of `slot` (started now when none runs)."""
        if slot.load_task is None:
            slot.load_task = asyncio.create_task(self._load(slot), name=f"lmfleet-load-{slot.spec.name}")
            slot.load_task.add_done_callback(lambda t: _forget_load(slot, t))
        return slot.load_task

    async def _load(self, slot: Slot) -> None:
        name = slot.spec.name
        slot.state, slot.error = "loading", None
        started = self._clock()
        process: ModelProcess | None = None
        try:
            async with self._room:
                await self._make_room(slot, started + self.budget.load_timeout_s)
                logger.info("loading model %s (%s, engine %s)", name, slot.spec.path, slot.spec.engine)
                process = await self._start(slot.spec)
                slot.process = process
            await self._wait_ready(process)
            await self._describe(slot, process)
        except BaseException as exc:
            slot.state = "failed" if process is not None else "unloaded"
            slot.process = None
            if process is not None:
                await process.stop()
                slot.error = str(exc) if isinstance(exc, errors.LmfleetError) else f"{type(exc).__name__}: {exc}"
                self._hooks.load_failed(name)
                logger.error("model %s failed to load: %s", name, slot.error)
            self._notify()
            if isinstance(exc, errors.LmfleetError) or not isinstance(exc, Exception):
                raise
            raise errors.ServiceUnavailable(f"model {name!r} failed to load: {exc}", code="model_load_failed") from exc
        slot.load_seconds = self._clock() - started
        slot.state = "loaded"
        slot.last_used = self._clock()
        slot.peak_bytes = max(slot.peak_bytes, slot.memory_bytes())
        self._hooks.loaded(name, slot.engine or slot.spec.engine, slot.load_seconds)
        logger.info("loaded model %s in %.1fs (%.0f MiB)", name, slot.load_seconds, slot.peak_bytes / (1 << 20))
        self._in_background(self._watch(slot, process))

    async def _wait_ready(self, process: ModelProcess) -> None:
        """Until the process answers GET /ready with 200; 503 `model_load_failed` if it exits first."""
        while True:
            if process.returncode is not None:
                raise errors.ServiceUnavailable(
                    f"the model's process exited with code {process.returncode} while loading (see the worker's log)",
                    code="model_load_failed",
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await self._http.get(process.address + "/ready", timeout=2.0)).status_code == 200:
                    return
            await asyncio.sleep(_READY_POLL_S)

    async def _describe(self, slot: Slot, process: ModelProcess) -> None:
        """What the loaded model serves, from its worker's status."""
        resp = await self._http.get(process.address + "/worker/status", timeout=5.0)
        status = WorkerStatus.model_validate_json(resp.content)
        slot.tasks, slot.engine, slot.context_length = list(status.tasks), status.engine, status.context_length

    def _estimate(self, slot: Slot) -> int:
        return slot.peak_bytes or estimate_bytes(slot.spec)

    def _held(self, slot: Slot) -> int:
        """What `slot` holds or is about to: a loading model its estimate (or more, once measured)."""
        now = slot.memory_bytes()
        return max(now, self._estimate(slot)) if slot.state == "loading" else now

    def _fits(self, slot: Slot) -> bool:
        others = [s for s in self.slots.values() if s is not slot and (s.process is not None or s.stop_task)]
        if not others:
            return True  # one model always may load, whatever its size
        count_ok = len(others) < self.budget.max_loaded
        return count_ok and sum(map(self._held, others)) + self._estimate(slot) <= self.budget.memory_bytes

    def _victim(self, spare: Slot | None = None) -> Slot | None:
        """The least recently used model that is loaded, idle and not pinned."""
        idle = [
            s
            for s in self.slots.values()
            if s is not spare and s.state == "loaded" and s.stop_task is None and not s.active and not s.pinned
        ]
        return min(idle, key=lambda s: s.last_used, default=None)

    async def _make_room(self, slot: Slot, deadline: float) -> None:
        while not self._fits(slot):
            victim = self._victim(slot)
            if victim is not None:
                logger.info("unloading model %s (least recently used) to load %s", victim.spec.name, slot.spec.name)
                await self._stop(victim, "evicted")
                continue
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), max(deadline - self._clock(), 0.001))
            except TimeoutError:
                raise errors.ServiceUnavailable(
                    f"no room to load model {slot.spec.name!r}: every loaded model has requests running or is pinned "
                    f"(at most {self.budget.max_loaded} models, {self.budget.memory_bytes >> 20} MiB)",
                    code="model_loading",
                ) from None

    # -- unloading ---------------------------------------------------------------------------------------------

    async def _stop(self, slot: Slot, reason: str) -> None:
        """Unload `slot`: stop its process and wait until it exited (its memory is then back)."""
        if slot.stop_task is None:
            slot.stop_task = asyncio.create_task(self._stopping(slot, reason), name=f"lmfleet-stop-{slot.spec.name}")
        await asyncio.shield(slot.stop_task)

    async def _stopping(self, slot: Slot, reason: str) -> None:
        process = slot.process
        slot.state = "unloaded"
        try:
            if process is not None:
                slot.peak_bytes = max(slot.peak_bytes, rss_bytes(process.pid))
                await process.stop()
        finally:
            slot.process = None
            slot.stop_task = None
            self._hooks.unloaded(slot.spec.name, reason)
            logger.info("unloaded model %s (%s)", slot.spec.name, reason)
            self._notify()

    async def _watch(self, slot: Slot, process: ModelProcess) -> None:
        """A loaded model's process that exits unasked marks the model failed (the next request loads it again)."""
        code = await process.wait()
        if slot.process is process and slot.stop_task is None:
            slot.state, slot.process = "failed", None
            slot.error = f"the model's process exited with code {code}"
            self._hooks.unloaded(slot.spec.name, "crashed")
            logger.error("model %s: %s; the next request loads it again", slot.spec.name, slot.error)
            self._notify()

    async def run(self) -> None:
        """Forever: `reap()` every half second."""
        while True:
            self.reap()
            await asyncio.sleep(_REAP_INTERVAL_S)

    def reap(self) -> None:
        """Start unloading the idle models past their keep-alive, and an idle model (the least recently used) while
        the measured memory is over the budget; note each process's peak memory."""
        now = self._clock()
        for slot in self.slots.values():
            if slot.process is not None:
                slot.peak_bytes = max(slot.peak_bytes, slot.memory_bytes())
            expired = slot.keep_alive_s >= 0 and now - slot.last_used >= slot.keep_alive_s
            idle = slot.state == "loaded" and slot.stop_task is None and not slot.active and not slot.pinned
            if expired and idle:
                self._in_background(self._stop(slot, "keep_alive"))
        if not self._room.locked() and self.memory_bytes() > self.budget.memory_bytes:
            victim = self._victim()
            loaded = sum(s.state == "loaded" for s in self.slots.values())
            if victim is not None and loaded > 1:
                logger.info("unloading model %s: over the memory budget", victim.spec.name)
                self._in_background(self._stop(victim, "evicted"))

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def memory_bytes(self) -> int:
        """The models' processes' resident memory now."""
        return sum(s.memory_bytes() for s in self.slots.values())

    def states(self) -> list[ModelState]:
        return [s.state_now() for s in self.slots.values()]

    @property
    def running(self) -> int:
        return sum(s.active for s in self.slots.values())

    async def close(self) -> None:
        """Stop every model's process (the worker is shutting down)."""
        for slot in self.slots.values():
            if slot.load_task is not None:
                slot.load_task.cancel()
        await asyncio.gather(
            *(self._stop(s, "shutdown") for s in self.slots.values() if s.process is not None),
            return_exceptions=True,
        )


def _forget_load(slot: Slot, task: asyncio.Task[None]) -> None:
    if slot.load_task is task:
        slot.load_task = None
    if not task.cancelled():
        task.exception()  # retrieved: its waiters got it
