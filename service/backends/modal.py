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
Modal's client keeps each input until its output arrives (to retry it), so this
also bounds the web container's memory per job to about 90 MB.
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
    exception that does not say which input it belongs to; the backend turns it into
    a failed `SegmentResult` as soon as the segment can be known (see `map`).
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
        if self._method is None:
            assert self._lookup is not None
            self._method = await self._lookup()

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
        one built from an exception. Modal yields one output per input, so once the
        unmatched exceptions are as many as the segments still unanswered, all of those
        segments failed and each gets its failure at once. Until then the failure waits.

        Closing the iterator early stops feeding and closes Modal's map. Calls already
        running in a container finish there, and their results are dropped.
        """
        method = self.method
        credits = asyncio.Semaphore(self.in_flight)
        unanswered: dict[int, SegmentInput] = {}
        exceptions: list[BaseException] = []
        feed = self._feed(segments, credits, unanswered)
        outputs = method.map.aio(feed, order_outputs=False, return_exceptions=True)
        try:
            async for output in outputs:
                credits.release()
                if isinstance(output, SegmentResult):
                    if unanswered.pop(output.index, None) is None:
                        logger.warning("Modal returned a result for segment %d, which is not "
                                       "waiting for one; dropping it", output.index)
                    else:
                        yield output
                else:
                    if not isinstance(output, BaseException):
                        output = TypeError(f"the worker returned {type(output).__name__}, "
                                           "not a SegmentResult; redeploy the Modal app")
                    logger.warning("A Modal call failed with %d segments unanswered: %r",
                                   len(unanswered), output)
                    exceptions.append(output)

                # Checked after every output: a result can leave only failed segments.
                if exceptions and len(exceptions) >= len(unanswered):
                    for failure in _match_failures(unanswered, exceptions):
                        yield failure

            # Modal ended the map, so every segment left has had its output.
            for failure in _match_failures(unanswered, exceptions):
                yield failure
            for error in exceptions:
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


def _match_failures(unanswered: dict[int, SegmentInput],
                    exceptions: list[BaseException]) -> list[SegmentResult]:
    """Pair unanswered segments with exceptions, in index and arrival order, and remove them.

    NOTE: when several calls fail before any of them can be matched, the pairing can
    swap their messages; the set of failed segments is still exact.
    """
    failures = []
    for index in sorted(unanswered)[: len(exceptions)]:
        segment = unanswered.pop(index)
        error = exceptions.pop(0)
        failures.append(SegmentResult(
            index=segment.index,
            start=round(segment.offset, 3),
            end=round(segment.end, 3),
            error=f"{type(error).__name__}: {error}",
        ))
        logger.warning("Segment %d failed on Modal: %s", segment.index, failures[-1].error)
    return failures
