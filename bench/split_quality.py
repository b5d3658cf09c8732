"""Compare ways of cutting a long recording before transcription: word error rate and time.

On the 10-minute speech video of `bench.make_media`, with tiny.en, int8 and beam size 5:

  whole file         `WhisperModel.transcribe` on the file, `cpu_threads` = usable cores
  fixed cuts         cuts every 29.5 s regardless of speech, each transcribed as the
                     service's workers do (`SegmentTranscriber`, one segment per call),
                     on `--workers` threads of one CTranslate2 thread each, sharing one
                     model
  pause cuts         the service's own `AudioDecoder` and `PauseSplitter` with its
                     default settings, then the same workers as the fixed cuts

`--experiments` adds rows that take the service's choices back one at a time:

  sequential         pause cuts, each segment through `WhisperModel.transcribe` (timestamp
                     tokens, a second VAD pass) instead of one window decode
  earlier cuts       pause cuts near 25 s at pauses of 0.3 s or more, the settings before
                     segments were cut to fill Whisper's window
  N per call         pause cuts, N segments per `transcribe_batch` call, as the local
                     pool sends them once the first result is out

Times for the cut rows are split in two: decoding plus cutting (ffmpeg, and for pause
cuts the VAD and splitter), then transcription. The service overlaps the two.

    nice -n 10 python -m bench.split_quality [--experiments] [--docs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from faster_whisper import WhisperModel

from bench.make_media import SpeechMedia, build_media
from bench.measure import (
    BEAM_SIZE,
    COMPUTE_TYPE,
    machine_busy_seconds,
    usable_cores,
    wait_for_idle_machine,
    word_error_rate,
)
from bench.report import markdown_table, write_docs_section
from gpu_workers.segments import SAMPLE_RATE, SegmentInput, SegmentResult, TranscribeOptions
from gpu_workers.transcriber import ModelConfig, SegmentTranscriber, resolve_model
from service.decoder import AudioDecoder, DecodeSummary, build_ffmpeg_args
from service.media import probe
from service.splitter import SplitConfig

FIXED_CUT_SECONDS = 29.5
EARLIER_SPLIT = SplitConfig(segment_seconds=25.0, max_segment_seconds=29.5, min_pause_seconds=0.3)
"""Pause cuts as the service made them before it cut to fill Whisper's window."""


@dataclass
class Row:
    """One way of transcribing the recording, with its cost and quality."""

    name: str
    cut_seconds: float
    transcribe_seconds: float
    word_error_rate: float
    segments: int
    longest_segment: float
    cpu_seconds: float
    other_cpu_seconds: float

    @property
    def total_seconds(self) -> float:
        return self.cut_seconds + self.transcribe_seconds


# ---------------------------------------------------------------- cutting

def decode_pcm(media: SpeechMedia) -> np.ndarray:
    """Decode the video's audio to 16 kHz mono int16 with the service's ffmpeg arguments."""
    stream = asyncio.run(probe(media.video, media.video.name, timeout=20.0)).pick_audio()
    args = build_ffmpeg_args(media.video, stream.index, stream.channels)
    result = subprocess.run(args, capture_output=True, check=True)
    pcm = np.frombuffer(result.stdout, dtype="<i2")
    if stream.channels > 1:
        pcm = pcm.reshape(-1, min(stream.channels, 2)).mean(axis=1).astype(np.int16)
    return pcm


def fixed_cuts(pcm: np.ndarray, seconds: float, options: TranscribeOptions) -> list[SegmentInput]:
    step = int(seconds * SAMPLE_RATE)
    return [
        SegmentInput(index=index, offset=start / SAMPLE_RATE,
                     pcm=pcm[start:start + step].astype("<i2").tobytes(), options=options)
        for index, start in enumerate(range(0, len(pcm), step))
    ]


