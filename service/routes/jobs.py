"""Job status and event replay."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from urllib.parse import quote

from service import subtitles

from service.errors import ServiceError
from service.jobs import Job
from service.streaming import follow_job, parse_last_event_id

router = APIRouter(tags=["jobs"])

JOB_ID = re.compile(r"[0-9a-f]{32}")


async def find_job(request: Request, job_id: Annotated[str, Path(max_length=64)]) -> Job:
    """Return the job `job_id` names, or raise 404."""
    job = await request.app.state.jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise ServiceError(f"job {job_id!r} was not found; it may have expired",
                           code="job_not_found", status_code=404)
    return job


@router.get("/v1/jobs/{job_id}", responses={404: {"description": "No such job."}})
async def job_status(request: Request, job: Annotated[Job, Depends(find_job)]) -> dict[str, object]:
    """Return a job's status and counts."""
    progress = job.progress()
    return {
        "id": job.id,
        "status": job.status,
        "filename": job.filename,
        "duration": job.duration,
        "created_at": job.created,
        "finished_at": job.finished_at,
        "segments_done": len(job.results),
        "segments_failed": sorted(job.failed),
        "segments_total": job.segments_total,
        "seconds_done": progress.seconds_done,
        "percent": progress.percent,
        "events": len(job.events),
        "listeners": job.listeners,
    }


@router.post("/v1/jobs/{job_id}/cancel", responses={404: {"description": "No such job."}})
async def cancel_job(request: Request, job: Annotated[Job, Depends(find_job)]) -> dict[str, object]:
    """Cancel a running job; a finished job is left as it is."""
    await request.app.state.jobs.cancel(job)
    return {"id": job.id, "status": job.status}


@router.get("/v1/jobs/{job_id}/events", response_class=EventSourceResponse,
            responses={404: {"description": "No such job."}})
async def job_events(
    request: Request,
    job: Annotated[Job, Depends(find_job)],
    last_event_id: Annotated[str | None, Header()] = None,
    after: int | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """Replay a job's events from the start, or after `Last-Event-ID`, then follow it live."""
    start = after if after is not None else parse_last_event_id(last_event_id)
    async for event in follow_job(request.app.state.jobs, job, start, request=request):
        yield event


TRANSCRIPT_TYPES = {
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "txt": "text/plain; charset=utf-8",
    "json": "application/json",
}


@router.get("/v1/jobs/{job_id}/transcript.{fmt}",
            responses={404: {"description": "No such job or format."},
                       409: {"description": "The job has not finished yet."}})
async def job_transcript(
    request: Request,
    job: Annotated[Job, Depends(find_job)],
    fmt: Annotated[str, Path(max_length=8)],
) -> Response:
    """Serve a finished job's transcript as SRT, WebVTT, plain text or JSON."""
    if fmt not in TRANSCRIPT_TYPES:
        raise ServiceError(f"unknown transcript format {fmt!r}; use srt, vtt, txt or json",
                           code="format_not_found", status_code=404)
    if not job.finished:
        raise ServiceError(f"job {job.id} is still {job.status}; download it after `done`",
                           code="job_not_finished", status_code=409)
    results = list(job.results.values())
    if fmt == "srt":
        body = subtitles.to_srt(subtitles.ordered_cues(results))
    elif fmt == "vtt":
        body = subtitles.to_vtt(subtitles.ordered_cues(results))
    elif fmt == "txt":
        body = subtitles.to_text(results) + "\n"
    else:
        languages = [result.language for result in results if result.language]
        body = subtitles.to_json(job.id, job.duration, languages[0] if languages else None, results)
    stem = job.filename.rsplit(".", 1)[0] if "." in job.filename else job.filename
    return Response(body, media_type=TRANSCRIPT_TYPES[fmt], headers={
        "Content-Disposition": f"attachment; filename=\"{_ascii_stem(stem)}.{fmt}\"; "
                               f"filename*=UTF-8''{quote(stem, safe='')}.{fmt}",
    })


def _ascii_stem(stem: str) -> str:
    # The plain filename parameter must be ASCII without quotes; filename* carries the
    # exact name for clients that read RFC 6266.
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in " -_") else "_" for ch in stem)
    return safe.strip() or "transcript"
