"""`ModalBackend` against a stand-in for Modal's `Function.map.aio`, alone and in the service.

`ModalMapStandIn` behaves like modal 1.6.4's map client (`modal/parallel_map.py`). It
reads the input iterator as fast as it can and runs up to `containers` calls at once.
It yields outputs in completion order, and a raised exception as a value when
`return_exceptions=True`. An exception from the input iterator ends the map. On
`aclose()` it stops reading inputs and drops the calls still running. The service
tests run the real job runner behind uvicorn on a loopback port.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gpu_workers.segments import SegmentInput, SegmentResult
from gpu_workers.transcriber import ModelConfig, SegmentTranscriber
from service.backends.local import LocalBackend
from service.backends.modal import DEPLOY_COMMAND, ModalBackend
from service.settings import Settings
from tests.helpers import read_events, running_service, transcribe
from tests.modal_stand_in import ModalMapStandIn, fake_result, make_segment

CANCEL_WAIT_SECONDS = 20


async def counted_segments(count: int, pulled: list[int],
                           closed: list[bool]) -> AsyncIterator[SegmentInput]:
    """Yield `count` one-second segments, recording each index pulled and the close."""
    try:
        for index in range(count):
            pulled.append(index)
            yield make_segment(index)
    finally:
        closed.append(True)


# The backend on its own.


def test_map_attributes_raised_calls_to_segments():
    failing = {2, 7, 8}

    def call(segment: SegmentInput) -> SegmentResult:
        time.sleep(0.01 * ((segment.index * 7) % 5))  # finish out of order
        if segment.index in failing:
            raise RuntimeError(f"container for input {segment.index} crashed")
        return fake_result(segment)

    stand_in = ModalMapStandIn(call, containers=3)
    backend = ModalBackend(stand_in, in_flight=5)

    async def run() -> list[object]:
        return [item async for item in backend.map(counted_segments(12, [], []))]

    try:
        outputs = asyncio.run(run())
    finally:
        stand_in.shutdown()

    assert stand_in.map_options == [{"order_outputs": False, "return_exceptions": True}]
    assert all(isinstance(item, SegmentResult) for item in outputs), outputs
    assert sorted(item.index for item in outputs) == list(range(12))
    failed = {item.index for item in outputs if item.failed}
    assert failed == failing
    for item in outputs:
        if item.failed:
            assert item.error.startswith("RuntimeError: container for input")
            assert (item.start, item.end) == (float(item.index), float(item.index) + 1.0)
        else:
            assert item.text == f"segment {item.index}"


def test_map_reports_failure_once_known():
    # Segment 0 fails at once while segment 1 is still running: the failure can only
    # be matched once segment 1 is back, and must come out right then.
    def call(segment: SegmentInput) -> SegmentResult:
        if segment.index == 0:
            raise TimeoutError("input timed out")
        time.sleep(0.2 if segment.index == 1 else 0.6)
        return fake_result(segment)

    stand_in = ModalMapStandIn(call, containers=2)
    backend = ModalBackend(stand_in, in_flight=2)

    async def run() -> list[tuple[int, bool]]:
        order = []
        async for item in backend.map(counted_segments(4, [], [])):
            order.append((item.index, item.failed))
        return order

    try:
        order = asyncio.run(run())
    finally:
        stand_in.shutdown()

    assert order[:2] == [(1, False), (0, True)]
    assert sorted(order) == [(0, True), (1, False), (2, False), (3, False)]


def test_failures_matched_by_elimination():
    from service.backends.modal import _Failures

    failures = _Failures()
    unanswered = {index: make_segment(index) for index in (0, 1, 2)}
    first = RuntimeError("first")
    second = RuntimeError("second")

    failures.add(first, unanswered)          # one of 0, 1, 2 failed
    assert failures.resolve(unanswered) == []
    del unanswered[1]
    failures.answered(1)                     # so 0 or 2
    unanswered[3] = make_segment(3)
    failures.add(second, unanswered)         # one of 0, 2, 3 failed too
    assert failures.resolve(unanswered) == []
    del unanswered[2]
    failures.answered(2)                     # so `first` is 0, and `second` is 3

    matched = failures.resolve(unanswered)

    assert [(result.index, result.error) for result in matched] == [
        (0, "RuntimeError: first"), (3, "RuntimeError: second")]
    assert unanswered == {}
    assert failures.leftovers() == []


def test_map_bounds_segments_in_flight():
    def call(segment: SegmentInput) -> SegmentResult:
        time.sleep(0.02)
        return fake_result(segment)

    stand_in = ModalMapStandIn(call, containers=8)
    backend = ModalBackend(stand_in, in_flight=3)
    lags: list[float] = []

    async def heartbeat() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    async def run() -> list[SegmentResult]:
        beat = asyncio.create_task(heartbeat())
        try:
            return [item async for item in backend.map(counted_segments(30, [], []))]
        finally:
            beat.cancel()

    try:
        outputs = asyncio.run(run())
    finally:
        stand_in.shutdown()

    assert sorted(item.index for item in outputs) == list(range(30))
    assert stand_in.max_unanswered <= 3
    assert max(lags) < 0.1, f"the event loop stalled for {max(lags):.3f} s"


def test_map_close_stops_calls():
    def call(segment: SegmentInput) -> SegmentResult:
        time.sleep(0.05)
        return fake_result(segment)

    stand_in = ModalMapStandIn(call, containers=2)
    backend = ModalBackend(stand_in, in_flight=4)
    pulled: list[int] = []
    source_closed: list[bool] = []

    async def run() -> tuple[int, int]:
        outputs = backend.map(counted_segments(50, pulled, source_closed))
        for _ in range(4):
            await anext(outputs)
        await outputs.aclose()
        started = stand_in.started
        await asyncio.sleep(0.3)
        return started, stand_in.started

    try:
        started_at_close, started_later = asyncio.run(run())
    finally:
        stand_in.shutdown()

    assert stand_in.closed
    assert source_closed == [True]
    assert started_later == started_at_close
    assert len(pulled) <= 4 + backend.in_flight
    assert stand_in.started <= len(pulled)


def test_map_raises_input_errors():
    async def broken_source() -> AsyncIterator[SegmentInput]:
        yield make_segment(0)
        raise ValueError("ffmpeg failed")

    stand_in = ModalMapStandIn(fake_result, containers=2)
    backend = ModalBackend(stand_in)

    async def run() -> None:
        async for _ in backend.map(broken_source()):
            pass

    try:
        with pytest.raises(ValueError, match="ffmpeg failed"):
            asyncio.run(run())
    finally:
        stand_in.shutdown()


def test_map_waits_for_start():
    stand_in = ModalMapStandIn(fake_result, containers=1)
    lookup_done = asyncio.Event()

    async def slow_lookup() -> ModalMapStandIn:
        await asyncio.sleep(0.2)
        lookup_done.set()
        return stand_in

    backend = ModalBackend(lookup=slow_lookup)

    async def run() -> tuple[bool, list[SegmentResult]]:
        outputs = asyncio.ensure_future(_collect(backend.map(counted_segments(3, [], []))))
        await asyncio.sleep(0.05)
        started_early = stand_in.started
        await backend.start()
        return started_early, await outputs

    try:
        started_early, outputs = asyncio.run(run())
    finally:
        stand_in.shutdown()

    assert started_early == 0
    assert sorted(item.index for item in outputs) == [0, 1, 2]


def test_map_raises_when_start_failed():
    async def failing_lookup():
        raise RuntimeError("the Modal class 'WhisperWorker' of app 'streamscribe' was not found")

    backend = ModalBackend(lookup=failing_lookup)

    async def run() -> None:
        with pytest.raises(RuntimeError, match="was not found"):
            await backend.start()
        await _collect(backend.map(counted_segments(1, [], [])))

    with pytest.raises(RuntimeError, match="failed to start: the Modal class"):
        asyncio.run(run())


async def _collect(outputs: AsyncIterator[object]) -> list:
    return [item async for item in outputs]


def test_closed_backend_rejects_map():
    backend = ModalBackend(ModalMapStandIn(fake_result, containers=1))
    assert backend.ready
    asyncio.run(backend.close())
    assert not backend.ready
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(anext(backend.map(counted_segments(1, [], []))))


class _FakeHydrate:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.calls = 0

    async def aio(self) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


class _FakeClass:
    def __init__(self, method: object, error: Exception | None = None) -> None:
        self.hydrate = _FakeHydrate(error)
        self.method = method

    def __call__(self) -> _FakeClass:
        return self

    @property
    def transcribe(self) -> object:
        return self.method


def test_from_settings_looks_up_class_in_start(monkeypatch):
    import modal

    stand_in = ModalMapStandIn(fake_result, containers=1)
    looked_up: list[tuple[str, str]] = []
    fake_class = _FakeClass(stand_in)

    def from_name(app_name: str, class_name: str) -> _FakeClass:
        looked_up.append((app_name, class_name))
        return fake_class

    monkeypatch.setattr(modal.Cls, "from_name", from_name)
    settings = Settings(modal_app_name="app-x", modal_class_name="Worker")
    backend = ModalBackend.from_settings(settings)
    assert looked_up == []
    assert not backend.ready

    asyncio.run(backend.start())

    assert looked_up == [("app-x", "Worker")]
    assert fake_class.hydrate.calls == 1
    assert backend.ready
    assert backend.method is stand_in
    stand_in.shutdown()


def test_start_names_deploy_command_when_class_missing(monkeypatch):
    import modal
    import modal.exception

    missing = _FakeClass(None, modal.exception.NotFoundError("App 'streamscribe' not found"))
    monkeypatch.setattr(modal.Cls, "from_name", lambda app_name, class_name: missing)
    backend = ModalBackend.from_settings(Settings())

    with pytest.raises(RuntimeError, match=re.escape(DEPLOY_COMMAND)):
        asyncio.run(backend.start())
    assert not backend.ready


# The backend behind the real service.


@pytest.fixture(scope="module")
def transcriber() -> SegmentTranscriber:
    return SegmentTranscriber(ModelConfig(model="bundled", num_workers=2))


def service_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(temp_root=tmp_path / "temp", database=tmp_path / "jobs.sqlite3", workers=2,
                    **overrides)


def events_named(events, name: str) -> list:
    return [event for event in events if event.name == name]


def test_service_text_matches_local_backend(tmp_path, demo_video, transcriber):
    local = LocalBackend(transcriber.config, workers=2,
                         transcriber_factory=lambda config: transcriber)
    with running_service(service_settings(tmp_path / "local"), local) as (url, _):
        local_events = transcribe(url, demo_video)

    stand_in = ModalMapStandIn(transcriber.transcribe, containers=3)
    try:
        settings = service_settings(tmp_path / "modal")
        with running_service(settings, ModalBackend(stand_in)) as (url, _):
            modal_events = transcribe(url, demo_video)
    finally:
        stand_in.shutdown()

    local_done = events_named(local_events, "done")[-1].data
    modal_done = events_named(modal_events, "done")[-1].data
    assert modal_done["status"] == "completed"
    assert modal_done["text"] == local_done["text"]
    assert modal_done["segments"] == local_done["segments"]
    assert modal_done["segments_failed"] == []
    assert events_named(modal_events, "error") == []
    indices = [event.data["index"] for event in events_named(modal_events, "segment")]
    assert sorted(indices) == list(range(modal_done["segments"]))
    assert stand_in.started == modal_done["segments"]


def test_service_reports_each_failed_segment(tmp_path, demo_video):
    def call(segment: SegmentInput) -> SegmentResult:
        time.sleep(0.01 * (segment.index % 3))
        if segment.index == 1:
            raise RuntimeError("the container ran out of memory")
        if segment.index == 2:
            return SegmentResult(index=2, start=segment.offset, end=segment.end,
                                 error="RuntimeError: CUDA failed")
        return fake_result(segment)

    stand_in = ModalMapStandIn(call, containers=3)
    settings = service_settings(tmp_path, first_segment_seconds=4.0, segment_seconds=10.0)
    try:
        with running_service(settings, ModalBackend(stand_in)) as (url, _):
            events = transcribe(url, demo_video)
    finally:
        stand_in.shutdown()

    done = events_named(events, "done")[-1].data
    errors = events_named(events, "error")
    segments = events_named(events, "segment")
    assert done["status"] == "completed"
    assert done["segments_failed"] == [1, 2]
    assert sorted(event.data["segment"] for event in errors) == [1, 2]
    assert all(event.data["code"] == "segment_failed" for event in errors)
    assert "out of memory" in next(e.data["message"] for e in errors if e.data["segment"] == 1)
    assert "CUDA failed" in next(e.data["message"] for e in errors if e.data["segment"] == 2)
    total = done["segments"] + len(done["segments_failed"])
    assert total >= 5
    assert sorted(event.data["index"] for event in segments) == sorted(set(range(total)) - {1, 2})
    assert stand_in.started == total


def test_service_stops_calls_when_client_leaves(tmp_path, demo_video):
    def call(segment: SegmentInput) -> SegmentResult:
        time.sleep(0.5)
        return fake_result(segment)

    stand_in = ModalMapStandIn(call, containers=2)
    backend = ModalBackend(stand_in, in_flight=4)
    settings = service_settings(tmp_path, first_segment_seconds=2.0, segment_seconds=4.0,
                                grace_seconds=0.1)
    try:
        with running_service(settings, backend) as (url, app):
            with httpx.Client(timeout=60) as client, demo_video.open("rb") as handle:
                files = {"file": (demo_video.name, handle)}
                with client.stream("POST", f"{url}/v1/transcriptions", files=files) as response:
                    assert response.status_code == 200
                    seen = []
                    for event in read_events(response):
                        seen.append(event)
                        if len(events_named(seen, "segment")) == 2:
                            break
            job_id = events_named(seen, "job")[0].data["job_id"]
            planned = events_named(seen, "job")[0].data["planned_segments"]
            job = app.state.jobs.jobs[job_id]

            deadline = time.monotonic() + CANCEL_WAIT_SECONDS
            while job.status != "cancelled" and time.monotonic() < deadline:
                time.sleep(0.05)
            started_at_cancel = stand_in.started
            time.sleep(1.0)
            started_later = stand_in.started
    finally:
        stand_in.shutdown()

    assert job.status == "cancelled"
    assert stand_in.closed
    assert started_later == started_at_cancel
    assert planned >= 10
    assert stand_in.started < planned
