"""Where a model runs: which workers hold it, which are loading it, and which one should load it when none does.

A worker that loads models on demand lists every model it can serve in `model_names` and each one's state in
`models` (lmfleet.protocol.worker.ModelState: loaded, loading, unloaded, failed); a one-model worker reports no
`models`, and its names are loaded. Everything here reads those reports; the I/O is the caller's.

Owns
  * `state_of(status, model)`, `tasks_of`, `context_length_of`: one worker's report about one model.
  * `fleet_state(workers, model)`: the model's state across the fleet, as llama-server's router reports one:
    `loaded` when some worker holds it, else `loading` when some worker is loading it, else `unloaded` (with
    `failed` when a worker's last load of it failed).
  * `tiers(workers, model)`: the candidates for a request, best tier first: the workers that hold it, then those
    loading it, then those that could load it.
  * `load_target(workers, model, ...)`: the one worker that should load a model nobody holds. It has room (its
    `memory_budget_bytes` minus the memory its models hold, against the memory the model took when last seen
    loaded), or can make room by unloading idle models that are not pinned; among those it prefers evicting copies
    that another worker also holds over the fleet's only copy, then evicting less, then the most room left; a
    worker that cannot make room at all, or whose last load of the model failed, only when there is no other.
    So one popular model does not push the others out of the whole fleet: it goes where there is room first,
    and evicts duplicates before sole copies. Which models a worker really unloads is the worker's decision.
  * `preferred(workers, model)`: the same tiers without memory, for the controller's own dispatch (FastChat's
    `/get_worker_address`): the holders, else the loaders, else one worker chosen to load it.
  * `Placement`: the API server's memory of what it decided and saw. The load target it chose per model (so
    concurrent requests for a model that nobody holds queue at that one worker instead of starting loads
    elsewhere, until the worker reports the model loading, loaded or failed, or `grace_s` passes without its
    report saying so), the workers that just failed to load a model (passed over for it until their report says
    so), the memory each model took when last seen loaded, and the loads and unloads seen between
    two views of the fleet (`observe`: the metrics' events).

Does not own: the view of the fleet, health and the pick among the candidates (lmfleet.api.routing,
lmfleet.dispatch), loading and unloading (the workers). Standard library only at runtime (the controller and the API
server both use it); the clock is injected.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lmfleet.protocol.worker import ModelLoadState, ModelState, WorkerInfo, WorkerStatus

FleetState = Literal["loaded", "loading", "unloaded"]
HELD = ("loaded", "loading")  # states in which a model takes memory on a worker
DEFAULT_GRACE_S = 30.0  # how long a chosen load target counts as loading before its report says so


def report_of(status: WorkerStatus, model: str) -> ModelState | None:
    """The worker's `ModelState` for `model`; None for a one-model worker (or a model it does not report)."""
    return next((m for m in status.models if m.name == model), None)


def state_of(status: WorkerStatus, model: str) -> ModelLoadState:
    """Where `model` stands on a worker that serves it: a one-model worker's models are loaded; a multi-model
    worker's model it does not report on is unloaded."""
    if not status.models:
        return "loaded"
    report = report_of(status, model)
    return "unloaded" if report is None else report.state


def tasks_of(status: WorkerStatus, model: str) -> list[str]:
    """The tasks the worker serves `model` for: the model's own when reported, else the worker's."""
    report = report_of(status, model)
    return list(report.tasks) if report is not None else list(status.tasks)


def context_length_of(status: WorkerStatus, model: str) -> int | None:
    report = report_of(status, model)
    if report is not None and report.context_length:
        return report.context_length
    return status.context_length


def fleet_state(workers: Iterable[WorkerInfo], model: str) -> tuple[FleetState, bool]:
    """(`model`'s state across `workers`, whether its last load failed on some worker and nobody holds it)."""
    states = {state_of(w.status, model) for w in workers if model in w.status.model_names}
    if "loaded" in states:
        return "loaded", False
    if "loading" in states:
        return "loading", False
    return "unloaded", "failed" in states


def tiers(workers: Sequence[WorkerInfo], model: str) -> tuple[list[WorkerInfo], list[WorkerInfo], list[WorkerInfo]]:
    """(holding, loading, could load) among `workers`, each in the order given."""
    out: tuple[list[WorkerInfo], list[WorkerInfo], list[WorkerInfo]] = ([], [], [])
    for w in workers:
        state = state_of(w.status, model)
        out[0 if state == "loaded" else 1 if state == "loading" else 2].append(w)
    return out


