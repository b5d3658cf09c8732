"""The Modal backend: each segment becomes one call of the deployed GPU class.

The backend hands the job's segments to `method.map.aio(..., order_outputs=False,
return_exceptions=True)`, where `method` is `WhisperWorker().transcribe` of the app in
`gpu_workers/modal_app.py` or any stand-in with the same `.map.aio`. Only the
segment's own 16 kHz PCM and its offset travel (a `SegmentInput`), never the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from gpu_workers.segments import SegmentInput, SegmentResult

logger = logging.getLogger(__name__)

DEPLOY_COMMAND = "modal deploy gpu_workers/modal_app.py"

DEFAULT_IN_FLIGHT = 64
"""Segments a job may have sent and not yet got back.

Above the default deployment's 40 concurrent calls (10 containers, 4 inputs each),
so one job can keep every container busy. A 45 s segment is 1.4 MB of PCM, and
modal 1.6.4's map client keeps each input until its output arrives (to retry it), so
this also bounds the memory a job's inputs take to about 90 MB.
"""


class MapCall(Protocol):
    def aio(
        self,
        *input_iterators: AsyncIterable[Any],
        order_outputs: bool = ...,
        return_exceptions: bool = ...,
    ) -> AsyncIterator[Any]: ...


class RemoteMethod(Protocol):
    """A Modal method, or a stand-in, that can fan inputs out with `map.aio`."""

    @property
    def map(self) -> MapCall: ...


async def lookup_deployed_method(app_name: str, class_name: str,
                                 method_name: str = "transcribe") -> RemoteMethod:
    """Look up `method_name` of the deployed Modal class `class_name` in app `app_name`.

    Raises `RuntimeError` with the fix when the class is not deployed or Modal rejects
    the credentials.
    """
    import modal
    import modal.exception

    worker_class = modal.Cls.from_name(app_name, class_name)
    try:
        await worker_class.hydrate.aio()
    except modal.exception.NotFoundError as error:
        raise RuntimeError(
            f"the Modal class {class_name!r} of app {app_name!r} was not found; deploy it "
            f"with `{DEPLOY_COMMAND}`, or set STREAMSCRIBE_MODAL_APP_NAME and "
            f"STREAMSCRIBE_MODAL_CLASS_NAME to the deployed names"
        ) from error
    except modal.exception.AuthError as error:
        raise RuntimeError(
            "Modal rejected the credentials; run `modal token new` or set "
            "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
        ) from error
    return getattr(worker_class(), method_name)


class ModalBackend:
    """Transcribes segments on Modal GPU containers through `method.map.aio`.

    Modal reads the input iterator as fast as it can, so the backend holds back the
    next segment while `in_flight` are sent and unanswered. A call that raises (a
    container crash, a timeout, retries used up) comes back from Modal as a bare
    exception that does not name its input. The backend turns it into a failed
    `SegmentResult` as soon as the failed segment is certain (see `_Failures`).
    """

    name = "modal"

    def __init__(
        self,
        method: RemoteMethod | None = None,
        *,
        lookup: Callable[[], Awaitable[RemoteMethod]] | None = None,
        in_flight: int = DEFAULT_IN_FLIGHT,
    ) -> None:
        if method is None and lookup is None:
            raise ValueError("ModalBackend needs a remote method, or a lookup that returns one")
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self._method = method
        self._lookup = lookup
        self.in_flight = in_flight
        self._closed = False
        self._start_error: Exception | None = None
        self._started = asyncio.Event()
        if method is not None:
            self._started.set()

    @classmethod
    def from_settings(cls, settings) -> ModalBackend:
        """Build a backend that looks up the deployed class named by `settings` in `start`."""
        app_name = settings.modal_app_name
        class_name = settings.modal_class_name

        async def lookup() -> RemoteMethod:
            return await lookup_deployed_method(app_name, class_name)

        return cls(lookup=lookup)

    @property
    def ready(self) -> bool:
        return self._method is not None and not self._closed

    async def start(self) -> None:
        if self._method is not None:
            return
        assert self._lookup is not None
        try:
            self._method = await self._lookup()
        except Exception as error:
            self._start_error = error
            raise
        finally:
            self._started.set()

    async def close(self) -> None:
        # Jobs still mapping stop feeding new segments; the job runner closes their
        # iterators, which closes the Modal map.
        self._closed = True

    @property
    def method(self) -> RemoteMethod:
        if self._closed:
            raise RuntimeError("the Modal backend is closed")
        if self._method is None:
            raise RuntimeError("the Modal backend is not started; call start() first")
        return self._method

    async def map(
        self, segments: AsyncIterable[SegmentInput]
    ) -> AsyncIterator[SegmentResult | BaseException]:
        """Send each segment to Modal as it arrives; yield results as they finish.

        Every segment sent gets exactly one item back: its `SegmentResult`, or a failed
        one built from an exception as soon as `_Failures` can tell whose it is.
        Closing the iterator early stops feeding and closes Modal's map. Calls already
        running in a container finish there, and their results are dropped.
        """
        # A job that arrives while `start` is still looking up the class waits for it,
        # as jobs wait for the local backend's model.
        await self._started.wait()
        if self._start_error is not None:
            error = self._start_error
            raise RuntimeError(f"the Modal backend failed to start: {error}") from error
        method = self.method
        credits = asyncio.Semaphore(self.in_flight)
        unanswered: dict[int, SegmentInput] = {}
        failures = _Failures()
        feed = self._feed(segments, credits, unanswered)
        outputs = method.map.aio(feed, order_outputs=False, return_exceptions=True)
        try:
            async for output in outputs:
                credits.release()
                if isinstance(output, SegmentResult):
                    if unanswered.pop(output.index, None) is None:
                        logger.warning("Modal returned a result for segment %d, which is not "
                                       "waiting for one; dropping it", output.index)
                        continue
                    failures.answered(output.index)
                    yield output
                else:
                    if not isinstance(output, BaseException):
                        output = TypeError(f"the worker returned {type(output).__name__}, "
                                           "not a SegmentResult; redeploy the Modal app")
                    logger.warning("A Modal call failed with %d segments unanswered: %r",
                                   len(unanswered), output)
                    failures.add(output, unanswered)
                for failure in failures.resolve(unanswered):
                    yield failure

            # Modal ended the map, so each segment left has one of the exceptions left.
            for failure in failures.resolve(unanswered, at_end=True):
                yield failure
            for error in failures.leftovers():
                yield error
        finally:
            await outputs.aclose()
            with contextlib.suppress(RuntimeError):
                await feed.aclose()

    async def _feed(
        self,
        segments: AsyncIterable[SegmentInput],
        credits: asyncio.Semaphore,
        unanswered: dict[int, SegmentInput],
    ) -> AsyncIterator[SegmentInput]:
        # A credit is taken before the next segment is read, so the decoder upstream
        # also waits while the segments in flight are at the limit.
        source = aiter(segments)
        while not self._closed:
            await credits.acquire()
            try:
                segment = await anext(source)
            except StopAsyncIteration:
                return
            unanswered[segment.index] = segment
            yield segment


class _Failures:
    """Exceptions from Modal's map, each with the segments it can belong to.

    An exception belongs to one of the segments unanswered when it arrived, and not to
    any that has since had its result. Take an exception with candidates X. The
    exceptions whose candidates all lie in X belong to distinct segments of X. When
    they are as many as X, every segment of X failed, so those segments are matched to
    those exceptions at once and leave every other exception's candidates.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[BaseException, set[int]]] = []

    def add(self, error: BaseException, unanswered: dict[int, SegmentInput]) -> None:
        self._pending.append((error, set(unanswered)))

    def answered(self, index: int) -> None:
        for _, candidates in self._pending:
            candidates.discard(index)

    def resolve(self, unanswered: dict[int, SegmentInput], *,
                at_end: bool = False) -> list[SegmentResult]:
        """Return failed results for the segments whose failure is now certain.

        `at_end` means Modal's map has ended, so each unanswered segment failed.
        """
        if at_end:
            # An exception whose candidates all got results, which Modal's one output
            # per input rules out, may belong to any segment still unanswered.
            for _, candidates in self._pending:
                if not candidates:
                    candidates.update(unanswered)

        results: list[SegmentResult] = []
        matched = True
        while matched:
            matched = False
            for _, candidates in self._pending:
                owners = [entry for entry in self._pending if entry[1] <= candidates]
                if candidates and len(owners) == len(candidates):
                    results.extend(self._match(sorted(candidates), owners, unanswered))
                    matched = True
                    break
        return results

    def leftovers(self) -> list[BaseException]:
        """Return the exceptions no segment could be matched to, and forget them."""
        errors = [error for error, _ in self._pending]
        self._pending = []
        return errors

    def _match(self, indices: list[int], owners: list[tuple[BaseException, set[int]]],
               unanswered: dict[int, SegmentInput]) -> list[SegmentResult]:
        # NOTE: when one group contains several failures, the messages are paired by
        # index and arrival order and can be swapped. The set of failed segments is exact.
        self._pending = [entry for entry in self._pending
                         if not any(entry is owner for owner in owners)]
        for _, candidates in self._pending:
            candidates.difference_update(indices)
        results = []
        for index, (error, _) in zip(indices, owners):
            segment = unanswered.pop(index)
            results.append(SegmentResult.failure(segment, error))
            logger.warning("Segment %d failed on Modal: %s", segment.index, results[-1].error)
        return results
