"""Cut a stream of 16 kHz mono audio into segments at pauses.

`PauseSplitter` is fed blocks of PCM with their Silero VAD speech probabilities and
hands back segments as soon as a good cut is known, so transcription of the first
segment starts while the rest of the file is still being decoded.

How a cut is chosen:
- A pause is a run of VAD windows (32 ms each) whose speech probability stays under
  `SILENCE_PROBABILITY` for at least `min_pause_seconds`; the cut goes in its middle.
- Once the pending audio is longer than the target, the splitter waits for a pause
  past the target, then cuts at the pause that scores best: near the target and long.
- A gap between words that is shorter than a pause (down to `SHORT_GAP_WINDOWS`) also
  competes, with a handicap, so that a run of speech without a real pause after the
  middle of the segment is cut near the target rather than far before it.
- At the hard maximum with no quiet run at all, it cuts at the quietest window, the
  only case where a word can be split.
- Silence at either end of a segment is trimmed (keeping `PAD_SECONDS`), a segment with
  no speech is not sent, and offsets are exact sample positions on the timeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_workers.segments import SAMPLE_RATE

WINDOW = 512
"""Samples per Silero VAD window (32 ms at 16 kHz)."""

SPEECH_PROBABILITY = 0.5
SILENCE_PROBABILITY = 0.35
PAD_SECONDS = 0.4
"""Audio kept on each side of the speech in a segment, so soft word edges survive."""

SHORT_GAP_WINDOWS = 3
"""The shortest quiet run (96 ms) that may take a cut when no pause is near the target."""

SHORT_GAP_HANDICAP_SECONDS = 3.0
"""How much nearer the target a short gap must be than a pause to win the cut.

