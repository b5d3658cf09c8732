"""The events a job emits, as typed models; their wire form is FastAPI's `ServerSentEvent`."""

from __future__ import annotations

from typing import Literal

from fastapi.sse import ServerSentEvent
from pydantic import BaseModel

from gpu_workers.segments import SegmentResult


class WordOut(BaseModel):
    start: float
    end: float
    word: str
    probability: float


class CueOut(BaseModel):
    """A Whisper segment (about a sentence) inside one of our segments."""

    start: float
    end: float
    text: str
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[WordOut] | None = None


class JobEvent(BaseModel):
    job_id: str
    filename: str
    duration: float | None
    format: str
    audio_codec: str
    audio_track: int
    audio_stream_index: int
    audio_language: str | None
    audio_channels: int
    audio_tracks: int
    planned_segments: int | None = None
    model: str


class SegmentEvent(BaseModel):
    index: int
    start: float
    end: float
    text: str
    language: str | None
    cues: list[CueOut]

    @classmethod
    def from_result(cls, result: SegmentResult, with_words: bool) -> SegmentEvent:
        cues = [
            CueOut(
                start=cue.start,
                end=cue.end,
                text=cue.text,
                avg_logprob=cue.avg_logprob,
                compression_ratio=cue.compression_ratio,
                no_speech_prob=cue.no_speech_prob,
                words=[WordOut(**vars(word)) for word in cue.words] if with_words else None,
            )
            for cue in result.cues
        ]
        return cls(index=result.index, start=result.start, end=result.end, text=result.text,
                   language=result.language, cues=cues)


class ProgressEvent(BaseModel):
    segments_done: int
    segments_total: int | None
    seconds_done: float
    duration: float | None
    percent: float


class ErrorEvent(BaseModel):
    code: str
    message: str
    segment: int | None = None


class DoneEvent(BaseModel):
    job_id: str
    status: Literal["completed", "failed", "cancelled"]
    text: str
    duration: float | None
    elapsed_seconds: float
    segments: int
    segments_failed: list[int]
    truncated: bool = False
    notes: list[str] = []


EventName = Literal["job", "segment", "progress", "error", "done"]


class StoredEvent(BaseModel):
    """One event in a job's log; `id` counts from 0 and is the SSE `id:`."""

    id: int
    event: EventName
    data: dict

    def to_sse(self) -> ServerSentEvent:
        return ServerSentEvent(id=str(self.id), event=self.event, data=self.data)
