"""The web page the API server serves: a chat playground and a live fleet dashboard, plain HTML/CSS/JS shipped
in this package (`static/`, package data), nothing fetched from elsewhere, no build step.

Routes (`install`)
    GET /               a redirect to the page (POST / stays FastChat's chat route)
    GET /ui             the page; GET /ui/app.js, /ui/markdown.js, /ui/style.css its files (public: the page
                        asks for an API key itself and sends it as a Bearer token from sessionStorage)
    GET /v1/fleet       the dashboard's data (lmfleet.api.fleet.FleetView); needs a key when keys are on

The page talks to the OpenAI routes like any client (`/v1/models`, streaming `/v1/chat/completions`; its Stop
button aborts the fetch, and the server cancels the generation on the disconnect) and polls `/v1/fleet` every
second. Its Content-Security-Policy allows nothing but this origin.

Does not own: the figures (lmfleet.api.fleet), which paths are public (lmfleet.api.access.UI_PATHS).
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePath

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse

from lmfleet.api.access import UI_PATHS
from lmfleet.api.fleet import FleetStats, FleetView, snapshot
from lmfleet.docs import packaged_file

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install(app: FastAPI, stats: FleetStats) -> None:
    """Add the page, its files and `/v1/fleet` to the API server's app."""
    static = resources.files(__name__) / "static"

    @app.get("/", include_in_schema=False)
    async def home(request: Request) -> RedirectResponse:
        return RedirectResponse(request.scope.get("root_path", "") + "/ui", status_code=303)

    for path in sorted(UI_PATHS):
        name = path.removeprefix("/ui").lstrip("/") or "index.html"
        endpoint = packaged_file(static / name, _TYPES[PurePath(name).suffix], HEADERS)
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)

    @app.get("/v1/fleet", response_model=FleetView, tags=["fleet"], summary="Workers, load and request figures")
    async def fleet(request: Request) -> FleetView:
        """Every worker of this server's view with its state and load, the tokens per second this server relayed
        from it, and this server's requests per second and latency (the web page's dashboard polls it)."""
        return snapshot(request.state.router, stats)
