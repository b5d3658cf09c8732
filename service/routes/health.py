"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, object]:
    """Report that the process is up, with job counts; it responds while jobs run."""
    jobs = request.app.state.jobs
    return {"status": "ok", "jobs_active": jobs.active, "jobs_unfinished": jobs.unfinished}


@router.get("/readyz", responses={503: {"description": "The model is still loading."}})
async def readyz(request: Request) -> JSONResponse:
    """Report 200 once the model is loaded, 503 before."""
    backend = request.app.state.backend
    if backend.ready:
        return JSONResponse({"status": "ready", "backend": backend.name})
    return JSONResponse({"status": "loading", "backend": backend.name}, status_code=503,
                        headers={"Retry-After": "5"})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> str:
    """Expose job counts in the Prometheus text format."""
    jobs = request.app.state.jobs
    by_status: dict[str, int] = {}
    for job in jobs.jobs.values():
        by_status[job.status] = by_status.get(job.status, 0) + 1
    lines = [
        "# HELP streamscribe_jobs Jobs known to this process, by status.",
        "# TYPE streamscribe_jobs gauge",
    ]
    for status in ("queued", "running", "completed", "failed", "cancelled"):
        lines.append(f'streamscribe_jobs{{status="{status}"}} {by_status.get(status, 0)}')
    lines += [
        "# HELP streamscribe_backend_ready 1 once the model is loaded.",
        "# TYPE streamscribe_backend_ready gauge",
        f"streamscribe_backend_ready {int(request.app.state.backend.ready)}",
    ]
    return "\n".join(lines) + "\n"
