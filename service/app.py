"""The FastAPI application: wiring of settings, backend, jobs and routes."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.backends import TranscriptionBackend, create_backend
from service.errors import ServiceError
from service.jobs import JobManager
from service.settings import Settings
from service.store import JobStore, create_store

HOUSEKEEPING_SECONDS = 60.0
"""How often finished jobs are checked against the memory and retention limits."""

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, backend: TranscriptionBackend | None = None,
               store: JobStore | None = None) -> FastAPI:
    """Build the service; `backend` and `store` replace the ones `settings` names."""
    settings = settings or Settings.from_env()
    backend = backend or create_backend(settings)
    store = store or create_store(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.temp_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_job_folders(settings.temp_root)
        manager: JobManager = app.state.jobs
        await manager.recover()
        # The model loads in the background, so /healthz responds at once and /readyz
        # returns 503 until the model is loaded. Jobs submitted meanwhile wait for it.
        loading = asyncio.create_task(_start_backend(backend))
        housekeeping = asyncio.create_task(_expire_jobs(manager))
        try:
            yield
        finally:
            await manager.close()
            for task in (loading, housekeeping):
                task.cancel()
            await asyncio.gather(loading, housekeeping, return_exceptions=True)
            await backend.close()
            await store.close()

    app = FastAPI(
        title="Streamscribe",
        version=__version__,
        summary="Upload a video or audio file and stream its transcript as Server-Sent Events.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.backend = backend
    app.state.jobs = JobManager(settings, backend, store)

    @app.exception_handler(ServiceError)
    async def service_error_handler(request: Request, error: ServiceError) -> JSONResponse:
        headers = dict(error.headers)
        if request.method == "POST":
            # A rejected upload's body may be mostly unsent (413, 401, 503, 507). Unless
            # the connection closes, uvicorn reads and discards all of it to keep the
            # connection alive, and the client sees the error only after sending it all.
            headers.setdefault("Connection", "close")
        return JSONResponse(error.to_json(), status_code=error.status_code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error_handler(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        wrapped = ServiceError(str(error.detail), code=code, status_code=error.status_code)
        return JSONResponse(wrapped.to_json(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error_handler(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
        )
        wrapped = ServiceError(f"invalid request: {problems}", code="invalid_request")
        return JSONResponse(wrapped.to_json(), status_code=422)

    from service.routes import health, jobs, openai_compat, transcriptions

    protected = [Depends(require_api_key)] if settings.api_key else []
    app.include_router(health.router)
    app.include_router(transcriptions.router, dependencies=protected)
    app.include_router(openai_compat.router, dependencies=protected)
    app.include_router(jobs.router, dependencies=protected)
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            allow_credentials=False,
        )
    _mount_web(app)
    return app


async def require_api_key(request: Request) -> None:
    """Reject a request whose bearer token is not the configured API key."""
    expected = request.app.state.settings.api_key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise ServiceError(
            "missing or invalid API key; send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _start_backend(backend: TranscriptionBackend) -> None:
    try:
        await backend.start()
    except Exception:
        logger.exception("The %s backend failed to start; /readyz stays 503", backend.name)
        raise
    logger.info("The %s backend is ready", backend.name)


async def _expire_jobs(manager: JobManager) -> None:
    while True:
        await asyncio.sleep(min(HOUSEKEEPING_SECONDS, manager.settings.retention_seconds / 2))
        try:
            await manager.expire()
        except Exception:
            logger.exception("Expiring old jobs failed; retrying in %g s", HOUSEKEEPING_SECONDS)


def _remove_stale_job_folders(root: Path) -> None:
    # Folders left by a process that was killed mid-job contain uploads that no job
    # can resume, so they are deleted at start-up.
    for folder in root.glob("job-*"):
        shutil.rmtree(folder, ignore_errors=True)


def _mount_web(app: FastAPI) -> None:
    web = Path(__file__).resolve().parent.parent / "web"
    if (web / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=web, html=True), name="web")
