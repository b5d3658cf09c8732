"""The embedded default backend: a pool of faster-whisper workers on this machine."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_limits

from gpu_workers.segments import SegmentInput, SegmentResult
from gpu_workers.transcriber import ModelConfig, SegmentTranscriber
from service.allocator import limit_glibc_arenas

logger = logging.getLogger(__name__)

class LocalBackend:
    """Transcribes segments on `workers` threads sharing one loaded model.

    CTranslate2 runs up to `num_workers` calls in parallel on a single copy of the
    weights, so the model is loaded once and each pool thread gets its own worker.
    All model work runs in the pool; the event loop only awaits futures.

    A worker that comes free takes up to `batch_size` waiting segments of the job and
    decodes them in one model call (`SegmentTranscriber.transcribe_batch`). On two CPU
    cores, two segments per call used a tenth less CPU than one at a time, and the
    10-minute benchmark video peaked at 501 MB against 469 MB (docs/benchmarks.md).
    """

    name = "local"

    def __init__(
        self,
        config: ModelConfig,
        workers: int,
        transcriber_factory: Callable[[ModelConfig], SegmentTranscriber] = SegmentTranscriber,
        batch_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.config = config
        self.workers = max(1, workers)
        self.batch_size = batch_size
        self._factory = transcriber_factory
        self._transcriber: SegmentTranscriber | None = None
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="whisper")
        self._loaded = asyncio.Event()

    @classmethod
    def from_settings(cls, settings) -> LocalBackend:
        config = ModelConfig(
            model=settings.model,
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.threads_per_worker,
            num_workers=settings.workers,
        )
        return cls(config, settings.workers, batch_size=settings.batch_size)

    @property
    def ready(self) -> bool:
        return self._transcriber is not None

    async def start(self) -> None:
        # The pool's threads are this backend's parallelism. Left alone, NumPy's BLAS
        # runs the log-mel matrix product of each call on threads of its own, which spin
        # while they wait. On two cores they took 0.8 s of CPU per 10 minutes of audio,
        # and the job ran 4 % slower. The limit holds for the whole process.
        threadpool_limits(limits=1, user_api="blas")
        # Before the model starts CTranslate2's worker threads, which take arenas then.
        limit_glibc_arenas()
        loop = asyncio.get_running_loop()
        self._transcriber = await loop.run_in_executor(self._executor, self._factory, self.config)
        self._loaded.set()

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def transcriber(self) -> SegmentTranscriber:
        if self._transcriber is None:
            raise RuntimeError("the local backend is not started; call start() first")
        return self._transcriber

    async def map(
        self, segments: AsyncIterable[SegmentInput]
    ) -> AsyncIterator[SegmentResult | BaseException]:
        """Submit segments to the pool as they arrive; yield results as they finish.

        Until the first result is out, each call takes one segment, and at most one
        segment per worker is taken from the splitter. The first words then wait
        neither for a second segment in the same call nor for the splitter, which
        would compete for the same cores. After that, calls take up to `batch_size`
        segments.

        Closing the iterator early cancels calls that have not started yet; a call
        already running in a thread finishes and its results are dropped.
        """
        await self._loaded.wait()
        loop = asyncio.get_running_loop()
        transcriber = self.transcriber
        running: dict[asyncio.Future[list[SegmentResult]], list[SegmentInput]] = {}
        waiting: deque[SegmentInput] = deque()
        inputs = aiter(segments)
        feeding: asyncio.Task | None = None
        exhausted = False
        first_out = False
        try:
            while True:
                batch = self.batch_size if first_out else 1
                # Holding back once the workers have enough queued keeps memory flat on
                # long files and lets segments of concurrent jobs interleave in the pool.
                # One segment more than the workers can take keeps the end of the input
                # in sight, so the last segments can be shared out below.
                outstanding = len(waiting) + sum(len(group) for group in running.values())
                limit = (self.workers + 1) * batch + 1 if first_out else self.workers
                if not exhausted and feeding is None and outstanding < limit:
                    feeding = asyncio.ensure_future(anext(inputs))
                while waiting and len(running) < self.workers:
                    size = min(batch, len(waiting))
                    if exhausted:
                        # The last segments are shared out, so that no worker sits idle
                        # while another decodes a full batch.
                        size = min(size, -(-len(waiting) // self.workers))
                    group = [waiting.popleft() for _ in range(size)]
                    future = loop.run_in_executor(self._executor, transcriber.transcribe_batch, group)
                    running[future] = group
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
                for future in done & running.keys():
                    group = running.pop(future)
                    first_out = True
                    for result in _results(future, group):
                        yield result
        finally:
            if feeding is not None:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            for future in running:
                future.cancel()


def _results(future: asyncio.Future[list[SegmentResult]], group: list[SegmentInput]) -> list[SegmentResult]:
    """Return a finished call's results, or one error result per segment if it raised."""
    try:
        return future.result()
    except Exception as error:  # noqa: BLE001 - reported per segment, the job goes on
        indices = ", ".join(str(segment.index) for segment in group)
        logger.warning("A call with segments %s failed: %s", indices, error, exc_info=True)
        return [SegmentResult.failure(segment, error) for segment in group]
