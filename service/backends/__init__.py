"""Transcription backends: where segments go to be transcribed.

Every backend has the shape of Modal's `Function.map.aio(inputs, order_outputs=False,
return_exceptions=True)`: it takes an async iterable of `SegmentInput`s, starts work
on each as it arrives, and yields one item per input as soon as that input finishes,
in completion order. An item is a `SegmentResult` (with `error` set when the worker
caught a failure) or, for a failure the worker could not report itself, the exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

from gpu_workers.segments import SegmentInput, SegmentResult


class TranscriptionBackend(Protocol):
    name: str

    @property
    def ready(self) -> bool:
        """True once the model is loaded and `map` can start work at once."""

    async def start(self) -> None:
        """Load the model or connect; called once when the service starts."""

    async def close(self) -> None:
        """Release workers; called once when the service stops."""

    def map(
        self, segments: AsyncIterable[SegmentInput]
    ) -> AsyncIterator[SegmentResult | BaseException]:
        """Transcribe each segment, yielding results in completion order."""


def create_backend(settings) -> TranscriptionBackend:
    """Build the backend that `settings.backend` names."""
    if settings.backend == "local":
        from service.backends.local import LocalBackend

        return LocalBackend.from_settings(settings)
    if settings.backend == "modal":
        from service.backends.modal import ModalBackend

        return ModalBackend.from_settings(settings)
    raise ValueError(
        f"unknown backend {settings.backend!r}; set STREAMSCRIBE_BACKEND to 'local' or 'modal'"
    )
