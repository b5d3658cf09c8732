"""The embedded default backend: a pool of faster-whisper workers on this machine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from gpu_workers.segments import SegmentInput, SegmentResult
from gpu_workers.transcriber import ModelConfig, SegmentTranscriber

logger = logging.getLogger(__name__)


class LocalBackend:
    """Transcribes segments on `workers` threads sharing one loaded model.

    CTranslate2 runs up to `num_workers` calls in parallel on a single copy of the
    weights, so the model is loaded once and each pool thread gets its own worker.
    All model work runs in the pool; the event loop only awaits futures.
    """

    name = "local"

    def __init__(
        self,
        config: ModelConfig,
        workers: int,
        transcriber_factory: Callable[[ModelConfig], SegmentTranscriber] = SegmentTranscriber,
    ) -> None:
        self.config = config
        self.workers = max(1, workers)
        self._factory = transcriber_factory
        self._transcriber: SegmentTranscriber | None = None
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="whisper")
        self._loaded = asyncio.Event()
        self.in_flight = 2 * self.workers

    @classmethod
    def from_settings(cls, settings) -> LocalBackend:
        config = ModelConfig(
            model=settings.model,
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.threads_per_worker,
            num_workers=settings.workers,
        )
        return cls(config, settings.workers)

    @property
    def ready(self) -> bool:
        return self._transcriber is not None

    async def start(self) -> None:
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
        """Submit each segment to the pool as it arrives; yield results as they finish.

        Closing the iterator early cancels segments that have not started yet; a
        segment already running in a thread finishes and its result is dropped.
        """
        await self._loaded.wait()
        loop = asyncio.get_running_loop()
        transcriber = self.transcriber
        pending: set[asyncio.Future[SegmentResult]] = set()
        inputs = aiter(segments)
        feeding: asyncio.Task | None = None
        exhausted = False
        try:
            while True:
                # Holding back once `in_flight` segments are queued keeps memory flat on
                # long files and lets segments of concurrent jobs interleave in the pool.
                if not exhausted and feeding is None and len(pending) < self.in_flight:
                    feeding = asyncio.ensure_future(anext(inputs))
                waiting = set(pending)
                if feeding is not None:
                    waiting.add(feeding)
                if not waiting:
                    return
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if feeding in done:
                    task, feeding = feeding, None
                    try:
                        segment = task.result()
                    except StopAsyncIteration:
                        exhausted = True
                    else:
                        pending.add(loop.run_in_executor(self._executor, transcriber.transcribe, segment))
                for future in done & pending:
                    pending.discard(future)
                    try:
                        yield future.result()
                    except Exception as error:  # noqa: BLE001 - returned like return_exceptions=True
                        yield error
        finally:
            if feeding is not None:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            for future in pending:
                future.cancel()