def held_bytes(status: WorkerStatus) -> int:
    return sum(m.memory_bytes for m in status.models if m.state in HELD)


@dataclass(frozen=True, order=True)
class Cost:
    """What loading a model on a worker costs the fleet, smaller first (the fields compare in order)."""

    no_room: bool  # even unloading every unpinned model would not make room
    failed: bool  # its last load of the model failed
    sole_copies: int  # models it would unload that no other worker holds
    evictions: int  # models it would unload
    room_left: float  # negated: the most room left after the load first


Busy = Callable[[str, str], bool]  # (address, model): requests are running on it, so it is not idle


def _never_busy(_address: str, _model: str) -> bool:
    return False


def cost(worker: WorkerInfo, model: str, need: int, holders: Callable[[str], int], busy: Busy = _never_busy) -> Cost:
    """The cost of loading `model` (`need` bytes) on `worker`; `holders(name)` is how many workers hold `name`,
    `busy(address, name)` whether requests run on it there (only idle models can be unloaded)."""
    s = worker.status
    failed = state_of(s, model) == "failed"
    if s.memory_budget_bytes is None:  # it says nothing of its memory: it decides for itself
        return Cost(False, failed, 0, 0, 0.0)
    free = s.memory_budget_bytes - held_bytes(s)
    if free >= need:
        return Cost(False, failed, 0, 0, -float(free - need))
    # copies held elsewhere go first, then the largest (fewest evictions)
    evictable = sorted(
        (
            m
            for m in s.models
            if m.state == "loaded" and not m.pinned and m.name != model and not busy(worker.address, m.name)
        ),
        key=lambda m: (holders(m.name) <= 1, -m.memory_bytes),
    )
    sole = evicted = 0
    for m in evictable:
        free += m.memory_bytes
        evicted += 1
        sole += holders(m.name) <= 1
        if free >= need:
            return Cost(False, failed, sole, evicted, -float(free - need))
    return Cost(True, failed, sole, evicted, math.inf)


def load_target(
    workers: Sequence[WorkerInfo], model: str, need: int, everyone: Sequence[WorkerInfo], busy: Busy = _never_busy
) -> WorkerInfo:
    """The worker among `workers` (none of which holds `model`) that should load it: the cheapest by `cost`, ties
    broken by rendezvous hashing of (model, address), so every API server and controller that sees the same fleet
    chooses the same worker, and different models go to different workers. `everyone` is the whole view, to tell
    sole copies from duplicates."""
    if not workers:
        raise ValueError("no workers to choose from")
    counts: dict[str, int] = {}
    for w in everyone:
        for name in w.status.model_names:
            if state_of(w.status, name) == "loaded":
                counts[name] = counts.get(name, 0) + 1

    def key(w: WorkerInfo) -> tuple[Cost, bytes]:
        rendezvous = hashlib.blake2b(f"{model}\0{w.address}".encode(), digest_size=8).digest()
        return cost(w, model, need, lambda name: counts.get(name, 0), busy), rendezvous

    return min(workers, key=key)


def preferred(workers: Sequence[WorkerInfo], model: str) -> list[WorkerInfo]:
    """The workers of `workers` (all serve `model`) to dispatch a request for it to: those that hold it, else those
    loading it, else the one `load_target` chooses. Empty only when `workers` is."""
    holding, loading, rest = tiers(workers, model)
    if holding or loading:
        return holding or loading
    return [load_target(rest, model, 0, workers)] if rest else []


@dataclass(frozen=True)
class ModelEvent:
    """A change seen between two views: `load` (a worker now holds the model; `seconds`: how long its load took, as
    it reports) or `unload` (a worker no longer holds it; `asked`: through this server's admin routes)."""

    kind: Literal["load", "unload"]
    model: str
    address: str
    seconds: float | None = None
    asked: bool = False


