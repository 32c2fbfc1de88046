"""The multi-model worker's parts in process: the catalog (INI config, names, options), Ollama's keep_alive, and the
supervisor's loads, evictions and keep-alive with fake model processes behind `httpx.MockTransport` and a fake
clock. The same behaviour with real processes and real models: tests/e2e/test_multimodel.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from lmfleet import errors
from lmfleet.protocol.openai import ChatCompletionRequest
from lmfleet.protocol.worker import WorkerStatus, duration_seconds
from lmfleet.worker import catalog
from lmfleet.worker.catalog import Budget, ModelSpec
from lmfleet.worker.supervisor import Supervisor


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), ("90s", 90.0), ("2.5", 2.5), (0, 0.0), (-1, -1.0), ("-1m", -1.0), (None, None)],
)
def test_keep_alive_reads_seconds_and_go_durations(given: object, seconds: float | None) -> None:
    assert duration_seconds(given) == seconds


@pytest.mark.parametrize("given", ["soon", "5 minutes", "", True, [1]])
def test_a_keep_alive_that_is_no_duration_is_refused(given: object) -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        duration_seconds(given)


def test_the_api_passes_a_requests_keep_alive_to_the_worker() -> None:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert body.to_generate_request("r", "m").keep_alive is None
    body = body.model_copy(update={"keep_alive": duration_seconds("10m")})
    assert body.to_generate_request("r", "m").keep_alive == 600.0


def test_the_config_names_each_model_with_its_options_and_the_defaults_of_every_model(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    config = tmp_path / "models.ini"
    config.write_text(
        "[*]\nthreads = 2\nkeep-alive = 10m\n\n[alpha]\npath = a.gguf\npin = true\nmax-num-seqs = 4\n"
        "flash-attn = false\n\n[beta]\nmodel = a.gguf\nkeep-alive = -1\n"
    )
    alpha, beta = catalog.from_config(config)
    assert (alpha.name, alpha.path, alpha.pinned, alpha.keep_alive_s) == ("alpha", str(tmp_path / "a.gguf"), True, 600)
    assert alpha.options == {"threads": "2", "max_num_seqs": "4", "flash_attn": False}
    assert (beta.name, beta.keep_alive_s, beta.pinned) == ("beta", -1.0, False)
    argv = catalog.child_argv(alpha, {"threads": 8, "max_model_len": 2048, "flash_attn": True}, 4321, [])
    assert argv[argv.index("--threads") + 1] == "2"  # the model's own option wins
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert "--no-flash-attn" in argv and argv[argv.index("--model-names") + 1] == "alpha"


def test_a_config_key_that_means_nothing_is_one_line_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "models.ini"
    config.write_text("[alpha]\npath = a.gguf\nmax-num-seq = 4\n")
    with pytest.raises(ValueError, match=r"\[alpha\]: unknown key max-num-seq"):
        catalog.from_config(config)


def test_sizes() -> None:
    assert catalog.parse_size("6GiB") == 6 << 30
    assert catalog.parse_size("512M") == 512 << 20
    assert catalog.parse_size("1000") == 1000
    with pytest.raises(ValueError):
        catalog.parse_size("lots")


class FakeProcess:
    """A model's process that is ready at once; pid 0 has no /proc entry, so it holds no memory."""

    pid = 0

    def __init__(self, name: str) -> None:
        self.address = f"http://{name}.model"
        self.returncode: int | None = None
        self._exited = asyncio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def stop(self) -> None:
        self.exit(0)

    def exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()


class Hooks:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def loaded(self, model: str, engine: str, seconds: float) -> None:
        self.events.append(("loaded", model))

    def load_failed(self, model: str) -> None:
        self.events.append(("load_failed", model))

    def unloaded(self, model: str, reason: str) -> None:
        self.events.append((reason, model))