def pause_cuts(media: SpeechMedia, split: SplitConfig, options: TranscribeOptions) -> list[SegmentInput]:
    """Cut the video exactly as the service does: its decoder thread, VAD and splitter."""
    stream = asyncio.run(probe(media.video, media.video.name, timeout=20.0)).pick_audio()

    async def collect(log_folder: Path) -> list[SegmentInput]:
        decoder = AudioDecoder(media.video, stream_index=stream.index, channels=stream.channels,
                               split=split, stderr_path=log_folder / "ffmpeg.log")
        segments: list[SegmentInput] = []
        async for item in decoder.pieces():
            if isinstance(item, DecodeSummary) or not item.has_speech:
                continue
            segments.append(SegmentInput(index=len(segments), offset=item.audio_start / SAMPLE_RATE,
                                         pcm=item.pcm, options=options))
        return segments

    with tempfile.TemporaryDirectory(prefix="split-quality-") as folder:
        return asyncio.run(collect(Path(folder)))


# ---------------------------------------------------------------- transcribing

def transcribe_in_pool(segments: Sequence[SegmentInput], transcribe: Callable[[list[SegmentInput]], list[SegmentResult]],
                       workers: int, per_call: int = 1) -> str:
    """Send `per_call` segments per call to `transcribe`, on `workers` threads; return the text."""
    groups = [list(segments[start:start + per_call]) for start in range(0, len(segments), per_call)]
    with ThreadPoolExecutor(workers) as pool:
        results = [result for group in pool.map(transcribe, groups) for result in group]
    failed = [result for result in results if result.failed]
    if failed:
        raise RuntimeError(f"{len(failed)} segments failed, the first with: {failed[0].error}")
    return " ".join(result.text for result in sorted(results, key=lambda r: r.start) if result.text)


# ---------------------------------------------------------------- rows

def measure(name: str, reference: str, cut: Callable[[], list[SegmentInput]] | None,
            transcribe: Callable[[list[SegmentInput]], str], idle_cores: float) -> Row:
    """Time `cut` and then `transcribe`, score the text, and report CPU other processes took."""
    wait_for_idle_machine(idle_cores)
    busy_before = machine_busy_seconds()
    own_before = _own_cpu_seconds()
    started = time.perf_counter()
    segments = cut() if cut is not None else []
    cut_seconds = time.perf_counter() - started
    started = time.perf_counter()
    text = transcribe(segments)
    transcribe_seconds = time.perf_counter() - started
    own = _own_cpu_seconds() - own_before
    other = machine_busy_seconds() - busy_before - own
    row = Row(
        name=name,
        cut_seconds=cut_seconds,
        transcribe_seconds=transcribe_seconds,
        word_error_rate=word_error_rate(reference, text),
        segments=len(segments),
        longest_segment=max((segment.duration for segment in segments), default=0.0),
        cpu_seconds=own,
        other_cpu_seconds=max(0.0, other),
    )
    print(f"  {name}: {row.total_seconds:.1f} s, WER {100 * row.word_error_rate:.1f} %, "
          f"CPU {row.cpu_seconds:.1f} s, other CPU {row.other_cpu_seconds:.1f} s", file=sys.stderr)
    return row


