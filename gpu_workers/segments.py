"""Data that travels between the splitter and the Whisper workers.

These classes carry no web or Modal dependency, so the same objects are pickled to
Modal containers and passed between threads of the local pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000
"""Samples per second of the PCM that the splitter produces and the workers read."""


@dataclass(frozen=True)
class TranscribeOptions:
    """Per-job decoding options, the same for every segment of a job."""

    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    beam_size: int = 5
    word_timestamps: bool = False
    vad_filter: bool = True


@dataclass(frozen=True)
class SegmentInput:
    """One piece of a file's audio, cut at a pause, with its place on the file's timeline.

    `pcm` is 16 kHz mono signed 16-bit little-endian audio: half the size of float32,
    which matters when each piece is sent over the network to a GPU container.
    """

    index: int
    offset: float
    pcm: bytes
    options: TranscribeOptions = field(default_factory=TranscribeOptions)

    @property
    def duration(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE

    @property
    def end(self) -> float:
        return self.offset + self.duration

    def samples(self) -> np.ndarray:
        """Return the audio as float32 in [-1, 1], the form faster-whisper takes."""
        return np.frombuffer(self.pcm, dtype="<i2").astype(np.float32) / 32768.0


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass(frozen=True)
class Cue:
    """One Whisper segment (about a sentence), with times on the file's timeline."""

    start: float
    end: float
    text: str
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class SegmentResult:
    """The transcript of one `SegmentInput`, or the error that stopped it.

    A worker returns a failure as a result with `error` set, instead of raising, so
    the caller always knows which segment failed.
    """

    index: int
    start: float
    end: float
    text: str = ""
    language: str | None = None
    cues: tuple[Cue, ...] = ()
    error: str | None = None
    worker_seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.error is not None

    @classmethod
    def failure(cls, segment: SegmentInput, error: BaseException, worker_seconds: float = 0.0) -> SegmentResult:
        """Build the result of a segment that `error` stopped, placed like a transcript."""
        return cls(
            index=segment.index,
            start=round(segment.offset, 3),
            end=round(segment.end, 3),
            error=f"{type(error).__name__}: {error}",
            worker_seconds=worker_seconds,
        )
