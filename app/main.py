"""Bone-R's FastAPI service: `POST /detect`, `GET /health`, and the docs viewer at `/`.

    make serve                     # or: python -m uvicorn app.main:app --host 127.0.0.1 --port 8000
    BONER_WEIGHTS=runs/x/weights/best.pt make serve

Settings come from `BONER_*` environment variables (see `Settings`). The model
loads in the lifespan, never at import; when it cannot load (no bundled model yet)
the service still starts, `/health` says "unavailable" and why, and `/detect`
answers 503 with the same reason. Inference runs in a small thread pool behind a
bounded admission counter: past it, requests get 503 with Retry-After instead of
piling up in memory. A request is admitted only once its body has arrived (within
`upload_timeout_s`, against a budget of buffered upload bytes), so slow clients
starve no one; each image's decode is refused (413) when its estimated memory is
over `max_image_memory_mb`; and the work stops at its next stage when the client
hangs up or `analysis_timeout_s` passes.

The app is assembled here (`create_app`); `app.service` holds the settings, the predictor pool and the analysis
of one upload, `app.routes` the routes and error handlers, `app.schemas` the response models and the /detect
answer built from the Prediction. It imports `inference`, `models` and `bone_r` only.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match, Mount
from starlette.types import Scope

import inference
from app import places
from app.routes import add_routes, install_error_handlers
from app.service import ServiceState, Settings, load_predictors, log, names_not_paths, return_freed_buffers_to_the_os
from bone_r import DISCLAIMER

# --------------------------------------------------------------------------- the model pool


def create_app(settings: Settings | None = None, predictor: inference.Predictor | None = None) -> FastAPI:
    """The service. `predictor` injects a ready model (tests); otherwise `settings` say what to load."""
    settings = settings or Settings()
    state = ServiceState(settings=settings, capacity=settings.max_concurrency + settings.queue_limit)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        places.install_log_redaction()
        return_freed_buffers_to_the_os()
        state.executor = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="boner-infer")
        try:
            await asyncio.get_running_loop().run_in_executor(state.executor, load_predictors, settings, state, predictor)
            log.info("model ready: %s (%s)", state.info.name if state.info else "?", state.backend)
        except Exception as err:  # noqa: BLE001 - any load failure leaves a running, honest service
            state.predictors = None
            hint = " (for the service: set BONER_WEIGHTS=PATH)" if isinstance(err, FileNotFoundError) else ""
            log.error("the model could not be loaded: %s%s", err, hint)  # the operator's log keeps the full paths
            state.load_error = names_not_paths(f"the model could not be loaded: {err}{hint}")
        try:
            yield
        finally:
            state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="Bone-R",
        version="0.1.0",
        summary="Find and localize fractures on plain radiographs (research tool, not a diagnosis).",
        description=DISCLAIMER,
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.service = state
    if settings.origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    install_error_handlers(app)
    add_routes(app, state)
    docs_dir = Path(settings.docs_dir)
    if (docs_dir / "index.html").is_file():
        # Mounted last, and blind to the API's paths: a wrong method on /detect gets the route's 405 (Allow: POST),
        # not the file server's (Allow: GET, HEAD).
        api_paths = {route.path for route in app.routes if hasattr(route, "path")}
        app.router.routes.append(_DocsMount("/", app=StaticFiles(directory=docs_dir, html=True), name="docs", api_paths=api_paths))
    else:
        @app.get("/", include_in_schema=False)
        async def no_viewer() -> JSONResponse:
            return JSONResponse({"message": f"no viewer here ({docs_dir.name}/index.html is missing); the API is at "
                                            "/detect and /health",
                                 "openapi": "/openapi.json"})
    return app


class _DocsMount(Mount):
    """The static viewer at `/`, which never claims a path that belongs to the API."""

    def __init__(self, *args: Any, api_paths: set[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.api_paths = api_paths

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get("path") in self.api_paths:
            return Match.NONE, {}
        return super().matches(scope)


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- analysis (worker thread)


# --------------------------------------------------------------------------- upload


# --------------------------------------------------------------------------- routes


app = create_app()
