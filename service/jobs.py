"""Jobs: one uploaded file's journey from split to `done`, kept as a log of events.

A job runs as its own asyncio task, apart from any HTTP request. Clients read its
event log through `Job.follow`, from the start or from an event id, so a dropped
connection can resume without losing or repeating an event. When the last reader
leaves before the job ends, the job waits `grace_seconds` for a new one, then is
cancelled: its outstanding segments are dropped, ffmpeg is killed and its files go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from gpu_workers.segments import (
    SAMPLE_RATE,
    Cue,
    SegmentInput,
    SegmentResult,
    TranscribeOptions,
    Word,
)
from service.backends import TranscriptionBackend
from service.decoder import AudioDecoder, DecodeSummary
from service.errors import DecodeError, ServiceError
from service.settings import model_label
from service.events import (
    DoneEvent,
    ErrorEvent,
    JobEvent,
    ProgressEvent,
    SegmentEvent,
    StoredEvent,
)
from service.media import AudioStream, MediaInfo
from service.settings import Settings
from service.splitter import SplitConfig
from service.store import JobStore, StoredJob

logger = logging.getLogger(__name__)


def new_job_id() -> str:
    """Return an unguessable job id: 128 random bits, hex-encoded."""
    return secrets.token_hex(16)


@dataclass
class Job:
    id: str
    filename: str
    folder: Path | None
    input_path: Path | None
    media: MediaInfo
    stream: AudioStream
    options: TranscribeOptions
    split: SplitConfig | None = None
    created: float = field(default_factory=time.time)
    status: str = "queued"
    events: list[StoredEvent] = field(default_factory=list)
    results: dict[int, SegmentResult] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    segments_total: int | None = None
    seconds_done: float = 0.0
    finished_at: float | None = None
    task: asyncio.Task | None = None
    store: JobStore | None = None
    listeners: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _grace_timer: asyncio.TimerHandle | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def duration(self) -> float | None:
        return self.media.duration

    def text(self) -> str:
        """Return the transcript so far, in timeline order whatever order segments finished in."""
        ordered = sorted(self.results.values(), key=lambda result: result.start)
        return " ".join(result.text for result in ordered if result.text)

    async def append(self, event: str, payload) -> StoredEvent:
        stored = StoredEvent(id=len(self.events), event=event, data=payload.model_dump())
        async with self._changed:
            self.events.append(stored)
            self._changed.notify_all()
        if self.store is not None:
            await self.store.add_event(self.id, stored)
        return stored

    async def set_status(self, status: str) -> None:
        self.status = status
        if status in ("completed", "failed", "cancelled"):
            self.finished_at = self.finished_at or time.time()
        if self.store is not None:
            await self.store.set_status(self.id, status, self.finished_at)

    async def follow(self, after: int = -1) -> AsyncIterator[StoredEvent]:
        """Yield every event with an id above `after`, then new ones until `done`.

        A negative `after` replays from the start. An `after` at or past the last id
        of a finished job yields nothing and returns at once.
        """
        position = max(after + 1, 0)
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: len(self.events) > position or self._log_complete()
                )
                batch = self.events[position:]
            for stored in batch:
                position += 1
                yield stored
                if stored.event == "done":
                    return
            if not batch:
                return

    def _log_complete(self) -> bool:
        # A live job's log is complete once it ends with `done`. Only a job read back
        # from the store (it has no task) can be finished with no `done` in its log.
        if self.events and self.events[-1].event == "done":
            return True
        return self.finished and self.task is None

    def progress(self) -> ProgressEvent:
        duration = self.duration
        percent = 100.0 if self.finished and self.status == "completed" else (
            min(99.9, 100.0 * self.seconds_done / duration) if duration else 0.0
        )
        return ProgressEvent(
            segments_done=len(self.results) + len(self.failed),
            segments_total=self.segments_total,
            seconds_done=round(self.seconds_done, 3),
            duration=duration,
            percent=round(percent, 1),
        )


class JobManager:
    """Admits, runs and keeps jobs; one per service."""

    def __init__(self, settings: Settings, backend: TranscriptionBackend,
                 store: JobStore | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self.jobs: dict[str, Job] = {}
        self._slots = asyncio.Semaphore(settings.max_active_jobs)
        self.active = 0
        self.split = SplitConfig(
            first_segment_seconds=settings.first_segment_seconds,
            segment_seconds=settings.segment_seconds,
            max_segment_seconds=settings.max_segment_seconds,
            min_pause_seconds=settings.min_pause_seconds,
        )

    @property
    def unfinished(self) -> int:
        return sum(1 for job in self.jobs.values() if not job.finished)

    def check_capacity(self) -> None:
        """Raise 503 with `Retry-After` when active plus queued jobs are at the limit."""
        limit = self.settings.max_active_jobs + self.settings.max_queued_jobs
        if self.unfinished >= limit:
            raise ServiceError(
                f"the server is busy with {self.unfinished} jobs; retry in a few seconds",
                code="server_busy",
                status_code=503,
                headers={"Retry-After": "10"},
            )

    async def get(self, job_id: str) -> Job | None:
        """Return the job with this id, from memory or else from the store."""
        job = self.jobs.get(job_id)
        if job is None and self.store is not None:
            stored = await self.store.load(job_id)
            if stored is not None:
                job = restore_job(stored)
        return job

    async def start(self, job: Job) -> Job:
        """Register `job`, emit its `job` event and start running it."""
        self.jobs[job.id] = job
        if self.store is not None:
            job.store = self.store
            await self.store.add_job(job.id, job.filename, job.created)
        await job.append("job", JobEvent(
            job_id=job.id,
            filename=job.filename,
            duration=job.duration,
            format=job.media.format_name,
            audio_codec=job.stream.codec,
            audio_track=job.media.audio_streams.index(job.stream),
            audio_stream_index=job.stream.index,
            audio_language=job.stream.language,
            audio_channels=job.stream.channels,
            audio_tracks=len(job.media.audio_streams),
            planned_segments=self._estimate_segments(job.duration),
            model=model_label(self.settings.model),
        ))
        job.task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        # The grace period runs until the first reader attaches. So a job whose client
        # hangs up between the upload and the first event is still cancelled.
        self._start_grace(job)
        logger.info("Job %s started: %r, %.1f s of audio", job.id, job.filename, job.duration or -1)
        return job

    def _estimate_segments(self, duration: float | None) -> int | None:
        if not duration:
            return None
        rest = max(0.0, duration - self.split.first_segment_seconds)
        return 1 + int(-(-rest // self.split.segment_seconds))

    def attach(self, job: Job) -> None:
        """Count a reader of `job`'s events, cancelling any pending grace timer."""
        job.listeners += 1
        if job._grace_timer is not None:
            job._grace_timer.cancel()
            job._grace_timer = None

    def detach(self, job: Job) -> None:
        """Uncount a reader; with none left on an unfinished job, start the grace period."""
        job.listeners -= 1
        if job.listeners > 0 or job.finished:
            return
        self._start_grace(job)

    def _start_grace(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        job._grace_timer = loop.call_later(self.settings.grace_seconds, self._abandon, job)

    def _abandon(self, job: Job) -> None:
        job._grace_timer = None
        if job.listeners == 0 and not job.finished and job.task is not None:
            logger.info("Job %s has had no reader for %g s; cancelling it",
                        job.id, self.settings.grace_seconds)
            job.task.cancel()

    async def cancel(self, job: Job) -> None:
        """Cancel `job` now and wait until its workers and files are released."""
        if job.task is not None and not job.finished:
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)

    async def close(self) -> None:
        tasks = [job.task for job in self.jobs.values() if job.task and not job.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def recover(self) -> None:
        """End the jobs a previous process left unfinished: their uploads are gone."""
        if self.store is None:
            return
        for job_id in await self.store.unfinished():
            stored = await self.store.load(job_id)
            if stored is None:
                continue
            job = restore_job(stored)
            job.store = self.store
            await job.append("error", ErrorEvent(
                code="server_restarted",
                message="the server restarted before this job finished; upload the file again",
            ))
            await self._finish(job, "failed", 0.0, False, ["the server restarted during the job"])
            logger.info("Job %s marked failed: the server restarted during it", job_id)

    async def expire(self, now: float | None = None) -> None:
        """Drop finished jobs from memory after `memory_seconds` and from the store after
        `retention_seconds`."""
        now = time.time() if now is None else now
        for job_id, job in list(self.jobs.items()):
            if job.finished and job.finished_at is not None:
                if now - job.finished_at > min(self.settings.memory_seconds,
                                               self.settings.retention_seconds):
                    del self.jobs[job_id]
        if self.store is not None:
            removed = await self.store.delete_finished_before(now - self.settings.retention_seconds)
            if removed:
                logger.info("Deleted %d jobs past the retention period", len(removed))

    async def _run(self, job: Job) -> None:
        started = time.monotonic()
        notes: list[str] = []
        truncated = False
        status = "completed"
        try:
            async with self._slots:
                await job.set_status("running")
                self.active += 1
                try:
                    truncated = await self._transcribe(job)
                finally:
                    self.active -= 1
        except asyncio.CancelledError:
            status = "cancelled"
            logger.info("Job %s cancelled", job.id)
        except DecodeError as error:
            logger.warning("Job %s failed to decode: %s", job.id, error)
            await job.append("error", ErrorEvent(code=error.code, message=str(error)))
            status = "failed" if not job.results else "completed"
            notes.append(str(error))
        except Exception as error:  # noqa: BLE001 - any failure ends the job with an event
            logger.exception("Job %s failed", job.id)
            await job.append("error", ErrorEvent(code="internal_error",
                                                 message=f"transcription failed: {error}"))
            status = "failed"
        if truncated:
            notes.append("the file was cut short: the transcript covers the audio that decoded")
        if job.failed:
            notes.append("segments " + ", ".join(map(str, sorted(job.failed))) + " failed")
        await self._finish(job, status, time.monotonic() - started, truncated, notes)

    async def _finish(self, job: Job, status: str, elapsed: float, truncated: bool,
                      notes: list[str]) -> None:
        # The files go first, so a client that sees `done` or the final status never
        # finds the job's upload still on disk.
        if job.folder is not None:
            await asyncio.to_thread(shutil.rmtree, job.folder, True)
        if status == "completed":
            job.seconds_done = job.duration or job.seconds_done
        job.status = status
        job.finished_at = job.finished_at or time.time()
        await job.append("done", DoneEvent(
            job_id=job.id,
            status=status,
            text=job.text(),
            duration=job.duration,
            elapsed_seconds=round(elapsed, 3),
            segments=len(job.results),
            segments_failed=sorted(job.failed),
            truncated=truncated,
            notes=notes,
        ))
        await job.set_status(status)
        logger.info("Job %s %s in %.1f s: %d segments, %d failed", job.id, status, elapsed,
                    len(job.results), len(job.failed))

    async def _transcribe(self, job: Job) -> bool:
        """Split and transcribe `job`; return True when the file turned out cut short."""
        settings = self.settings
        decoder = AudioDecoder(
            job.input_path,
            stream_index=job.stream.index,
            channels=job.stream.channels,
            split=job.split or self.split,
            max_queued=max(2, settings.workers),
            total_timeout=settings.decode_timeout_seconds,
            stall_timeout=settings.decode_stall_seconds,
            stderr_path=job.folder / "ffmpeg.log",
            ffmpeg_binary=settings.ffmpeg,
        )
        timeline_offset = job.media.timeline_offset(job.stream)
        spans: dict[int, float] = {}
        summary: DecodeSummary | None = None

        async def segment_inputs() -> AsyncIterator[SegmentInput]:
            nonlocal summary
            count = 0
            async for item in decoder.pieces():
                if isinstance(item, DecodeSummary):
                    summary = item
                    job.segments_total = count
                    if job.media.duration is None:
                        job.media = _with_duration(job.media, item.samples / SAMPLE_RATE)
                    continue
                span = (item.span_end - item.span_start) / SAMPLE_RATE
                if not item.has_speech:
                    job.seconds_done += span
                    continue
                spans[count] = span
                yield SegmentInput(
                    index=count,
                    offset=timeline_offset + item.audio_start / SAMPLE_RATE,
                    pcm=item.pcm,
                    options=job.options,
                )
                logger.debug("Job %s: segment %d sent (%.1f s)", job.id, count, span)
                count += 1

        inputs = segment_inputs()
        outcomes = self.backend.map(inputs)
        try:
            await self._collect(job, outcomes, spans)
        finally:
            decoder.cancel()
            await outcomes.aclose()
            with contextlib.suppress(RuntimeError):
                await inputs.aclose()
        return bool(summary and summary.truncated)

    async def _collect(self, job: Job, outcomes: AsyncIterator[SegmentResult | BaseException],
                       spans: dict[int, float]) -> None:
        async for outcome in outcomes:
            if isinstance(outcome, BaseException):
                # A failure the worker could not attribute to a segment; the segments
                # left without a result are reported once the map ends.
                logger.warning("Job %s: a segment call failed: %r", job.id, outcome)
                continue
            job.seconds_done += spans.get(outcome.index, 0.0)
            if outcome.failed:
                job.failed[outcome.index] = outcome.error or "unknown error"
                logger.warning("Job %s: segment %d failed: %s", job.id, outcome.index, outcome.error)
                await job.append("error", ErrorEvent(
                    code="segment_failed",
                    message=f"segment {outcome.index} could not be transcribed: {outcome.error}",
                    segment=outcome.index,
                ))
            else:
                job.results[outcome.index] = outcome
                await job.append("segment", SegmentEvent.from_result(
                    outcome, with_words=job.options.word_timestamps))
            await job.append("progress", job.progress())

        for index in sorted(set(spans) - set(job.results) - set(job.failed)):
            job.failed[index] = "no result came back from the worker"
            await job.append("error", ErrorEvent(
                code="segment_failed",
                message=f"segment {index} could not be transcribed: the worker call failed",
                segment=index,
            ))


def restore_job(stored: StoredJob) -> Job:
    """Rebuild a job, its results and its status from its stored event log."""
    info = next((event.data for event in stored.events if event.event == "job"), {})
    stream = AudioStream(
        index=int(info.get("audio_stream_index", 0)),
        codec=str(info.get("audio_codec", "unknown")),
        channels=int(info.get("audio_channels", 0)),
        sample_rate=0,
        language=info.get("audio_language"),
        is_default=True,
        start_time=0.0,
    )
    media = MediaInfo(format_name=str(info.get("format", "unknown")), duration=info.get("duration"),
                      start_time=0.0, audio_streams=(stream,), has_video=False)
    job = Job(id=stored.id, filename=stored.filename, folder=None, input_path=None,
              media=media, stream=stream, options=TranscribeOptions(), created=stored.created,
              status=stored.status, events=list(stored.events), finished_at=stored.finished)
    for event in stored.events:
        if event.event == "segment":
            result = result_from_event(event.data)
            job.results[result.index] = result
        elif event.event == "error" and event.data.get("segment") is not None:
            job.failed[int(event.data["segment"])] = event.data.get("message", "")
        elif event.event == "progress":
            job.segments_total = event.data.get("segments_total")
            job.seconds_done = float(event.data.get("seconds_done") or 0.0)
    return job


def result_from_event(data: dict) -> SegmentResult:
    """Rebuild a `SegmentResult` from a `segment` event's data."""
    cues = tuple(
        Cue(
            start=cue["start"], end=cue["end"], text=cue["text"],
            avg_logprob=cue["avg_logprob"], compression_ratio=cue["compression_ratio"],
            no_speech_prob=cue["no_speech_prob"],
            words=tuple(Word(**word) for word in cue.get("words") or ()),
        )
        for cue in data.get("cues", ())
    )
    return SegmentResult(index=data["index"], start=data["start"], end=data["end"],
                         text=data["text"], language=data.get("language"), cues=cues)


def _with_duration(media: MediaInfo, duration: float) -> MediaInfo:
    from dataclasses import replace

    return replace(media, duration=duration)
