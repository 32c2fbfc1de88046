"""Interactive API docs that work offline, for every lmfleet process (API server, controller, worker).

FastAPI's own `/docs` and `/redoc` pages load Swagger UI and ReDoc from a CDN, so they are blank on a machine
without internet access. `fastapi_app(...)` builds each process's FastAPI app with those pages served from the
assets the `fastapi-offline` package ships (Swagger UI 5, ReDoc 2), as FastAPI's "self-hosting JavaScript and CSS
for docs" recipe does; every asset is a plain route (`ASSET_PATHS`), public like the pages themselves
(lmfleet.api.access). Nothing is fetched from the internet by the pages (ReDoc without Google Fonts).

Does not own: the OpenAPI document (FastAPI's, trimmed by each app), who may read it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DOCS, REDOC, OAUTH2_REDIRECT = "/docs", "/redoc", "/docs/oauth2-redirect"
# URL path -> (file in fastapi_offline/static, media type)
_ASSETS = {
    "/docs/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "/docs/swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "/docs/favicon.png": ("favicon.png", "image/png"),
    "/redoc/redoc.standalone.js": ("redoc.standalone.js", "text/javascript; charset=utf-8"),
}
ASSET_PATHS = frozenset(_ASSETS)
CACHE = {"Cache-Control": "public, max-age=86400"}


def fastapi_app(**kwargs: Any) -> FastAPI:
    """`FastAPI(**kwargs)` with `/docs` (Swagger UI), `/docs/oauth2-redirect` and `/redoc` served offline."""
    app = FastAPI(**kwargs, docs_url=None, redoc_url=None)
    static = resources.files("fastapi_offline") / "static"

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", ""))

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(
            openapi_url=base + str(app.openapi_url),
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=base + OAUTH2_REDIRECT,
            swagger_js_url=base + "/docs/swagger-ui-bundle.js",
            swagger_css_url=base + "/docs/swagger-ui.css",
            swagger_favicon_url=base + "/docs/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        page = get_redoc_html(
            openapi_url=base + str(app.openapi_url),
            title=f"{app.title} - ReDoc",
            redoc_js_url=base + "/redoc/redoc.standalone.js",
            redoc_favicon_url=base + "/docs/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = "img-src 'self' data:"  # ReDoc's own logo is on a CDN
        return page

    for path, (name, media_type) in _ASSETS.items():
        endpoint = packaged_file(static / name, media_type, CACHE)
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
    return app


def packaged_file(file: Traversable, media_type: str, headers: Mapping[str, str]) -> Callable[[], Awaitable[Response]]:
    """A GET endpoint answering with a file shipped in a package, read when asked for."""

    async def serve() -> Response:
        return Response(file.read_bytes(), media_type=media_type, headers=dict(headers))

    return serve