In the benchmark's espeak-ng readings, pauses can be more than 10 s apart. Before short
gaps could compete, 5 of the 23 full-length segments of the 10-minute video ended 4.6 to
12 s before the target. With them, the 60-minute video takes 138 segments instead of
143 and 2.5 % less CPU, and the word error rate moved by -0.5 points at 10 minutes and
+0.2 points at 60 (`bench.split_quality`).
"""

MIN_SPEECH_SECONDS = 0.1
"""A segment with less speech than this is noise, not words, and is not sent."""


@dataclass(frozen=True)
class Piece:
    """A span of the audio the splitter has finished with.

    `span_start`/`span_end` cover the whole cut (silence included) and count towards
    progress; `audio_start`/`audio_end` bound the trimmed audio to transcribe, and
    `pcm` is empty when the span held no speech.
    """

    span_start: int
    span_end: int
    audio_start: int
    audio_end: int
    pcm: bytes

    @property
    def has_speech(self) -> bool:
        return bool(self.pcm)


@dataclass(frozen=True)
class SplitConfig:
    first_segment_seconds: float = 8.0
    segment_seconds: float = 27.0
    max_segment_seconds: float = 29.5
    min_pause_seconds: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.first_segment_seconds <= self.max_segment_seconds:
            raise ValueError("first_segment_seconds must be positive and at most max_segment_seconds")
        if not 0 < self.segment_seconds <= self.max_segment_seconds:
            raise ValueError("segment_seconds must be positive and at most max_segment_seconds")


class PauseSplitter:
    """Stateful splitter: call `feed` for each block, then `finish` once at the end."""

    def __init__(self, config: SplitConfig = SplitConfig()) -> None:
        self.config = config
        self._audio = np.zeros(0, dtype=np.int16)
        self._probs = np.zeros(0, dtype=np.float32)
        self._start = 0
        self._pieces_cut = 0
        self._min_pause_windows = max(1, round(config.min_pause_seconds * SAMPLE_RATE / WINDOW))

    @property
    def samples_seen(self) -> int:
        return self._start + len(self._audio)

    def feed(self, audio: np.ndarray, probs: np.ndarray) -> list[Piece]:
        """Add a block of int16 audio (a multiple of `WINDOW` samples) and its VAD probabilities."""
        if len(audio) % WINDOW or len(probs) != len(audio) // WINDOW:
            raise ValueError("feed takes whole VAD windows: len(audio) == 512 * len(probs)")
        self._audio = np.concatenate([self._audio, audio])
        self._probs = np.concatenate([self._probs, probs])
        pieces = []
        while (cut := self._find_cut()) is not None:
            pieces.append(self._cut(cut))
        return pieces

    def finish(self, tail: np.ndarray | None = None, tail_probs: np.ndarray | None = None) -> list[Piece]:
        """Flush what is left; `tail` is a last block shorter than a window, if any."""
        pieces = []
        if tail is not None and len(tail):
            self._audio = np.concatenate([self._audio, tail])
            if tail_probs is not None:
                self._probs = np.concatenate([self._probs, tail_probs])
        if len(self._audio):
            pieces.append(self._cut(len(self._probs), final=True))
        return pieces

    def _target_windows(self) -> tuple[int, int]:
        cfg = self.config
        if self._pieces_cut == 0:
            target = cfg.first_segment_seconds
            maximum = min(cfg.max_segment_seconds, 2 * cfg.first_segment_seconds)
        else:
            target, maximum = cfg.segment_seconds, cfg.max_segment_seconds
        per_second = SAMPLE_RATE / WINDOW
        return int(target * per_second), int(maximum * per_second)

    def _quiet_runs(self, limit: int, min_windows: int) -> list[tuple[int, int]]:
        """Return (start, end) window ranges of quiet runs of `min_windows` or more before `limit`."""
        silent = self._probs[:limit] < SILENCE_PROBABILITY
        runs = []
        run_start = None
        for i, quiet in enumerate(silent):
            if quiet and run_start is None:
                run_start = i
            elif not quiet and run_start is not None:
                if i - run_start >= min_windows:
                    runs.append((run_start, i))
                run_start = None
        if run_start is not None and len(silent) - run_start >= min_windows:
            runs.append((run_start, len(silent)))
        return runs

    def _find_cut(self) -> int | None:
        """Return the window index to cut at, or None to wait for more audio."""
        target, maximum = self._target_windows()
        available = len(self._probs)
        if available < target:
            return None
        earliest = target // 2
        shortest = min(SHORT_GAP_WINDOWS, self._min_pause_windows)
        runs = [run for run in self._quiet_runs(min(available, maximum), shortest)
                if _middle(run) >= earliest]
        pause_past_target = any(_middle(run) >= target and run[1] - run[0] >= self._min_pause_windows
                                for run in runs)
        if not pause_past_target and available < maximum:
            return None
        per_second = SAMPLE_RATE / WINDOW
        if runs:
            # Each second away from the target costs one point and each second of quiet
            # earns two, so a clear sentence break beats a breath a little nearer.
            def score(run: tuple[int, int]) -> float:
                start, end = run
                points = abs((start + end) / 2 - target) / per_second - 2 * (end - start) / per_second
                if end - start < self._min_pause_windows:
                    points += SHORT_GAP_HANDICAP_SECONDS
                return points

            return _middle(min(runs, key=score))
        # No quiet run within the hard maximum: cut at the quietest window.
        window = self._probs[earliest:maximum]
        return earliest + int(np.argmin(window))

    def _cut(self, window_index: int, final: bool = False) -> Piece:
        end_sample = len(self._audio) if final else window_index * WINDOW
        audio = self._audio[:end_sample]
        probs = self._probs[: (end_sample + WINDOW - 1) // WINDOW]
        piece = self._trim(audio, probs)
        self._audio = self._audio[end_sample:]
        self._probs = self._probs[len(probs):] if not final else self._probs[:0]
        self._start += end_sample
        if piece.has_speech:
            self._pieces_cut += 1
        return piece

    def _trim(self, audio: np.ndarray, probs: np.ndarray) -> Piece:
        span_start, span_end = self._start, self._start + len(audio)
        speech = np.flatnonzero(probs >= SPEECH_PROBABILITY)
        if len(speech) * WINDOW < MIN_SPEECH_SECONDS * SAMPLE_RATE:
            return Piece(span_start, span_end, span_start, span_start, b"")
        pad = int(PAD_SECONDS * SAMPLE_RATE)
        first = max(0, int(speech[0]) * WINDOW - pad)
        last = min(len(audio), (int(speech[-1]) + 1) * WINDOW + pad)
        return Piece(
            span_start,
            span_end,
            span_start + first,
            span_start + last,
            audio[first:last].astype("<i2").tobytes(),
        )


def _middle(run: tuple[int, int]) -> int:
    start, end = run
    return (start + end) // 2