def _own_cpu_seconds() -> float:
    """Return CPU time of this process and of its children that have exited (ffmpeg)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def run_rows(media: SpeechMedia, args: argparse.Namespace) -> list[Row]:
    reference = media.reference_text()
    cores = usable_cores()
    options = TranscribeOptions(beam_size=BEAM_SIZE)
    plain_model = WhisperModel(resolve_model("bundled"), device="cpu", compute_type=COMPUTE_TYPE,
                               cpu_threads=cores)
    config = ModelConfig(model="bundled", device="cpu", compute_type=COMPUTE_TYPE,
                         cpu_threads=args.threads_per_worker, num_workers=args.workers)
    transcriber = SegmentTranscriber(config)
    pool_label = f"{args.workers} x {args.threads_per_worker} thread"

    def whole_file(_: list[SegmentInput]) -> str:
        pieces, _ = plain_model.transcribe(str(media.video), beam_size=BEAM_SIZE)
        return " ".join(piece.text.strip() for piece in pieces)

    def pooled(segments: list[SegmentInput], per_call: int = 1) -> str:
        return transcribe_in_pool(segments, transcriber.transcribe_batch, args.workers, per_call)

    def sequential(segments: list[SegmentInput]) -> str:
        def run(group: list[SegmentInput]) -> list[SegmentResult]:
            return [transcriber.transcribe_sequentially(segment) for segment in group]

        return transcribe_in_pool(segments, run, args.workers)

    rows = [
        measure(f"whole file, {cores} threads", reference, None, whole_file, args.idle_cores),
        measure(f"fixed {FIXED_CUT_SECONDS:g} s cuts, {pool_label}", reference,
                lambda: fixed_cuts(decode_pcm(media), FIXED_CUT_SECONDS, options), pooled, args.idle_cores),
        measure(f"pause cuts (service defaults), {pool_label}", reference,
                lambda: pause_cuts(media, SplitConfig(), options), pooled, args.idle_cores),
    ]
    if not args.experiments:
        return rows

    rows += [
        measure(f"pause cuts, sequential `transcribe` per segment, {pool_label}", reference,
                lambda: pause_cuts(media, SplitConfig(), options), sequential, args.idle_cores),
        measure(f"earlier cuts (25 s, pauses >= 0.3 s), {pool_label}", reference,
                lambda: pause_cuts(media, EARLIER_SPLIT, options), pooled, args.idle_cores),
    ]
    for per_call in args.batch_sizes:
        rows.append(measure(
            f"pause cuts, {per_call} per call, {pool_label}", reference,
            lambda: pause_cuts(media, SplitConfig(), options),
            lambda segments, n=per_call: pooled(segments, n),
            args.idle_cores,
        ))
    return rows


def render(rows: list[Row], media: SpeechMedia, command: str) -> str:
    plain = rows[0]
    table = markdown_table(
        ["method", "cut (s)", "transcribe (s)", "total (s)", "vs whole file", "WER (%)",
         "segments", "longest (s)", "CPU (s)", "other CPU (s)"],
        [
            [row.name, f"{row.cut_seconds:.1f}", f"{row.transcribe_seconds:.1f}", f"{row.total_seconds:.1f}",
             f"{row.total_seconds / plain.total_seconds:.2f}", f"{100 * row.word_error_rate:.1f}",
             row.segments or "–", f"{row.longest_segment:.1f}" if row.segments else "–",
             f"{row.cpu_seconds:.1f}", f"{row.other_cpu_seconds:.1f}"]
            for row in rows
        ],
    )
    return "\n".join([
        "## Where to cut: whole file, fixed cuts, pause cuts",
        "",
        f"Command: `{command}`",
        "",
        f"Recording: `{media.video.name}`, {media.duration / 60:.1f} min, {media.words} words. "
        f"Model: tiny.en, {COMPUTE_TYPE}, beam size {BEAM_SIZE}, in one process. The cut rows "
        "transcribe with the service's `SegmentTranscriber`, one segment per call unless the "
        "name says otherwise. "
        "`cut` is decoding plus cutting, done before transcription here but overlapped with "
        "it in the service. `CPU` is this process's CPU time, ffmpeg included; `other CPU` "
        "is CPU time that other processes used meanwhile, and rows with much of it are slowed.",
        "",
        table,
    ])


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--batch-sizes takes integers separated by commas, got {text!r}") from error
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"--batch-sizes takes positive integers, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the speech video from bench.make_media (default: 10)")
    parser.add_argument("--workers", type=int, default=usable_cores(),
                        help="worker threads for the cut rows (default: usable cores)")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="CTranslate2 threads per worker (default: 1, as the service on 2 cores)")
    parser.add_argument("--experiments", action="store_true",
                        help="add the rows for changes that need code in the service")
    parser.add_argument("--batch-sizes", type=_parse_sizes, default=[2, 3],
                        help="segments per call for the batched experiment rows (default: 2,3)")
    parser.add_argument("--idle-cores", type=float, default=0.3,
                        help="before each row, wait until other processes use fewer cores than "
                             "this, up to 15 minutes (default: 0.3; 0 disables the wait)")
    parser.add_argument("--docs", action="store_true",
                        help="also write the table to the split section of docs/benchmarks.md")
    args = parser.parse_args(argv)

    media = build_media(args.minutes)
    command = "python -m bench.split_quality " + " ".join(sys.argv[1:] if argv is None else argv)
    report = render(run_rows(media, args), media, command.strip())
    print(report)
    if args.docs:
        write_docs_section("split", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
