"""A stand-in for modal 1.6.4's `Function.map.aio`, for tests and the scaling benchmark.

`ModalMapStandIn` behaves like the map client in `modal/parallel_map.py`: it reads the
input iterator as fast as it can and runs up to `containers` calls at once. It yields
outputs in completion order, and a raised exception as a value when
`return_exceptions=True`. An exception from the input iterator ends the map. On
`aclose()` it stops reading inputs and drops the calls still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from gpu_workers.segments import SAMPLE_RATE, SegmentInput, SegmentResult

class _End:
    pass


_END = _End()


class _MapCall:
    def __init__(self, stand_in: ModalMapStandIn) -> None:
        self._stand_in = stand_in

    def aio(self, *input_iterators, order_outputs: bool = True, return_exceptions: bool = False):
        return self._stand_in.run_map(*input_iterators, order_outputs=order_outputs,
                                      return_exceptions=return_exceptions)


class ModalMapStandIn:
    """A Modal method stand-in: `stand_in.map.aio(inputs, ...)` runs `call` per input.

    `call` runs in a pool of `containers` threads, like a synchronous method on that
    many single-input containers. The counters are read by tests from other threads.
    """

    def __init__(self, call: Callable[[SegmentInput], SegmentResult], containers: int) -> None:
        self.call = call
        self.containers = containers
        self.map = _MapCall(self)
        self.map_options: list[dict[str, bool]] = []
        self.received = 0
        self.started = 0
        self.yielded = 0
        self.max_unanswered = 0
        self.closed = False
        self._executor = ThreadPoolExecutor(containers, thread_name_prefix="container")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def run_map(self, *input_iterators, order_outputs: bool,
                      return_exceptions: bool) -> AsyncIterator[object]:
        assert len(input_iterators) == 1, "the backend maps over one iterator"
        self.map_options.append({"order_outputs": order_outputs,
                                 "return_exceptions": return_exceptions})
        inputs = input_iterators[0]
        queue: asyncio.Queue = asyncio.Queue()
        outputs: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for item in inputs:
                    self.received += 1
                    self.max_unanswered = max(self.max_unanswered, self.received - self.yielded)
                    await queue.put(item)
            finally:
                await inputs.aclose()
            for _ in range(self.containers):
                await queue.put(_END)

        async def container() -> None:
            while (item := await queue.get()) is not _END:
                self.started += 1
                try:
                    value = await loop.run_in_executor(self._executor, self.call, item)
                except Exception as error:  # noqa: BLE001 - returned like Modal's return_exceptions
                    if not return_exceptions:
                        raise
                    value = error
                await outputs.put(value)

        async def supervise() -> None:
            try:
                await reader
                await asyncio.gather(*workers)
            except Exception as error:  # noqa: BLE001 - re-raised by the map below
                await outputs.put(_MapFailure(error))
                return
            await outputs.put(_END)

        reader = asyncio.create_task(read())
        workers = [asyncio.create_task(container()) for _ in range(self.containers)]
        supervisor = asyncio.create_task(supervise())
        try:
            while (value := await outputs.get()) is not _END:
                if isinstance(value, _MapFailure):
                    raise value.error
                self.yielded += 1
                yield value
        finally:
            self.closed = True
            tasks = [supervisor, reader, *workers]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _MapFailure(Exception):
    """An exception that ends the map: from the input iterator, or from a call when
    `return_exceptions=False`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def fake_result(segment: SegmentInput) -> SegmentResult:
    return SegmentResult(index=segment.index, start=round(segment.offset, 3),
                         end=round(segment.end, 3), text=f"segment {segment.index}")


def make_segment(index: int, seconds: float = 1.0) -> SegmentInput:
    return SegmentInput(index=index, offset=float(index), pcm=b"\0\0" * int(SAMPLE_RATE * seconds))
