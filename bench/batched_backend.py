"""An experimental local backend that decodes several segments in one model call.

This is the change proposed for `service/backends/local.py` and
`gpu_workers/transcriber.py`, kept in bench/ so it can be measured end to end
without touching the service. It differs from `LocalBackend` in three ways:

- Segments that arrive while every worker is busy wait, and a worker that comes free
  takes up to `batch_size` of them at once. The first segments of a job find idle
  workers and run alone.
- With ramp-up on, only one segment per worker is taken from the splitter until the
  first result is out, so the decoder's ffmpeg and VAD compete less with the first
  segment. Without it, up to `2 * workers * batch_size` segments are taken at once.
- A batch goes through faster-whisper's `BatchedInferencePipeline` with the segments
  as `clip_timestamps`, so the whole batch takes one encoder pass and one beam search.
  There is no second Silero VAD pass, because the splitter already trimmed the
  silence. There are no timestamp tokens either, so each segment comes back as one
  cue. Segments must fit one 30 s Whisper window, so the splitter needs
  `max_segment_seconds` <= 30. Batched decoding uses the first temperature only,
  without faster-whisper's fallback.

A batch of one segment also goes through the pipeline, so `BENCH_BATCH_SIZE=1`
measures the pipeline's decoding without batching. Segments that cannot be batched
(longer than 30 s, or with a prompt or word timestamps) fall back to
`SegmentTranscriber.transcribe` one at a time.

Run a server with it, configured by the usual `STREAMSCRIBE_*` variables plus
`BENCH_BATCH_SIZE` (segments per model call, default 2) and `BENCH_RAMP_UP` (1 turns
ramp-up on, default 0):

    python -m bench.batched_backend --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

import httpx

import numpy as np
from faster_whisper import BatchedInferencePipeline

from gpu_workers.segments import Cue, SegmentInput, SegmentResult
from gpu_workers.transcriber import ModelConfig, SegmentTranscriber
from service.backends.local import LocalBackend
from tests.helpers import ROOT, SERVER_START_SECONDS, ServerProcess, free_port

logger = logging.getLogger(__name__)

WHISPER_WINDOW_SECONDS = 30.0
DEFAULT_BATCH_SIZE = 2


class BatchedSegmentTranscriber(SegmentTranscriber):
    """A `SegmentTranscriber` that can also decode a list of segments in one model call."""

    def transcribe_batch(self, segments: Sequence[SegmentInput]) -> list[SegmentResult]:
        """Transcribe `segments` together; return one result per segment, in input order."""
        if not all(_batchable(segment) for segment in segments):
            return [self.transcribe(segment) for segment in segments]
        started = time.perf_counter()
        try:
            results = self._transcribe_batch(segments)
        except Exception as error:  # noqa: BLE001 - each segment gets the failure, the job goes on
            logger.warning("Batch of segments %s failed: %s",
                           [segment.index for segment in segments], error, exc_info=True)
            return [
                SegmentResult(index=segment.index, start=segment.offset, end=segment.end,
                              error=f"{type(error).__name__}: {error}",
                              worker_seconds=time.perf_counter() - started)
                for segment in segments
            ]
        logger.debug("Segments %s (%.1f s of audio) took %.2f s together",
                     [segment.index for segment in segments],
                     sum(segment.duration for segment in segments), time.perf_counter() - started)
        return results

    def _transcribe_batch(self, segments: Sequence[SegmentInput]) -> list[SegmentResult]:
        # The segments are laid end to end. Each one's span on that joint timeline is a
        # clip, and the pipeline decodes every clip as one chunk of the batch.
        audio = np.concatenate([segment.samples() for segment in segments])
        clip_starts, clips, position = [], [], 0.0
        for segment in segments:
            clip_starts.append(position)
            clips.append({"start": position, "end": position + segment.duration})
            position += segment.duration
        language = segments[0].options.language if self.multilingual else None
        pipeline = BatchedInferencePipeline(self.model)
        pieces, info = pipeline.transcribe(
            audio,
            language=language,
            beam_size=segments[0].options.beam_size,
            batch_size=len(segments),
            clip_timestamps=clips,
        )
        cues: list[list[Cue]] = [[] for _ in segments]
        for piece in pieces:
            text = piece.text.strip()
            if not text:
                continue
            slot = max(0, bisect.bisect_right(clip_starts, piece.start + 1e-3) - 1)
            segment, clip_start = segments[slot], clip_starts[slot]
            cues[slot].append(Cue(
                start=round(min(segment.offset + piece.start - clip_start, segment.end), 3),
                end=round(min(segment.offset + piece.end - clip_start, segment.end), 3),
                text=text,
                avg_logprob=round(piece.avg_logprob, 4),
                compression_ratio=round(piece.compression_ratio, 4),
                no_speech_prob=round(piece.no_speech_prob, 4),
            ))
        return [
            SegmentResult(
                index=segment.index,
                start=round(segment.offset, 3),
                end=round(segment.end, 3),
                text=" ".join(cue.text for cue in segment_cues),
                language=info.language,
                cues=tuple(segment_cues),
            )
            for segment, segment_cues in zip(segments, cues)
        ]


def _batchable(segment: SegmentInput) -> bool:
    options = segment.options
    return (segment.duration <= WHISPER_WINDOW_SECONDS and not options.prompt
            and not options.word_timestamps)


class BatchingLocalBackend(LocalBackend):
    """`LocalBackend` whose free workers take up to `batch_size` waiting segments per call."""

    def __init__(self, config: ModelConfig, workers: int, batch_size: int, ramp_up: bool = False) -> None:
        super().__init__(config, workers, transcriber_factory=BatchedSegmentTranscriber)
        self.batch_size = max(1, batch_size)
        self.ramp_up = ramp_up
        # Segments taken from the splitter but not finished: enough for each worker to
        # have a full batch running and another one waiting.
        self.in_flight = 2 * self.workers * self.batch_size

    @classmethod
    def from_settings(cls, settings, batch_size: int = DEFAULT_BATCH_SIZE,
                      ramp_up: bool = False) -> BatchingLocalBackend:
        config = ModelConfig(
            model=settings.model,
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.threads_per_worker,
            num_workers=settings.workers,
        )
        return cls(config, settings.workers, batch_size, ramp_up)

    async def map(
        self, segments: AsyncIterable[SegmentInput]
    ) -> AsyncIterator[SegmentResult | BaseException]:
        """Submit waiting segments in batches as workers come free; yield results as batches finish."""
        await self._loaded.wait()
        loop = asyncio.get_running_loop()
        transcriber = self.transcriber
        waiting: list[SegmentInput] = []
        running: dict[asyncio.Future[list[SegmentResult]], int] = {}
        inputs = aiter(segments)
        feeding: asyncio.Task | None = None
        exhausted = False
        yielded = 0
        try:
            while True:
                while waiting and len(running) < self.workers:
                    batch, waiting = waiting[: self.batch_size], waiting[self.batch_size:]
                    future = loop.run_in_executor(self._executor, transcriber.transcribe_batch, batch)
                    running[future] = len(batch)
                # Until the first result is out, take only as many segments as there are
                # workers, so the decoder's VAD does not compete with the first segment.
                limit = self.in_flight if yielded or not self.ramp_up else self.workers
                taken = len(waiting) + sum(running.values())
                if not exhausted and feeding is None and taken < limit:
                    feeding = asyncio.ensure_future(anext(inputs))
                pending: set[asyncio.Future] = set(running)
                if feeding is not None:
                    pending.add(feeding)
                if not pending:
                    return
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if feeding in done:
                    task, feeding = feeding, None
                    try:
                        waiting.append(task.result())
                    except StopAsyncIteration:
                        exhausted = True
                for future in [future for future in running if future in done]:
                    size = running.pop(future)
                    try:
                        results = future.result()
                    except Exception as error:  # noqa: BLE001 - one item per input, as the protocol says
                        for _ in range(size):
                            yield error
                        continue
                    for result in results:
                        yielded += 1
                        yield result
        finally:
            if feeding is not None:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            for future in running:
                future.cancel()


def start_batched_server(workdir: Path, batch_size: int, **settings: object) -> ServerProcess:
    """Start `main` in a child process, as `tests.helpers.start_server` does the real service."""
    port = free_port()
    temp_root = workdir / "temp"
    env = {**os.environ, "STREAMSCRIBE_TEMP_ROOT": str(temp_root), "PYTHONUNBUFFERED": "1",
           "BENCH_BATCH_SIZE": str(batch_size)}
    for name, value in settings.items():
        env[f"STREAMSCRIBE_{name.upper()}"] = str(value)
    log_path = workdir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.batched_backend", "--log-level", "DEBUG", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, temp_root, log_path)
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"batched server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"batched server not ready after {SERVER_START_SECONDS} s:\n{server.log()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the service with the batching backend.")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings.from_env(port=args.port)
    batch_size = int(os.environ.get("BENCH_BATCH_SIZE", DEFAULT_BATCH_SIZE))
    ramp_up = os.environ.get("BENCH_RAMP_UP", "0") == "1"
    backend = BatchingLocalBackend.from_settings(settings, batch_size, ramp_up)
    logger.info("Batching backend: %d workers, up to %d segments per call", backend.workers, batch_size)
    uvicorn.run(create_app(settings, backend=backend), host="127.0.0.1", port=args.port,
                log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
