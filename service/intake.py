"""Turn an HTTP upload into a started job: store, probe, validate options, admit."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import replace

from starlette.requests import Request

from gpu_workers.segments import TranscribeOptions
from service.errors import ServiceError
from service.jobs import Job, JobManager, new_job_id
from service.media import measure_duration, probe
from service.settings import model_label
from service.upload import Upload, check_content_length, receive_upload

logger = logging.getLogger(__name__)

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def form_bool(upload: Upload, name: str, default: bool = False) -> bool:
    """Read a boolean form field sent as "true"/"false" (or 1/0, yes/no, on/off)."""
    value = upload.value(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ServiceError(f"form field {name!r} must be true or false, not {value!r}",
                       code="invalid_field")


def form_float(upload: Upload, name: str, low: float, high: float) -> float | None:
    value = upload.value(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not low <= number <= high:
        raise ServiceError(f"form field {name!r} must be a number from {low:g} to {high:g}, "
                           f"not {value!r}", code="invalid_field")
    return number


def form_int(upload: Upload, name: str, low: int, high: int) -> int | None:
    value = upload.value(name)
    if value is None or value.strip() == "":
        return None
    # ASCII digits only: str.isdigit() also accepts "²", which int() rejects.
    text = value.strip()
    number = int(text) if re.fullmatch(r"[+-]?[0-9]{1,18}", text) else None
    if number is None or not low <= number <= high:
        raise ServiceError(f"form field {name!r} must be a whole number from {low} to {high}, "
                           f"not {value!r}", code="invalid_field")
    return number


def form_language(upload: Upload) -> str | None:
    value = (upload.value("language") or "").strip().lower()
    if not value or value == "auto":
        return None
    if not re.fullmatch(r"[a-z]{2,3}(-[a-z0-9]{1,8})*", value):
        raise ServiceError(f"form field 'language' must be a language code such as 'en', "
                           f"not {value!r}", code="invalid_field")
    return value.split("-")[0]


def check_model(manager: JobManager, upload: Upload) -> None:
    """Accept the configured model's name, OpenAI's "whisper-1" or none; reject others.

    One model is loaded per service, so a request for another one is rejected rather
    than silently served by a different model.
    """
    requested = (upload.value("model") or "").strip()
    accepted = {"", "whisper-1", "default", manager.settings.model}
    if requested in accepted or requested == model_label(manager.settings.model):
        return
    raise ServiceError(
        f"model {requested!r} is not served here; this server runs "
        f"{model_label(manager.settings.model)!r} (send 'whisper-1', that name, or no model)",
        code="model_not_found",
        status_code=400,
    )


def wants_words(upload: Upload) -> bool:
    """Return True when the form requests word times, natively or in OpenAI's list field."""
    granularities = [
        value.strip().lower()
        for name in ("timestamp_granularities[]", "timestamp_granularities")
        for value in upload.fields.get(name, [])
    ]
    unknown = set(granularities) - {"word", "segment"}
    if unknown:
        raise ServiceError(
            f"timestamp_granularities[] must be 'word' or 'segment', not {sorted(unknown)[0]!r}",
            code="invalid_field",
        )
    return form_bool(upload, "word_timestamps") or "word" in granularities


async def accept_job(request: Request, *,
                     validate: Callable[[Upload], None] | None = None) -> tuple[Job, Upload]:
    """Store and probe the upload in `request`, then start its job.

    `validate` checks endpoint-specific form fields before the file is probed.
    Raises `ServiceError` (4xx or 503) before anything is streamed; on any failure
    the job's folder is removed.
    """
    manager: JobManager = request.app.state.jobs
    settings = manager.settings
    check_content_length(request, settings.max_upload_bytes)
    manager.check_capacity()
    job_id = new_job_id()
    folder = settings.temp_root / f"job-{job_id}"
    try:
        folder.mkdir(parents=True)
        upload = await receive_upload(request, folder, max_bytes=settings.max_upload_bytes)
        check_model(manager, upload)
        if validate is not None:
            validate(upload)
        options = TranscribeOptions(
            language=form_language(upload),
            prompt=(upload.value("prompt") or None),
            temperature=form_float(upload, "temperature", 0.0, 1.0),
            beam_size=settings.beam_size,
            word_timestamps=wants_words(upload),
        )
        segment_seconds = form_float(upload, "segment_seconds", 5.0, settings.max_segment_seconds)
        track = form_int(upload, "audio_track", 0, 63)
        media = await probe(upload.path, upload.filename, timeout=settings.probe_timeout_seconds,
                            ffprobe=settings.ffprobe)
        stream = media.pick_audio(track)
        if media.duration is None:
            # Without a duration in the header the limit below could not apply, so the
            # stream's packets are counted instead.
            measured = await measure_duration(upload.path, stream.index,
                                              timeout=settings.probe_timeout_seconds,
                                              ffmpeg=settings.ffmpeg)
            if measured is not None:
                media = replace(media, duration=measured)
        if media.duration is not None and media.duration > settings.max_duration_seconds:
            raise ServiceError(
                f"{upload.filename!r} lasts {media.duration:.0f} s, over the limit of "
                f"{settings.max_duration_seconds:.0f} s; send a shorter file",
                code="duration_too_long",
                status_code=413,
            )
        manager.check_capacity()
        job = Job(
            id=job_id,
            filename=upload.filename,
            folder=folder,
            input_path=upload.path,
            media=media,
            stream=stream,
            options=options,
        )
        if segment_seconds is not None:
            job.split = replace(manager.split, segment_seconds=segment_seconds)
        await manager.start(job)
    except BaseException as error:
        await asyncio.to_thread(shutil.rmtree, folder, True)
        if isinstance(error, ServiceError):
            logger.info("Rejected upload for job %s: %s", job_id, error.message)
        raise
    return job, upload