class Placement:
    """The API server's load targets, model sizes and model events (see the module docstring). One per router."""

    def __init__(
        self,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._targets: dict[str, tuple[str, float]] = {}  # model -> (the worker chosen to load it, when)
        self._sizes: dict[str, int] = {}  # model -> memory it took when last seen loaded
        self._last: dict[str, dict[str, ModelLoadState]] = {}  # address -> model -> state, at the last view
        self._asked: set[tuple[str, str]] = set()  # (address, model) this server asked to unload
        self._failed: dict[tuple[str, str], float] = {}  # (address, model) -> when its load failed, until the view says

    def size(self, model: str) -> int:
        """The memory `model` took when last seen loaded (0: never seen)."""
        return self._sizes.get(model, 0)

    def targets(self) -> dict[str, str]:
        """model -> the worker this server chose to load it, while that choice stands."""
        return {model: address for model, (address, _) in self._targets.items()}

    def candidates(
        self, pool: Sequence[WorkerInfo], model: str, everyone: Sequence[WorkerInfo], busy: Busy = _never_busy
    ) -> list[WorkerInfo]:
        """The workers of `pool` (all serve `model`) a request for it may go to: those that hold it; else those
        loading it, the load target this server chose included; else one worker chosen to load it (`load_target`;
        `busy`: which models have requests running, so cannot be unloaded), remembered as the target. Empty only
        when `pool` is."""
        holding, loading, rest = tiers(pool, model)
        if holding:
            return holding
        target = self._target(model, rest)
        if target is not None:
            loading.append(target)
        if loading:
            return loading
        if not rest:
            return []
        now = self._clock()
        fresh = [w for w in rest if now - self._failed.get((w.address, model), -math.inf) > self.grace_s]
        chosen = load_target(fresh or rest, model, self.size(model), everyone, busy)
        self.chose(model, chosen.address)
        return [chosen]

    def chose(self, model: str, address: str) -> None:
        """`address` loads `model` now (a request or an admin's load went there)."""
        self._targets[model] = (address, self._clock())

    def failed(self, address: str, model: str) -> None:
        """`address` could not load `model`: another worker is chosen next, until the view reports the failure (its
        cost then says it) or `grace_s` passes."""
        self._failed[(address, model)] = self._clock()
        if self._targets.get(model, ("",))[0] == address:
            del self._targets[model]

    def unloading(self, address: str, model: str) -> None:
        """This server asked `address` to unload `model` (its unload is then not counted as an eviction)."""
        self._asked.add((address, model))
        if self._targets.get(model, ("",))[0] == address:
            del self._targets[model]

    def _target(self, model: str, unloaded: Sequence[WorkerInfo]) -> WorkerInfo | None:
        """The remembered target among `unloaded` (workers of the pool that neither hold nor load the model), while
        it stands: its report does not say failed and the grace period has not passed."""
        entry = self._targets.get(model)
        if entry is None:
            return None
        address, since = entry
        worker = next((w for w in unloaded if w.address == address), None)
        if worker is None or self._clock() - since > self.grace_s or state_of(worker.status, model) == "failed":
            return None
        return worker

    def observe(self, view: Sequence[WorkerInfo]) -> list[ModelEvent]:
        """Take in a new view of the fleet: note model sizes, drop load targets that are settled, and return the
        loads and unloads since the last view (a worker seen for the first time has none)."""
        events: list[ModelEvent] = []
        now: dict[str, dict[str, ModelLoadState]] = {}
        for w in view:
            states = {m.name: m.state for m in w.status.models}
            now[w.address] = states
            for m in w.status.models:
                if m.state == "loaded" and m.memory_bytes:
                    self._sizes[m.name] = m.memory_bytes
            before = self._last.get(w.address)
            if before is None:
                continue
            for m in w.status.models:
                was = before.get(m.name, "unloaded")
                if m.state == "loaded" and was != "loaded":
                    events.append(ModelEvent("load", m.name, w.address, seconds=m.load_seconds))
                elif was == "loaded" and m.state != "loaded":
                    asked = (w.address, m.name) in self._asked
                    events.append(ModelEvent("unload", m.name, w.address, asked=asked))
        for model, (address, _) in list(self._targets.items()):
            if now.get(address, {}).get(model) in ("loaded", "loading", "failed") or address not in now:
                del self._targets[model]
        self._asked = {(a, m) for a, m in self._asked if now.get(a, {}).get(m) in HELD}
        self._failed = {(a, m): t for (a, m), t in self._failed.items() if now.get(a, {}).get(m) == "unloaded"}
        self._last = now
        return events
