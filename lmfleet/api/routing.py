"""Which worker serves a request: the API server's cached view of the fleet, passive health and local dispatch.

Owns
  * the view: every live worker as the controller's `GET /workers` lists it, refreshed every
    `refresh_interval_s` by `run()` (in the app's lifespan) and on demand when a request names a model the view
    does not know. With several controllers the one that answered last is asked first, then the others; the first
    answer wins. When none answers the last view stays in use, so the fleet keeps serving while its controllers
    are down (`controller_up` turns False and the event is logged once). Per worker it notes when a refresh first
    showed its latest heartbeat (`heartbeat_age`, for the dashboard: the controller's clock is not ours).
  * passive health: a worker that refuses a connection or fails a request is ejected at once (`eject`). It is
    readmitted once `eject_backoff_s` has passed *and* the controller has received a heartbeat from it since the
    ejection: the first refresh after the ejection notes its `last_heartbeat`, a later one must show another (a
    dead or frozen worker keeps its last heartbeat until the controller expires it; a restarted one registers
    afresh). While no controller answers, an ejected worker is probed on `GET /ready` after the back-off instead.
  * the pick (`acquire`): a `lmfleet.dispatch` policy over the healthy workers of the model not yet tried for this
    request, with the requests this server has open on each worker (its `Lease`s) counted as load, since a worker's own
    report is up to a heartbeat plus a refresh old, and, for a request with a prefix key and a policy that reads it,
    which of them probably hold its prompt (lmfleet.api.affinity: the record of what this server sent where, fed the
    workers' reports at each refresh and told of every ejection). A later turn of a conversation that no worker is known
    to hold may have come through another API server moments ago: the view is refreshed first (at most once per
    `MISS_REFRESH_S`), in case its worker has reported it since. When every worker of the model is ejected they are all
    candidates again: an attempt beats a certain 503 (Envoy calls this panic routing).
  * which workers of a model a request may go to, before the pick (lmfleet.placement): those that hold it loaded;
    else those loading it, or the one this server chose to load it; else one worker chosen to load it, by room.
    A worker that loads models on demand serves every model it lists, loaded or not.
  * which model names exist: those of the workers in the view (loaded or not); a model that was served within
    `model_memory_s` and has no worker now, or one the operator said to expect (`expected`: `lmfleet serve`'s
    models while they start), is 503 no_worker_available (retry), any other 404. A name no worker serves but
    exactly one model's workers give as an alias (the file or folder name of an unnamed model) resolves to that
    model (`resolve`).

Does not own: the HTTP calls (lmfleet.client), retrying, resuming and timeouts (lmfleet.api.upstream), the
controller's registry. The clock and the random source are injected so tests drive them. Never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from lmfleet import errors
from lmfleet.api.affinity import Link, PrefixRecord
from lmfleet.client import ControllerClient, WorkerClient
from lmfleet.dispatch import AFFINITY_POLICIES, DEFAULT_POLICY, NO_AFFINITY, Affinity, Policy, get_policy, load
from lmfleet.placement import (
    HELD,
    FleetState,
    ModelEvent,
    Placement,
    context_length_of,
    fleet_state,
    state_of,
    tasks_of,
)
from lmfleet.protocol.worker import Task, WorkerInfo

logger = logging.getLogger("lmfleet.api")

PROBE_TIMEOUT_S = 2.0  # a probe of an ejected worker while the controllers are down
MISS_REFRESH_S = 0.25  # a later turn that nobody holds refreshes a view older than this
_TASK_NAMES = {"generate": "chat and text completions", "embed": "embeddings", "score": "rerank and score"}


@dataclass
class Ejection:
    since: float  # router clock
    reason: str
    heartbeat: float | None = None  # its `last_heartbeat` at the first refresh after the ejection...
    source: str | None = None  # ...as that controller reported it (another controller's clock is not comparable)


class Lease:
    """One request's hold on a worker: it counts as load on that worker until `release()` (idempotent)."""

    __slots__ = ("address", "_release")

    def __init__(self, address: str, release: Callable[[str], None]) -> None:
        self.address = address
        self._release: Callable[[str], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release(self.address)


class Router:
    """The cached view of the fleet and the pick of a worker per request. One per API server, made in the
    lifespan; `run()` keeps the view fresh until cancelled."""

    def __init__(
        self,
        controllers: Sequence[ControllerClient],
        workers: WorkerClient,
        *,
        policy: str = DEFAULT_POLICY,
        refresh_interval_s: float = 1.0,
        eject_backoff_s: float = 1.0,
        model_memory_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_eject: Callable[[str], None] | None = None,
        expected: Collection[str] = (),
        on_model_event: Callable[[ModelEvent], None] | None = None,
    ) -> None:
        """`on_eject(address)` is called each time a worker in rotation is taken out, `on_model_event` for each
        load and unload a refresh sees (the metrics). `expected`: models to answer 503, not 404, while no worker
        serves them."""
        if not controllers:
            raise ValueError("a router needs at least one controller")
        self._controllers = list(controllers)
        self._workers = workers
        self._policy: Policy = get_policy(policy)
        self._keyed = policy in AFFINITY_POLICIES
        self.refresh_interval_s = refresh_interval_s
        self.eject_backoff_s = eject_backoff_s
        self.model_memory_s = model_memory_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_eject = on_eject
        self._view: list[WorkerInfo] | None = None  # None until some controller has answered once
        self._ejected: dict[str, Ejection] = {}
        self._open: Counter[str] = Counter()  # leases per worker address
        self._prefixes = PrefixRecord()
        self._seen: dict[str, float] = {}  # model -> when the view last had a worker for it
        self._beats: dict[str, tuple[float, float]] = {}  # address -> (its last_heartbeat, router clock when new)
        self._refreshing: asyncio.Future[None] | None = None
        self._last_attempt = -math.inf
        self.controller_up: bool | None = None  # None: not asked yet
        self._ever_up = False
        self.placement = Placement(clock=clock)
        self._open_models: Counter[tuple[str, str]] = Counter()  # leases per (worker address, model)
        self._expected = frozenset(expected)
        self._on_model_event = on_model_event

    # -- the view ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Refresh the view every `refresh_interval_s`, forever (cancel to stop)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_interval_s)

    async def refresh(self, *, max_age_s: float = 0.0) -> None:
        """Ask the controllers for the workers now, unless the last attempt started less than `max_age_s` ago.
        Concurrent callers share one attempt. Never raises: a failure keeps the last view."""
        if self._refreshing is None:
            if self._clock() - self._last_attempt < max_age_s:
                return
            self._last_attempt = self._clock()
            self._refreshing = asyncio.ensure_future(self._refresh_once())
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, _task: asyncio.Future[None]) -> None:
        self._refreshing = None

    async def _refresh_once(self) -> None:
        try:
            fetched = await self._fetch()
            if fetched is not None:
                self._apply(*fetched)
            elif self._view is not None:
                await self._probe_ejected()
        except Exception:  # a bug here must not stop the refresh loop, nor fail the request that asked
            logger.exception("refreshing the worker view failed")

    async def _fetch(self) -> tuple[str, list[WorkerInfo]] | None:
        for controller in list(self._controllers):
            try:
                view = await controller.workers()
            except (errors.LmfleetError, ValueError, KeyError) as exc:
                logger.debug("controller %s: %s", controller.address, exc)
                continue
            if self._controllers[0] is not controller:  # ask the one that answers first next time
                self._controllers.remove(controller)
                self._controllers.insert(0, controller)
            if self.controller_up is not True:
                logger.info("worker view from controller %s: %d worker(s)", controller.address, len(view))
            self._ever_up = True
            self.controller_up = True
            return controller.address, view
        if self.controller_up is not False:
            addresses = ", ".join(c.address for c in self._controllers)
            if self._ever_up:
                logger.warning(
                    "no controller answers (%s); serving from the last known view of %d worker(s)",
                    addresses,
                    len(self._view or []),
                )
            else:  # starting together with the controller (lmfleet serve): not a failure yet
                logger.info("waiting for a controller to answer (%s)", addresses)
        self.controller_up = False
        return None

    def _apply(self, source: str, view: list[WorkerInfo]) -> None:
        now = self._clock()
        listed = {w.address: w for w in view}
        for event in self.placement.observe(view):
            if self._on_model_event is not None:
                self._on_model_event(event)
        for address, ejection in list(self._ejected.items()):
            info = listed.get(address)
            if info is None:  # the controller forgot it (expired, unregistered): a new registration is fresh
                del self._ejected[address]
            elif ejection.heartbeat is None or ejection.source != source:
                ejection.heartbeat, ejection.source = info.last_heartbeat, source
            elif now - ejection.since >= self.eject_backoff_s and info.last_heartbeat != ejection.heartbeat:
                del self._ejected[address]
                logger.info("readmitted worker %s: it heartbeats again", address)
        for info in view:
            for name in info.status.model_names:
                self._seen[name] = now
            beat = self._beats.get(info.address)
            if beat is None or beat[0] != info.last_heartbeat:
                self._beats[info.address] = (info.last_heartbeat, now)
        self._beats = {a: b for a, b in self._beats.items() if a in listed}
        self._prefixes.reported({w.address: w.status.prefix_hashes for w in view})
        self._view = view

    async def _probe_ejected(self) -> None:
        now = self._clock()
        due = [a for a, e in self._ejected.items() if now - e.since >= self.eject_backoff_s]
        if not due:
            return
        answers = await asyncio.gather(*(self._workers.ready(a, timeout=PROBE_TIMEOUT_S) for a in due))
        for address, ready in zip(due, answers, strict=True):
            if ready and address in self._ejected:
                del self._ejected[address]
                logger.info("readmitted worker %s: it answers /ready (no controller to ask)", address)

    # -- health --------------------------------------------------------------------------------------------------

    def eject(self, address: str, reason: str) -> None:
        """Take a worker out of rotation now (it refused a connection, failed, hung, or is draining)."""
        if address not in self._ejected:
            logger.warning("ejected worker %s: %s", address, reason)
            if self._on_eject is not None:
                self._on_eject(address)
        self._prefixes.forget(address)
        self._ejected[address] = Ejection(since=self._clock(), reason=reason)

    def is_ejected(self, address: str) -> bool:
        return address in self._ejected

    def ejection(self, address: str) -> Ejection | None:
        return self._ejected.get(address)

    # -- reads ---------------------------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """True once some controller has answered."""
        return self._view is not None

    def workers(self) -> list[WorkerInfo]:
        """Every worker in the view, ejected ones included."""
        return list(self._view or [])

    def healthy(self) -> list[WorkerInfo]:
        return [w for w in self._view or [] if w.address not in self._ejected]

    def open_requests(self, address: str) -> int:
        return self._open[address]

    def leased(self) -> dict[str, int]:
        """Requests this server has open, per worker address (a worker that left the view may still be here)."""
        return dict(self._open)

    def heartbeat_age(self, address: str) -> float | None:
        """Seconds since a refresh first showed the worker's latest heartbeat (so within a refresh interval of the
        truth: the controller's clock is not this one's); None for a worker not in the view."""
        beat = self._beats.get(address)
        return None if beat is None else self._clock() - beat[1]

    async def models(self) -> list[str]:
        """Every model some worker in the view serves (loaded or not), sorted. ServiceUnavailable while no
        controller has ever answered."""
        await self._ensure_loaded()
        return sorted({name for w in self._view or [] for name in w.status.model_names})

    def model_state(self, model: str) -> tuple[FleetState, bool]:
        """`model`'s state across the view and whether its last load failed (lmfleet.placement.fleet_state)."""
        return fleet_state(self._view or [], model)

    def unknown(self, model: str) -> errors.LmfleetError:
        """What a request for `model`, which no worker in the view serves, is told: 503 no_worker_available while
        it is expected or was served within `model_memory_s`, else 404 model_not_found."""
        if model in self._expected:
            return errors.NoWorkerAvailable(
                f"The model `{model}` is starting; retry in a moment.", headers={"Retry-After": "1"}
            )
        seen = self._seen.get(model)
        if seen is not None and self._clock() - seen <= self.model_memory_s:
            return errors.NoWorkerAvailable(
                f"No worker for the model `{model}` is available right now; retry later.",
                headers={"Retry-After": "1"},
            )
        return errors.ModelNotFound(f"The model `{model}` does not exist.", param="model")

    async def _ensure_loaded(self) -> None:
        if self._view is None:
            await self.refresh(max_age_s=0.2)
        if self._view is None:
            raise errors.ServiceUnavailable(
                "The controller is unreachable and no worker is known yet; retry later.", headers={"Retry-After": "1"}
            )

    def _serving(self, model: str) -> list[WorkerInfo]:
        return [w for w in self._view or [] if model in w.status.model_names]

    def resolve(self, model: str) -> str:
        """The model name `model` means: itself when some worker serves it, else the one model whose workers give it
        as an alias (a model served as `/models/x.gguf` answers to `x`), else itself (acquire then says 404)."""
        if self._serving(model):
            return model
        claimed = {
            w.status.model_names[0] for w in self._view or [] if model in w.status.aliases and w.status.model_names
        }
        return claimed.pop() if len(claimed) == 1 else model

    def context_length(self, model: str) -> int | None:
        """The context every worker of `model` in the view takes (the smallest they report); None if none says."""
        lengths = [n for w in self._serving(model) if (n := context_length_of(w.status, model))]
        return min(lengths) if lengths else None

    async def acquire(
        self, model: str, exclude: Collection[str] = (), *, task: Task | None = "generate", key: Sequence[Link] = ()
    ) -> Lease | None:
        """A lease on the worker to send a request for `model` to, among those that serve `task` (None: any) and
        are not in `exclude` (the ones this request already tried), and among those the ones placement allows
        (`_placed`); None when every such worker is excluded. `key`: the request's prompt prefixes
        (lmfleet.api.affinity.prefix_key), recorded as sent to the chosen worker. Raises ModelNotFound (404) for a
        model nobody serves, InvalidRequest (400) for one served only for another task, NoWorkerAvailable (503) for
        one whose workers have all gone in the last `model_memory_s` or that is expected, ServiceUnavailable (503)
        while no controller has ever answered."""
        await self._ensure_loaded()
        serving = self._serving(model)
        if not serving:  # perhaps a worker registered since the last refresh
            await self.refresh(max_age_s=0.2)
            serving = self._serving(model)
        if serving and task is not None:
            doing = [w for w in serving if task in tasks_of(w.status, model)]
            if not doing:
                offered = sorted({t for w in serving for t in tasks_of(w.status, model)})
                raise errors.InvalidRequest(
                    f"The model `{model}` does not support {_TASK_NAMES[task]}; it serves "
                    f"{', '.join(_TASK_NAMES.get(t, t) for t in offered)}.",
                    param="model",
                )
            serving = doing
        if not serving:
            raise self.unknown(model)
        serving = self._placed(model, serving, exclude)
        candidates = [w for w in serving if w.address not in exclude]
        if not candidates:
            return None
        healthy = [w for w in candidates if w.address not in self._ejected]
        pool = healthy or candidates
        affinity = await self._affinity(key, [w.address for w in pool]) if self._keyed and key else NO_AFFINITY
        chosen = self._policy([self._counting_own(w) for w in pool], self._rng, affinity)
        if self._keyed:
            self._prefixes.sent(key, chosen.address)
        self._open[chosen.address] += 1
        return self._lease(model, chosen.address)

    def _placed(self, model: str, serving: list[WorkerInfo], exclude: Collection[str]) -> list[WorkerInfo]:
        """The workers of `serving` a request for `model` may go to (lmfleet.placement.Placement.candidates), among
        the healthy ones not in `exclude`, or, when every one of those is ejected, among all not in `exclude`."""
        untried = [w for w in serving if w.address not in exclude]
        healthy = [w for w in untried if w.address not in self._ejected]
        return self.placement.candidates(healthy or untried, model, self._view or [], self._busy)

    def load_target(self, model: str) -> WorkerInfo | None:
        """Where `model` is or goes: a healthy worker that holds it, is loading it, or is chosen now to load it (as
        a request would place it; the admin's load). None when no worker serves it."""
        serving = self._serving(model)
        placed = self._placed(model, serving, ())
        return self._policy([self._counting_own(w) for w in placed], self._rng, NO_AFFINITY) if placed else None

    def holds(self, model: str, address: str) -> bool:
        """Whether the worker at `address` has `model` loaded as the view shows it (a worker not in the view: True,
        nothing says otherwise)."""
        worker = next((w for w in self._view or [] if w.address == address), None)
        return worker is None or state_of(worker.status, model) == "loaded"

    def load_failed(self, model: str, address: str) -> None:
        """The worker at `address` could not load `model`: the next request loads it elsewhere (it stays in rotation
        for its other models)."""
        logger.warning("worker %s could not load %s", address, model)
        self.placement.failed(address, model)

    def holders(self, model: str) -> list[WorkerInfo]:
        """The workers in the view that hold `model` or are loading it."""
        return [w for w in self._serving(model) if state_of(w.status, model) in HELD]

    def _lease(self, model: str, address: str) -> Lease:
        """A lease on `address` for a request for `model` (counted per model too: a model with requests open here is
        not idle, so placement does not count on its eviction)."""
        self._open_models[(address, model)] += 1

        def release(address: str) -> None:
            self._release(address)
            self._open_models[(address, model)] -= 1
            if self._open_models[(address, model)] <= 0:
                del self._open_models[(address, model)]

        return Lease(address, release)

    def _busy(self, address: str, model: str) -> bool:
        return self._open_models[(address, model)] > 0

    async def _affinity(self, key: Sequence[Link], addresses: list[str]) -> dict[str, Affinity]:
        affinity = self._prefixes.affinity(key, addresses)
        if len(key) > 1 and self.controller_up and not any(a.matched for a in affinity.values()):
            await self.refresh(max_age_s=MISS_REFRESH_S)
            affinity = self._prefixes.affinity(key, addresses)
        return affinity

    def _release(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]

    def _counting_own(self, info: WorkerInfo) -> WorkerInfo:
        """The worker as the policy should see it: at least as loaded as the requests we have open on it."""
        mine = self._open[info.address]
        if mine <= load(info.status):
            return info
        return info.model_copy(update={"status": info.status.model_copy(update={"queue_length": mine})})

    async def aclose(self) -> None:
        """Cancel a refresh in flight (the lifespan's end)."""
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
