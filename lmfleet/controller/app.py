"""The controller's HTTP face: FastChat's controller routes over a registry and a dispatch policy.

Owns: the routes, who may write to the registry (registration secret, allowed worker networks), worker address
validation, fetching a FastChat worker's status when it registers without one, and choosing the registry backend
(`make_registry`: in memory by default; etcd with `ControllerSettings.etcd`, shared by several controllers).

    POST /register_worker      RegisterWorkerRequest -> WorkerInfo           (secret; networks)
    POST /receive_heart_beat   HeartbeatRequest -> {"exist": bool}           (secret)
    POST /unregister_worker    {"worker_name"} -> {"removed": bool}          (secret)
    GET|POST /list_models      -> {"models": [...]}: every model a live worker can serve, loaded or not;
                               /list_language_models, /list_multimodal_models: FastChat's split
    POST /get_worker_address   {"model"} -> {"address": url}, "" when no live worker serves it; a worker that holds
                               the model loaded first, else one loading it, else one that can load it
    GET  /workers              -> {"workers": [WorkerInfo, ...]}
    POST /refresh_all_workers  expire now -> {"removed": [...]}
    POST /worker_get_status    FastChat's aggregate: {"model_names", "speed", "queue_length"} of every live worker
    POST /worker_generate_stream  FastChat's generation, relayed to a worker of the model (secret)
    GET  /test_connection      -> "success"
    GET  /health               -> {"status": "ok"}
    GET  /ready                -> {"status": "ready"}; 503 with the reason while the registry's view may be stale
    GET  /metrics              Prometheus: workers by model and state, registry events, dispatch (controller/metrics.py)

Route and field names are FastChat's, so FastChat model workers, its API server and its Gradio web server work
against this controller. A registration whose status does not name its protocol is a FastChat worker's
(protocol.worker.reported): it expires after `fastchat_heartbeat_expiry_s` (FastChat's 90 s; its workers beat every
45 s), and the API servers talk FastChat to it. Differences: every worker must heartbeat (FastChat's
`check_heart_beat: false` is ignored), `/refresh_all_workers` only expires, it does not re-poll workers, and
`/worker_get_status` sums the load the workers last reported instead of asking each one. `/worker_generate_stream`
relays bytes, FastChat's NUL-separated objects, and reads none of them; a failure is one in-band object with
FastChat's error code (no worker: 50005, the worker unreachable or failing: 50006).

Bad input: every body passes lmfleet.guard first (over `max_request_bytes` → 413; not one JSON object in UTF-8,
duplicate keys, deep nesting → 400); then the protocol models bound every field (lmfleet.protocol.worker: a
negative, NaN, huge or mistyped load report is a 400 naming it, so no report can break dispatch).

Security: with `registration_secret` set, the three write routes need `Authorization: Bearer <secret>` (compared
in constant time; 401 otherwise and the registry is untouched). Read routes stay open and ignore the header.
With `allowed_worker_networks` set, only workers whose address is an IP inside one of them may register (403);
nothing is resolved, so a hostname is refused, except `localhost` when a loopback network is allowed. The
controller only calls a worker's `/worker_get_status` for a request that passed both checks. With neither set
(the default), anyone who can reach the controller can register a worker and attract traffic: bind it to
127.0.0.1 (the default) or set a secret.

Does not own: the registry's rules and background work (`registry`, `etcd`), choosing a worker (`dispatch`, and
`placement` for which workers of a model may take a request), the CLI and the bind address. Never sees a token.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmfleet import docs, errors
from lmfleet.client import CONTROL_TIMEOUT, make_http_client
from lmfleet.controller.metrics import ControllerMetrics
from lmfleet.controller.registry import FleetRegistry, Registry, RegistryUnavailable
from lmfleet.dispatch import DEFAULT_POLICY, get_policy
from lmfleet.guard import BearerSecrets, ParsedBodyRoute, RequestGuard
from lmfleet.metrics import install as install_metrics
from lmfleet.metrics import new_registry
from lmfleet.placement import preferred
from lmfleet.protocol import fastchat
from lmfleet.protocol.worker import (
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterWorkerRequest,
    WorkerAddressRequest,
    WorkerInfo,
    WorkerStatus,
    reported,
)
from lmfleet.requestid import RequestIdMiddleware

if TYPE_CHECKING:
    from lmfleet.controller.etcd import EtcdSettings

logger = logging.getLogger("lmfleet.controller")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_STATUS_BYTES = 1 << 20  # a worker's /worker_get_status answer is a few hundred bytes
_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


@dataclass
class ControllerSettings:
    """How the controller behaves. Validated on construction (ValueError). Where it binds is the CLI's business
    (default 127.0.0.1:21001, FastChat's controller port)."""

    dispatch_policy: str = DEFAULT_POLICY  # a key of dispatch.POLICIES
    heartbeat_expiry_s: float = 6.0  # workers heartbeat every 2 s by default; FastChat waits 90 s
    registration_secret: str | None = field(default=None, repr=False)  # never printed
    allowed_worker_networks: list[str] | None = None  # CIDRs, e.g. ["127.0.0.0/8", "10.0.0.0/8"]; None: any
    max_request_bytes: int = 1 << 20  # a registration is a few hundred bytes (413 beyond; lmfleet.guard)
    etcd: EtcdSettings | None = None  # None: the registry lives in this process's memory
    fastchat_heartbeat_expiry_s: float = fastchat.HEARTBEAT_EXPIRY_S  # FastChat workers beat every 45 s

    def __post_init__(self) -> None:
        get_policy(self.dispatch_policy)
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be positive")
        for name in ("heartbeat_expiry_s", "fastchat_heartbeat_expiry_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.registration_secret is not None and not self.registration_secret:
            raise ValueError("registration_secret must be non-empty (None disables it)")
        self.networks()

    def networks(self) -> list[IPNetwork] | None:
        """`allowed_worker_networks` parsed (host bits are ignored: "10.1.2.3/8" means 10.0.0.0/8)."""
        if self.allowed_worker_networks is None:
            return None
        parsed: list[IPNetwork] = []
        for cidr in self.allowed_worker_networks:
            try:
                parsed.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"allowed_worker_networks: {cidr!r} is not a CIDR network ({exc})") from None
        return parsed


class UnregisterWorkerRequest(BaseModel):
    """`POST /unregister_worker`."""

    model_config = ConfigDict(extra="ignore")

    worker_name: str = Field(min_length=1, max_length=2048)


class ControllerState(TypedDict):
    """The lifespan state every request sees as `request.state`."""

    http: httpx.AsyncClient  # fetches a FastChat worker's status when it registers without one


def normalize_worker_address(raw: str) -> str:
    """The worker's base URL as the registry keys it: `scheme://host[:port][/path]`, no trailing slash.
    InvalidRequest unless it is an http(s) URL with a host and without credentials, query or fragment."""

    def bad(why: str) -> errors.InvalidRequest:
        return errors.InvalidRequest(f"worker_name must be the worker's http(s) base URL: {why}", param="worker_name")

    text = raw.strip()
    if any(c.isspace() or not c.isprintable() for c in text):
        raise bad("it contains whitespace or control characters")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise bad(str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise bad("the scheme must be http or https")
    if not parts.hostname:
        raise bad("it has no host")
    if parts.username is not None or parts.password is not None:
        raise bad("it must not contain credentials")
    if parts.query or parts.fragment:
        raise bad("it must not have a query or fragment")
    return f"{scheme}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def host_allowed(address: str, networks: Sequence[IPNetwork]) -> bool:
    """True when the (normalized) address's host is an IP inside one of `networks`. Resolves nothing: a hostname
    is refused, except `localhost`, which counts as a loopback address."""
    host = urlsplit(address).hostname or ""
    try:
        ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = (ipaddress.ip_address(host),)
    except ValueError:
        if host != "localhost":
            return False
        ips = _LOOPBACK
    for ip in ips:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in networks):
            return True
    return False


async def fetch_worker_status(http: httpx.AsyncClient, address: str) -> WorkerStatus:
    """FastChat's `POST {address}/worker_get_status`, for a worker that registered without a status."""

    def failed(why: str) -> errors.InvalidRequest:
        return errors.InvalidRequest(
            f"worker_status was omitted and {address}/worker_get_status failed ({why}); "
            "send worker_status with the registration",
            param="worker_status",
        )

    body = bytearray()
    try:
        async with http.stream("POST", address + "/worker_get_status", timeout=CONTROL_TIMEOUT) as resp:
            if resp.status_code != 200:
                raise failed(f"HTTP {resp.status_code}")
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > _MAX_STATUS_BYTES:
                    raise failed("answer too large")
    except httpx.HTTPError as exc:
        raise failed(type(exc).__name__) from exc
    try:
        return WorkerStatus.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise failed(f"not a worker status: {exc.errors()[0].get('msg', 'invalid')}") from None


def _in_band(code: fastchat.ErrorCode) -> bytes:
    return json.dumps({"text": fastchat.SERVER_ERROR_MSG, "error_code": int(code)}).encode() + b"\0"


async def _relay(
    http: httpx.AsyncClient, address: str, body: dict[str, Any], authorization: str | None
) -> AsyncGenerator[bytes, None]:
    """A worker's `/worker_generate_stream` answer, object by object (each with its NUL byte); a failure, before or
    after the first object, as one last in-band object."""
    headers = {"Authorization": authorization} if authorization else {}
    try:
        async with http.stream("POST", address + "/worker_generate_stream", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                logger.warning("worker %s answered /worker_generate_stream with HTTP %d", address, resp.status_code)
                yield _in_band(fastchat.ErrorCode.CONTROLLER_WORKER_TIMEOUT)
                return
            pending = b""
            async for data in resp.aiter_bytes():
                *objects, pending = (pending + data).split(b"\0")
                for obj in objects:
                    if obj:
                        yield obj + b"\0"
    except httpx.HTTPError as exc:
        logger.warning("worker %s failed during /worker_generate_stream: %s", address, type(exc).__name__)
        yield _in_band(fastchat.ErrorCode.CONTROLLER_WORKER_TIMEOUT)


class _RelayResponse(StreamingResponse):
    """Closes the relay (and so the connection to the worker, which aborts the generation) however the response
    ends."""

    def __init__(self, relay: AsyncGenerator[bytes, None]) -> None:
        super().__init__(relay, media_type="application/octet-stream")
        self._relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.aclose()


def make_registry(settings: ControllerSettings, clock: Callable[[], float] | None = None) -> FleetRegistry:
    """The registry backend the settings name: etcd (shared by every controller on it) or this process's memory."""
    if settings.etcd is None:
        return Registry(clock or time.monotonic, settings.heartbeat_expiry_s, settings.fastchat_heartbeat_expiry_s)
    from lmfleet.controller.etcd import EtcdRegistry  # needs the `etcd` extra

    return EtcdRegistry(
        settings.etcd,
        settings.heartbeat_expiry_s,
        clock=clock or time.monotonic,
        fastchat_expiry_s=settings.fastchat_heartbeat_expiry_s,
    )


def create_app(
    settings: ControllerSettings,
    *,
    clock: Callable[[], float] | None = None,
    http_client: httpx.AsyncClient | None = None,
    rng: random.Random | None = None,
    registry: FleetRegistry | None = None,
) -> FastAPI:
    """A controller app. `clock` drives heartbeat expiry (default `time.monotonic`); `http_client` is used to
    fetch FastChat workers' status (default: one pooled client created and closed by the lifespan); `rng`
    breaks dispatch ties (default: freshly seeded); `registry` replaces the one the settings name (tests)."""
    registry = registry if registry is not None else make_registry(settings, clock)
    policy = get_policy(settings.dispatch_policy)
    dispatch_rng = rng or random.Random()
    networks = settings.networks()
    metrics = ControllerMetrics(new_registry(), settings.dispatch_policy, registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[ControllerState]:
        async with contextlib.AsyncExitStack() as stack:
            http = http_client if http_client is not None else await stack.enter_async_context(make_http_client())
            await stack.enter_async_context(registry.running())
            logger.info(
                "controller ready: registry=%s policy=%s heartbeat_expiry=%.1fs secret=%s allowed_worker_networks=%s",
                settings.etcd or "memory",
                settings.dispatch_policy,
                settings.heartbeat_expiry_s,
                "set" if settings.registration_secret else "none",
                settings.allowed_worker_networks or "any",
            )
            yield {"http": http}

    secret = BearerSecrets([settings.registration_secret] if settings.registration_secret else [])

    def require_secret(request: Request) -> None:
        if secret and not secret.match(request.headers.get("authorization")):
            client = request.client.host if request.client else "?"
            logger.warning("refused %s from %s: missing or wrong registration secret", request.url.path, client)
            raise errors.AuthenticationFailed(
                "this controller requires the registration secret: send 'Authorization: Bearer <secret>'"
            )

    app = docs.fastapi_app(title="lmfleet controller", lifespan=lifespan)  # /docs served offline
    app.router.route_class = ParsedBodyRoute
    errors.install_handlers(app)

    @app.exception_handler(RegistryUnavailable)  # the registry logged the outage once: no line per refused write
    async def _registry_unavailable(_request: Request, exc: RegistryUnavailable) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    app.add_middleware(RequestGuard, max_bytes=settings.max_request_bytes)  # 413; 400 for a body that is not sane JSON
    install_metrics(app, metrics.registry, part="lmfleet_controller")  # GET /metrics; counts every request
    app.add_middleware(RequestIdMiddleware)  # outermost: X-Request-ID on every answer and log line
    writes = [Depends(require_secret)]

    @app.post("/register_worker", dependencies=writes)
    async def register_worker(req: RegisterWorkerRequest, request: Request) -> WorkerInfo:
        address = normalize_worker_address(req.worker_name)
        if networks is not None and not host_allowed(address, networks):
            logger.warning("refused to register %s: not in allowed_worker_networks", address)
            raise errors.Forbidden(
                f"worker address {address} is not an IP address inside allowed_worker_networks",
                param="worker_name",
            )
        status = req.worker_status
        if status is None:
            status = await fetch_worker_status(request.state.http, address)
        status = reported(status)
        if req.multimodal:
            status = status.model_copy(update={"multimodal": True})
        return await registry.register(address, status)

    @app.post("/receive_heart_beat", dependencies=writes)
    async def receive_heart_beat(req: HeartbeatRequest) -> HeartbeatResponse:
        address = normalize_worker_address(req.worker_name)
        load: WorkerStatus | int = reported(req.worker_status) if req.worker_status is not None else req.queue_length
        return HeartbeatResponse(exist=await registry.heartbeat(address, load))

    @app.post("/unregister_worker", dependencies=writes)
    async def unregister_worker(req: UnregisterWorkerRequest) -> dict[str, bool]:
        return {"removed": await registry.unregister(normalize_worker_address(req.worker_name))}

    @app.api_route("/list_models", methods=["GET", "POST"])
    async def list_models() -> dict[str, list[str]]:
        return {"models": registry.models()}

    @app.api_route("/list_language_models", methods=["GET", "POST"])
    async def list_language_models() -> dict[str, list[str]]:
        return {"models": sorted({n for w in registry.all() if not w.status.multimodal for n in w.status.model_names})}

    @app.api_route("/list_multimodal_models", methods=["GET", "POST"])
    async def list_multimodal_models() -> dict[str, list[str]]:
        return {"models": sorted({n for w in registry.all() if w.status.multimodal for n in w.status.model_names})}

    def workers_for(model: str) -> list[WorkerInfo]:
        """The live workers to dispatch a request for `model` to: those that hold it loaded, else those loading
        it, else one that can load it (lmfleet.placement.preferred)."""
        return preferred(registry.workers_for(model), model)

    @app.post("/get_worker_address")
    async def get_worker_address(req: WorkerAddressRequest) -> dict[str, str]:
        workers = workers_for(req.model)
        metrics.dispatched(bool(workers))
        return {"address": policy(workers, dispatch_rng).address if workers else ""}

    @app.get("/workers")
    async def workers() -> dict[str, list[WorkerInfo]]:
        return {"workers": registry.all()}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> dict[str, list[str]]:
        return {"removed": await registry.expire()}

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict[str, Any]:
        live = [w.status for w in registry.all()]
        return {
            "model_names": sorted({n for s in live for n in s.model_names}),
            "speed": sum(s.speed for s in live),
            "queue_length": sum(s.queue_length for s in live),
        }

    @app.post("/worker_generate_stream", dependencies=writes)
    async def worker_generate_stream(body: dict[str, Any], request: Request) -> StreamingResponse:
        model = body.get("model")
        workers = workers_for(model) if isinstance(model, str) else []
        metrics.dispatched(bool(workers))
        if not workers:
            logger.info("no worker for %r: answered FastChat's no-worker error", model)
            return StreamingResponse(iter([_in_band(fastchat.ErrorCode.CONTROLLER_NO_WORKER)]))
        address = policy(workers, dispatch_rng).address
        relay = _relay(request.state.http, address, body, request.headers.get("authorization"))
        return _RelayResponse(relay)

    @app.get("/test_connection")
    async def test_connection() -> str:
        return "success"

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        if registry.problem is not None:  # 503 with the reason (the registry logged it once)
            raise RegistryUnavailable(f"serving the last known view of the fleet: {registry.problem}")
        return {"status": "ready"}

    return app
