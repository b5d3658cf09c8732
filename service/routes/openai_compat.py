"""`POST /v1/audio/transcriptions` in the shape of OpenAI's transcription API.

The official `openai` SDK works against it unchanged. Without `stream`, the request
waits for the whole job and returns it in `response_format`; with `stream=true` it sends
`transcript.text.delta` events in timeline order (a segment that finishes early waits
for the ones before it) and one `transcript.text.done` whose text equals the
non-streamed answer. A failure after the stream has started is sent as a JSON object
with a top-level `error` key, which the SDK raises as `APIError`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from gpu_workers.segments import SegmentResult
from service import subtitles
from service.errors import ServiceError
from service.intake import accept_job, form_bool
from service.jobs import Job, JobManager
from service.routes.transcriptions import ERRORS
from service.upload import Upload

router = APIRouter(tags=["openai"])

KEEPALIVE_SECONDS = 15.0
"""Idle time before a keep-alive comment, the interval FastAPI uses on its own SSE routes."""

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")

# Whisper reports languages by code; OpenAI's verbose_json names them in full.
LANGUAGE_NAMES = {
    "en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
    "pt": "portuguese", "nl": "dutch", "pl": "polish", "ru": "russian", "uk": "ukrainian",
    "tr": "turkish", "ar": "arabic", "zh": "chinese", "ja": "japanese", "ko": "korean",
    "hi": "hindi", "sv": "swedish", "da": "danish", "no": "norwegian", "fi": "finnish",
    "cs": "czech", "el": "greek", "he": "hebrew", "hu": "hungarian", "ro": "romanian",
    "id": "indonesian", "vi": "vietnamese", "th": "thai", "ca": "catalan",
}

OPENAI_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "model": {"type": "string", "description": "'whisper-1' or the served model."},
                        "language": {"type": "string"},
                        "prompt": {"type": "string"},
                        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)},
                        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
                        "timestamp_granularities[]": {
                            "type": "array", "items": {"type": "string", "enum": ["word", "segment"]},
                        },
                        "stream": {"type": "boolean"},
                    },
                }
            }
        },
    }
}


def _response_format(upload: Upload) -> str:
    value = (upload.value("response_format") or "json").strip().lower()
    if value not in RESPONSE_FORMATS:
        raise ServiceError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, "
                           f"not {value!r}", code="invalid_field")
    return value


def _validate(upload: Upload) -> None:
    _response_format(upload)
    form_bool(upload, "stream")


@router.post("/v1/audio/transcriptions", openapi_extra=OPENAI_FORM, responses=ERRORS)
async def create_transcription(request: Request) -> Response:
    """Transcribe a file in OpenAI's request and response shapes."""
    job, upload = await accept_job(request, validate=_validate)
    manager: JobManager = request.app.state.jobs
    if form_bool(upload, "stream"):
        return EventSourceResponse(
            _stream(manager, job),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    done = await _wait_for_done(manager, job)
    if done.get("status") != "completed":
        raise _failure_error(job, done.get("status", "failed"))
    return render(job, _response_format(upload), with_words="word" in _granularities(upload))


def _granularities(upload: Upload) -> list[str]:
    return [value.strip().lower() for value in upload.fields.get("timestamp_granularities[]", [])
            + upload.fields.get("timestamp_granularities", [])]


async def _wait_for_done(manager: JobManager, job: Job) -> dict:
    # Waiting counts as listening, so a client that hangs up starts the grace period.
    manager.attach(job)
    try:
        async for stored in job.follow():
            if stored.event == "done":
                return stored.data
    finally:
        manager.detach(job)
    return {}


MEDIA_ERROR_CODES = frozenset({"decode_failed", "no_audio_decoded"})
"""`error` event codes that blame the uploaded file rather than the server."""


def _failure_error(job: Job, status: str) -> ServiceError:
    """Build the error for a job that did not complete.

    It is a 422 when every error event blames the file's audio, and a 500 otherwise.
    """
    errors = [event.data for event in job.events if event.event == "error"]
    message = "; ".join(error["message"] for error in errors) or f"transcription {status}"
    if errors and all(error.get("code") in MEDIA_ERROR_CODES for error in errors):
        return ServiceError(message, code=errors[0]["code"], status_code=422)
    return ServiceError(message, code="transcription_failed", status_code=500)


def render(job: Job, response_format: str, *, with_words: bool) -> Response:
    """Render a finished job's result in one of OpenAI's response formats."""
    results = sorted(job.results.values(), key=lambda result: result.start)
    text = job.text()
    if response_format == "text":
        return PlainTextResponse(text + "\n")
    if response_format == "srt":
        return PlainTextResponse(subtitles.to_srt(subtitles.ordered_cues(results)))
    if response_format == "vtt":
        return PlainTextResponse(subtitles.to_vtt(subtitles.ordered_cues(results)),
                                 media_type="text/vtt")
    if response_format == "json":
        return JSONResponse({"text": text, "usage": _usage(job)})
    return JSONResponse(verbose_json(job, results, with_words=with_words))


def _usage(job: Job) -> dict:
    return {"type": "duration", "seconds": int(-(-(job.duration or 0) // 1))}


def verbose_json(job: Job, results: list[SegmentResult], *, with_words: bool) -> dict:
    languages = [result.language for result in results if result.language]
    language = languages[0] if languages else "en"
    cues = subtitles.ordered_cues(results)
    body: dict = {
        "task": "transcribe",
        "language": LANGUAGE_NAMES.get(language, language),
        "duration": job.duration or 0.0,
        "text": job.text(),
        "segments": [
            {
                "id": number,
                "seek": 0,
                "start": cue.start,
                "end": cue.end,
                "text": cue.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": cue.avg_logprob,
                "compression_ratio": cue.compression_ratio,
                "no_speech_prob": cue.no_speech_prob,
            }
            for number, cue in enumerate(cues)
        ],
        "usage": _usage(job),
    }
    if with_words:
        body["words"] = [
            {"word": word.word.strip(), "start": word.start, "end": word.end}
            for cue in cues for word in cue.words
        ]
    return body


def _sse(payload: dict) -> bytes:
    return format_sse_event(event=payload.get("type", "error"), data_str=json.dumps(payload))


async def _stream(manager: JobManager, job: Job) -> AsyncIterator[bytes]:
    """Yield OpenAI stream events for `job`, with keep-alive comments while idle."""
    manager.attach(job)
    events = job.follow().__aiter__()
    texts: dict[int, str] = {}
    next_index = 0
    sent_any = False
    waiting: asyncio.Future | None = None
    try:
        while True:
            # The pending read survives a keep-alive timeout; cancelling it instead
            # would close the event log generator.
            waiting = waiting or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({waiting}, timeout=KEEPALIVE_SECONDS)
            if not done:
                yield KEEPALIVE_COMMENT
                continue
            read, waiting = waiting, None
            try:
                stored = read.result()
            except StopAsyncIteration:
                return
            if stored.event == "segment":
                texts[stored.data["index"]] = stored.data["text"]
            elif stored.event == "error" and stored.data.get("segment") is not None:
                texts[int(stored.data["segment"])] = ""
            elif stored.event == "done":
                if stored.data["status"] != "completed":
                    yield _sse(_failure_error(job, stored.data["status"]).to_json())
                    return
                for index in sorted(texts):
                    if index >= next_index and texts[index]:
                        yield _sse(_delta(texts[index], sent_any))
                        sent_any = True
                yield _sse({"type": "transcript.text.done", "text": stored.data["text"],
                            "usage": _usage(job)})
                return
            while next_index in texts:
                text = texts[next_index]
                next_index += 1
                if text:
                    yield _sse(_delta(text, sent_any))
                    sent_any = True
    finally:
        if waiting is not None:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        await events.aclose()
        manager.detach(job)


def _delta(text: str, after_text: bool) -> dict:
    # Deltas join with single spaces, exactly as the `done` text does.
    return {"type": "transcript.text.delta", "delta": (" " + text) if after_text else text}