class Rig:
    def __init__(self, names: list[str], budget: Budget, pinned: tuple[str, ...] = ()) -> None:
        self.now = 0.0
        self.started: list[str] = []
        self.processes: dict[str, FakeProcess] = {}
        self.hooks = Hooks()
        self.gate = asyncio.Event()  # loads finish once set
        self.gate.set()

        def answer(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/ready":
                return httpx.Response(200, json={"status": "ready"})
            return httpx.Response(200, content=WorkerStatus(model_names=[request.url.host]).model_dump_json())

        async def start(spec: ModelSpec) -> FakeProcess:
            self.started.append(spec.name)
            await self.gate.wait()
            self.processes[spec.name] = FakeProcess(spec.name)
            return self.processes[spec.name]

        specs = [ModelSpec(n, f"/m/{n}.gguf", "llamacpp", pinned=n in pinned) for n in names]
        self.http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        self.sup = Supervisor(specs, budget, start=start, http=self.http, hooks=self.hooks, clock=lambda: self.now)

    async def use(self, name: str, keep_alive: float | None = None) -> None:
        (await self.sup.acquire(name, keep_alive)).release()
        self.now += 1

    def state(self, name: str) -> str:
        return self.sup.slot(name).state


BIG = Budget(max_loaded=2, memory_bytes=1 << 40, keep_alive_s=300, load_timeout_s=5)


async def test_requests_arriving_while_a_model_loads_wait_for_that_one_load() -> None:
    rig = Rig(["a"], BIG)
    rig.gate.clear()
    waiting = [asyncio.create_task(rig.sup.acquire("a")) for _ in range(16)]
    await asyncio.sleep(0.01)
    assert rig.state("a") == "loading"
    rig.gate.set()
    leases = await asyncio.gather(*waiting)
    assert rig.started == ["a"] and rig.hooks.events == [("loaded", "a")]
    assert rig.sup.running == 16
    for lease in leases:
        lease.release()
        lease.release()  # once only
    assert rig.sup.running == 0


async def test_the_least_recently_used_idle_unpinned_model_makes_room() -> None:
    rig = Rig(["a", "b", "c", "p"], Budget(max_loaded=2, memory_bytes=1 << 40, load_timeout_s=5))
    await rig.use("a")
    await rig.use("b")
    await rig.use("a")  # b is now the least recently used
    await rig.use("c")
    assert (rig.state("a"), rig.state("b"), rig.state("c")) == ("loaded", "unloaded", "loaded")
    busy = await rig.sup.acquire("c")  # running: c may not go
    await rig.use("b")
    assert (rig.state("a"), rig.state("b"), rig.state("c")) == ("unloaded", "loaded", "loaded")
    busy.release()
    rig.sup.pin("b", True)
    await rig.use("a")  # b is pinned: c goes although b was used longer ago
    assert (rig.state("a"), rig.state("b"), rig.state("c")) == ("loaded", "loaded", "unloaded")
    assert ("evicted", "b") in rig.hooks.events and ("evicted", "c") in rig.hooks.events


async def test_with_every_loaded_model_busy_a_request_for_another_gets_a_clear_503() -> None:
    rig = Rig(["a", "b"], Budget(max_loaded=1, memory_bytes=1 << 40, load_timeout_s=0.2))
    lease = await rig.sup.acquire("a")
    with pytest.raises(errors.ServiceUnavailable) as caught:
        await rig.sup.acquire("b")
    assert caught.value.code == "model_loading" and "waiting for room" in caught.value.message
    while rig.sup.slot("b").load_task is not None:  # the load gives up at the same deadline
        await asyncio.sleep(0.01)
    assert (rig.state("a"), rig.state("b"), rig.started) == ("loaded", "unloaded", ["a"])
    lease.release()
    await rig.use("b")  # room once a is idle
    assert rig.state("b") == "loaded"


async def test_an_idle_model_is_unloaded_after_its_keep_alive_and_a_requests_keep_alive_wins() -> None:
    rig = Rig(["a", "b", "p"], Budget(max_loaded=3, memory_bytes=1 << 40, keep_alive_s=60), pinned=("p",))
    rig.sup.preload()
    await rig.use("a")
    await rig.use("b", keep_alive=-1)  # forever
    await rig.use("p")
    rig.now += 59
    rig.sup.reap()
    await asyncio.sleep(0)
    assert rig.state("a") == "loaded"
    rig.now += 2
    rig.sup.reap()
    await asyncio.sleep(0.01)
    assert (rig.state("a"), rig.state("b"), rig.state("p")) == ("unloaded", "loaded", "loaded")
    assert ("keep_alive", "a") in rig.hooks.events
    await rig.use("a", keep_alive=0)
    rig.sup.reap()
    await asyncio.sleep(0.01)
    assert rig.state("a") == "unloaded"


async def test_a_model_whose_process_dies_is_failed_and_the_next_request_loads_it_again() -> None:
    rig = Rig(["a", "b"], BIG)
    await rig.use("a")
    await rig.use("b")
    rig.processes["a"].exit(-9)
    await asyncio.sleep(0.01)
    assert (rig.state("a"), rig.state("b")) == ("failed", "loaded")
    assert ("crashed", "a") in rig.hooks.events
    await rig.use("a")
    assert rig.state("a") == "loaded" and rig.started == ["a", "b", "a"]


async def test_a_model_this_worker_cannot_serve_is_404() -> None:
    rig = Rig(["a"], BIG)
    with pytest.raises(errors.ModelNotFound):
        await rig.sup.acquire("nope")


def test_a_models_dir_serves_each_gguf_file_and_model_folder_by_its_name(tmp_path: Path) -> None:
    (tmp_path / "SmolLM2-135M.Q4_1.gguf").write_bytes(b"GGUF")
    (tmp_path / "minilm").mkdir()
    (tmp_path / "minilm" / "modules.json").write_text("[]")
    (tmp_path / "notes.txt").write_text("not a model")
    assert [s.name for s in catalog.from_dir(tmp_path)] == ["SmolLM2-135M.Q4_1", "minilm"]
