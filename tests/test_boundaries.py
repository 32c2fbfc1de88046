"""The architecture's import rules, checked in fresh interpreters: the API server and the controller start on a
small CPU box without torch, and neither loads the other; the engine boundary knows nothing of HTTP."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "llama_cpp")


def modules_loaded_by(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint('\\n'.join(sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], check=True, timeout=120, capture_output=True, text=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    ("app", "banned"),
    [
        ("lmfleet.api.app", ("lmfleet.controller", "lmfleet.worker", "lmfleet.engine", "llguidance")),
        ("lmfleet.controller.app", ("lmfleet.api", "lmfleet.worker", "lmfleet.engine", "llguidance")),
        ("lmfleet.worker.app", ("lmfleet.api", "lmfleet.controller")),
    ],
)
def test_each_app_loads_only_its_own_side(app: str, banned: tuple[str, ...]) -> None:
    settings = {"lmfleet.worker.app": "WorkerSettings('m', 'http://w')"}.get(app, "")
    factory = {"lmfleet.api.app": "ApiSettings()", "lmfleet.controller.app": "ControllerSettings()"}
    code = f"import {app} as m\nm.create_app(m.{factory.get(app, settings)}).openapi()"
    loaded = modules_loaded_by(code)
    assert not [name for name in loaded if name.split(".")[0] in HEAVY], "a heavy library was imported"
    crossing = sorted(name for name in loaded if name.startswith(banned))
    assert not crossing, f"{app} imports {crossing}"


def test_the_engine_boundary_knows_no_http() -> None:
    loaded = modules_loaded_by("import lmfleet.engine.base, lmfleet.engine.runner, lmfleet.engine.registry")
    wire = sorted(n for n in loaded if n.split(".")[0] in ("fastapi", "starlette", "httpx", "pydantic"))
    assert not wire, f"the engine side imports {wire}"
    assert not [n for n in loaded if n.split(".")[0] in HEAVY]


def test_the_worker_pipeline_knows_no_http() -> None:
    loaded = modules_loaded_by("import lmfleet.worker.pipeline")
    http = sorted(n for n in loaded if n.split(".")[0] in ("fastapi", "starlette", "httpx", "uvicorn"))
    assert not http, f"the worker's generation pipeline imports {http}"


def test_the_cli_builds_every_settings_without_loading_a_model_library() -> None:
    code = "from lmfleet import cli\ncli.build_parser().parse_args(['worker', '--model-path', 'x.gguf'])"
    assert not [n for n in modules_loaded_by(code) if n.split(".")[0] in HEAVY]


def test_the_default_controller_needs_no_etcd_client() -> None:
    loaded = modules_loaded_by(
        "import lmfleet.controller.app as m\nimport lmfleet.cli as c\nfrom lmfleet.controller import flags as f\n"
        "m.create_app(f.settings(c.build_parser().parse_args(['controller']))).openapi()"
    )
    assert not [n for n in loaded if n.split(".")[0] in ("aetcd", "grpc")]
