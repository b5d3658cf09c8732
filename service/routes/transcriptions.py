"""The native streaming endpoint: upload a file, read its transcript as Server-Sent Events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from service.intake import accept_job
from service.jobs import Job
from service.streaming import follow_job

router = APIRouter(tags=["transcription"])

UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "The video or audio file."},
                        "language": {"type": "string",
                                     "description": "Language code such as 'en'; detected when absent."},
                        "model": {"type": "string",
                                  "description": "Must name the served model, 'whisper-1', or be absent."},
                        "prompt": {"type": "string",
                                   "description": "Text that steers spelling and style."},
                        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
                        "word_timestamps": {"type": "boolean",
                                            "description": "Add per-word times to each cue."},
                        "segment_seconds": {"type": "number", "minimum": 5,
                                            "description": "Target segment length in seconds."},
                        "audio_track": {"type": "integer", "minimum": 0,
                                        "description": "Audio track to use, counted from 0 "
                                                       "among audio streams; default: the "
                                                       "track marked default, else the first."},
                    },
                }
            }
        },
    }
}

ERRORS = {
    400: {"description": "The form is invalid or the upload is empty."},
    413: {"description": "The upload or its duration is over the limit."},
    415: {"description": "The upload is not a media file."},
    422: {"description": "The media has no audio stream or is incomplete."},
    503: {"description": "The server is at capacity; see Retry-After."},
}


async def _accept(request: Request) -> Job:
    job, _ = await accept_job(request)
    return job


@router.post(
    "/v1/transcriptions",
    response_class=EventSourceResponse,
    openapi_extra=UPLOAD_FORM,
    responses=ERRORS,
)
async def transcribe(request: Request, job: Annotated[Job, Depends(_accept)]) -> AsyncIterator[ServerSentEvent]:
    """Stream `job`, `segment`, `progress`, `error` and `done` events for an uploaded file."""
    manager = request.app.state.jobs
    break_after = manager.settings.test_break_stream_after
    async for event in follow_job(manager, job, request=request, break_after=break_after):
        yield event
