"""Break one window decode into its phases: features, encoder, beam search, word alignment.

It cuts the 10-minute speech video as the service does, then decodes the segments with
the service's `SegmentTranscriber` on one thread, `--per-call` segments per call, and
times each phase of every call. The model is wrapped so that the timed calls are the
ones the service makes.

    nice -n 10 python -m bench.window_cost [--minutes 10] [--per-call 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable

from bench.make_media import build_media
from bench.measure import BEAM_SIZE, COMPUTE_TYPE
from bench.report import markdown_table
from bench.split_quality import pause_cuts
from gpu_workers.segments import TranscribeOptions
from gpu_workers.transcriber import ModelConfig, SegmentTranscriber
from service.splitter import SplitConfig


class PhaseClock:
    """Seconds spent in each named phase, summed over calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        return timed


class TimedCallable:
    """A callable object, such as the feature extractor, whose calls are timed and whose
    other attributes are passed through."""

    def __init__(self, target, clock: PhaseClock, phase: str) -> None:
        self._target = target
        self._call = clock.wrap(phase, target)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._target, name)


class TimedWhisper:
    """A CTranslate2 Whisper model whose `generate` and `align` calls are timed."""

    def __init__(self, model, clock: PhaseClock) -> None:
        self._model = model
        self.generate = clock.wrap("beam search", model.generate)
        self.align = clock.wrap("word alignment", model.align)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the speech video from bench.make_media (default: 10)")
    parser.add_argument("--per-call", type=int, default=2,
                        help="segments per transcribe_batch call (default: 2, the service's batch size)")
    args = parser.parse_args(argv)

    media = build_media(args.minutes)
    segments = pause_cuts(media, SplitConfig(), TranscribeOptions(beam_size=BEAM_SIZE))
    transcriber = SegmentTranscriber(ModelConfig(model="bundled", device="cpu",
                                                 compute_type=COMPUTE_TYPE, cpu_threads=1))
    clock = PhaseClock()
    model = transcriber.model
    model.feature_extractor = TimedCallable(model.feature_extractor, clock, "features")
    model.encode = clock.wrap("encoder", model.encode)
    model.model = TimedWhisper(model.model, clock)

    groups = [segments[start:start + args.per_call] for start in range(0, len(segments), args.per_call)]
    started = time.perf_counter()
    for group in groups:
        transcriber.transcribe_batch(group)
    total = time.perf_counter() - started

    windows = len(segments)
    phases = ["features", "encoder", "beam search", "word alignment"]
    rest = total - sum(clock.seconds[phase] for phase in phases)
    rows = [[phase, f"{clock.seconds[phase]:.2f}", f"{1000 * clock.seconds[phase] / windows:.0f}",
             f"{100 * clock.seconds[phase] / total:.0f}"] for phase in phases]
    rows.append(["the rest (Python, cues)", f"{rest:.2f}", f"{1000 * rest / windows:.0f}",
                 f"{100 * rest / total:.0f}"])
    print(f"{media.video.name}: {windows} windows, {args.per_call} per call, one thread, "
          f"{total:.1f} s in all\n")
    print(markdown_table(["phase", "seconds", "ms per window", "share (%)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
