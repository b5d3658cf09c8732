"""Faults against a real service: oversized uploads, client disconnects, capacity,
failing workers, a hanging ffmpeg, a full temporary disk, API keys, CORS and path
traversal.

Tests that inject failures into the Whisper workers run the app in this process, with
`FaultInjectingTranscriber` wrapping the transcriber of a `LocalBackend`. The other
tests start `streamscribe serve` as a child process.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from gpu_workers.segments import SegmentInput, SegmentResult
from gpu_workers.transcriber import ModelConfig, SegmentTranscriber
from service.app import create_app
from service.backends.local import LocalBackend
from service.settings import Settings
from tests.helpers import (
    Event,
    ServerProcess,
    assert_no_job_files,
    ffmpeg,
    free_port,
    job_files,
    read_events,
    start_server,
)

UPLOAD_LIMIT = 5 * 1024 * 1024
"""`max_upload_bytes` for the size-limit tests."""

MiB = 1024 * 1024
BOUNDARY = "streamscribe-test-boundary"
API_KEY = "test-key-" + secrets.token_hex(8)
ALLOWED_ORIGIN = "http://app.example.test"


# --- Media ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, demo_video: Path) -> dict[str, Path]:
    """Short inputs cut from the demo video, plus one second of a plain tone."""
    folder = tmp_path_factory.mktemp("media")
    clips = {
        "speech_20s": folder / "speech_20s.wav",
        "speech_12s": folder / "speech_12s.wav",
        "tone_1s": folder / "tone_1s.wav",
    }
    ffmpeg("-i", str(demo_video), "-t", "20", "-vn", "-ac", "1", "-ar", "16000",
           str(clips["speech_20s"]))
    ffmpeg("-i", str(demo_video), "-t", "12", "-vn", "-ac", "1", "-ar", "16000",
           str(clips["speech_12s"]))
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-ar", "16000",
           str(clips["tone_1s"]))
    return clips


# --- Processes and polling ------------------------------------------------------------


def processes_matching(command_part: str, environment_part: str | None = None) -> list[str]:
    """Return 'PID: command line' for each live process whose command line contains
    `command_part` or whose environment contains `environment_part`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        environ = b""
        if environment_part:
            with contextlib.suppress(OSError):
                environ = (entry / "environ").read_bytes()
        if command_part.encode() in cmdline or (
                environment_part and environment_part.encode() in environ):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def proc_number(pid: int, file: str, name: str) -> int:
    """Return field `name` of /proc/PID/`file` ("status" values in kB become bytes)."""
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            parts = value.split()
            return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    raise KeyError(f"/proc/{pid}/{file} has no field {name!r}")


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll `condition` every `interval` seconds; return True once it is true, or False
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def job_status(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()


def wait_for_finish(url: str, job_id: str, timeout: float) -> dict:
    """Poll a job until it is completed, failed or cancelled, and return its status."""
    status: dict = {}

    def finished() -> bool:
        nonlocal status
        status = job_status(url, job_id)
        return status["status"] in ("completed", "failed", "cancelled")

    assert wait_until(finished, timeout), f"job {job_id} did not finish in {timeout} s: {status}"
    return status


def assert_json_error(response: httpx.Response, status_code: int) -> dict:
    """Assert that `response` is a JSON error with this status and a message, and return
    its `error` object."""
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["message"], response.text
    return error


# --- A service in this process, with faults injected into the workers ----------------


class FaultInjectingTranscriber:
    """A `SegmentTranscriber` stand-in that records and delays each call and fails chosen
    segments.

    Every call records the segment index, then sleeps `delay` seconds in the pool
    thread. Segments in `failing` come back as a result with `error` set, the way a
    worker reports a failure it caught. Segments in `raising` raise, which the local
    pool yields as a bare exception that names no segment. The rest go to the real
    transcriber.
    """

    def __init__(self, *, delay: float = 0.0, failing: frozenset[int] = frozenset(),
                 raising: frozenset[int] = frozenset()) -> None:
        self.delay = delay
        self.failing = failing
        self.raising = raising
        self.calls: list[int] = []
        self.real: SegmentTranscriber | None = None
        self._lock = threading.Lock()

    def load(self, config: ModelConfig) -> FaultInjectingTranscriber:
        """Load the real model; passed to `LocalBackend` as its transcriber factory."""
        self.real = SegmentTranscriber(config)
        return self

    def transcribe(self, segment: SegmentInput) -> SegmentResult:
        with self._lock:
            self.calls.append(segment.index)
        time.sleep(self.delay)
        if segment.index in self.raising:
            raise RuntimeError(f"injected crash on segment {segment.index}")
        if segment.index in self.failing:
            return SegmentResult(index=segment.index, start=segment.offset, end=segment.end,
                                 error=f"injected failure on segment {segment.index}")
        assert self.real is not None
        return self.real.transcribe(segment)

    def transcribe_batch(self, segments: list[SegmentInput]) -> list[SegmentResult]:
        """Transcribe each segment in turn, so a raising segment fails the whole call."""
        return [self.transcribe(segment) for segment in segments]

    def call_count(self) -> int:
        with self._lock:
            return len(self.calls)


def local_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for an in-process service, ignoring any STREAMSCRIBE_* variables."""
    return Settings.from_env(environ={}, host="127.0.0.1", port=free_port(),
                             temp_root=tmp_path / "temp", database=tmp_path / "jobs.sqlite3",
                             **overrides)


@dataclass
class InProcessService:
    url: str
    settings: Settings
    transcriber: FaultInjectingTranscriber


@contextlib.contextmanager
def in_process_service(settings: Settings,
                       transcriber: FaultInjectingTranscriber) -> Iterator[InProcessService]:
    """Run the app with `transcriber` in the local pool, on uvicorn in a background thread."""
    config = ModelConfig(model=settings.model, device=settings.device,
                         compute_type=settings.compute_type,
                         cpu_threads=settings.threads_per_worker, num_workers=settings.workers)
    backend = LocalBackend(config, settings.workers, transcriber_factory=transcriber.load)
    app = create_app(settings, backend=backend)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        if not wait_until(lambda: ready() or not thread.is_alive(), 120, 0.2) or not ready():
            raise RuntimeError("the in-process service did not become ready")
        yield InProcessService(url, settings, transcriber)
    finally:
        server.should_exit = True
        thread.join(30)


@dataclass
class StreamRecord:
    """What one streaming upload received, each event with its arrival time."""

    status_code: int | None = None
    body: str = ""
    events: list[tuple[float, Event]] = field(default_factory=list)
    error: BaseException | None = None
    # Set once the server has admitted the job (its `job` event) or rejected the upload.
    responded: threading.Event = field(default_factory=threading.Event)

    def first(self, name: str) -> tuple[float, Event]:
        return next(item for item in self.events if item[1].name == name)

    def named(self, name: str) -> list[Event]:
        return [event for _, event in self.events if event.name == name]


def stream_upload(url: str, path: Path, record: StreamRecord, data: dict | None = None) -> None:
    """Upload `path` to the native endpoint and record every event. Runs in a thread."""
    try:
        with httpx.Client(timeout=120) as client, path.open("rb") as handle:
            with client.stream("POST", f"{url}/v1/transcriptions",
                               files={"file": (path.name, handle)}, data=data or {}) as response:
                record.status_code = response.status_code
                if response.status_code != 200:
                    record.body = response.read().decode()
                    return
                for event in read_events(response):
                    record.events.append((time.monotonic(), event))
                    if event.name == "job":
                        record.responded.set()
    except BaseException as error:  # noqa: BLE001 - reported by the test that started the thread
        record.error = error
    finally:
        record.responded.set()


def start_stream(url: str, path: Path,
                 data: dict | None = None) -> tuple[StreamRecord, threading.Thread]:
    """Start `stream_upload` in a thread and wait until the upload is accepted or rejected."""
    record = StreamRecord()
    thread = threading.Thread(target=stream_upload, args=(url, path, record, data), daemon=True)
    thread.start()
    assert record.responded.wait(60), f"no response to the upload of {path.name}"
    assert record.error is None, repr(record.error)
    assert record.status_code == 200, record.body
    return record, thread


# --- Upload size limit -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("small-limit"), max_upload_bytes=UPLOAD_LIMIT)
    yield server
    server.stop()


def multipart_head(filename: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()


MULTIPART_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def raw_exchange(url: str, request: bytes, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Send `request` bytes as they are, then read one HTTP response from the socket.

    Whatever body the request head announces and `request` leaves out is never sent,
    so a response proves that the server did not wait for it.
    """
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_content_length_over_limit_rejected_unread(small_limit_server):
    server = small_limit_server
    size = 3 * 1024**3
    head = (f"POST /v1/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(multipart_head('huge.mp4')) + size + len(MULTIPART_TAIL)}\r\n"
            "\r\n").encode()

    started = time.monotonic()
    status, headers, body = raw_exchange(server.url, head + multipart_head("huge.mp4"), timeout=10)

    assert time.monotonic() - started < 5
    assert status == 413, body
    assert headers["content-type"].startswith("application/json")
    assert b"upload_too_large" in body
    assert_no_job_files(server.temp_root)


def test_sparse_3gb_upload_rejected_at_once(small_limit_server, tmp_path):
    server = small_limit_server
    pid = server.process.pid
    huge = tmp_path / "huge.mp4"
    with huge.open("wb") as handle:
        handle.truncate(3 * 1024**3)
    rss_before = proc_number(pid, "status", "VmRSS")
    read_before = proc_number(pid, "io", "rchar")

    started = time.monotonic()
    with huge.open("rb") as handle:
        response = httpx.post(f"{server.url}/v1/transcriptions",
                              files={"file": ("huge.mp4", handle)}, timeout=120)
    elapsed = time.monotonic() - started
    server_read = proc_number(pid, "io", "rchar") - read_before
    rss_growth = proc_number(pid, "status", "VmRSS") - rss_before

    error = assert_json_error(response, 413)
    assert error["code"] == "upload_too_large"
    assert server_read < 64 * MiB, f"the server read {server_read / MiB:.0f} MiB of a rejected body"
    assert elapsed < 5, f"the 413 took {elapsed:.1f} s"
    assert rss_growth < 32 * MiB, f"server memory grew by {rss_growth / MiB:.0f} MiB"
    assert_no_job_files(server.temp_root)


def test_raw_chunked_upload_rejected_past_limit(small_limit_server):
    server = small_limit_server
    head = (f"POST /v1/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    payload = multipart_head("stream.mp4") + bytes(UPLOAD_LIMIT + MiB)
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(piece), piece)
        for piece in (payload[i:i + 64 * 1024] for i in range(0, len(payload), 64 * 1024))
    )

    # The body stops one MiB past the limit, with no terminating chunk. Only a server
    # that rejects the upload as soon as the limit is passed can respond.
    status, headers, body = raw_exchange(server.url, head + chunks, timeout=10)

    assert status == 413, body
    assert headers["content-type"].startswith("application/json")
    assert b"upload_too_large" in body
    assert_no_job_files(server.temp_root)


def test_chunked_upload_stops_at_limit(small_limit_server):
    server = small_limit_server
    pid = server.process.pid
    offered = 64 * MiB
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield multipart_head("stream.mp4")
        while sent < offered:
            sent += 64 * 1024
            yield bytes(64 * 1024)
        yield MULTIPART_TAIL

    rss_before = proc_number(pid, "status", "VmRSS")
    read_before = proc_number(pid, "io", "rchar")
    response = httpx.post(f"{server.url}/v1/transcriptions", content=body(), timeout=60,
                          headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    server_read = proc_number(pid, "io", "rchar") - read_before
    rss_growth = proc_number(pid, "status", "VmRSS") - rss_before

    error = assert_json_error(response, 413)
    assert error["code"] == "upload_too_large"
    assert "content-length" not in response.request.headers
    assert sent < offered, "the client had to send the whole body to get the 413"
    assert server_read < 4 * UPLOAD_LIMIT, (
        f"the server read {server_read / MiB:.0f} MiB of a body rejected at "
        f"{UPLOAD_LIMIT / MiB:.0f} MiB")
    assert rss_growth < 32 * MiB, f"server memory grew by {rss_growth / MiB:.0f} MiB"
    assert_no_job_files(server.temp_root)


# --- Client disconnect -----------------------------------------------------------------


def test_disconnect_cancels_segments_and_ffmpeg(tmp_path, demo_video):
    delay = 1.0
    settings = local_settings(tmp_path, grace_seconds=0.5, workers=1, first_segment_seconds=5.0,
                              segment_seconds=5.0)
    with in_process_service(settings, FaultInjectingTranscriber(delay=delay)) as service:
        with httpx.Client(timeout=60) as client, demo_video.open("rb") as handle:
            with client.stream("POST", f"{service.url}/v1/transcriptions",
                               files={"file": ("demo.mp4", handle)}) as response:
                events = read_events(response)
                job = next(events)
                job_id = job.data["job_id"]
                planned = job.data["planned_segments"]
                folder = str((settings.temp_root / f"job-{job_id}").resolve())
                ffmpeg_started = wait_until(lambda: processes_matching(folder), 10)
                next(event for event in events if event.name == "segment")
                calls_at_disconnect = service.transcriber.call_count()
                # The decoder's bounded queue holds ffmpeg blocked on its pipe, so it
                # is still running when the client leaves.
                ffmpeg_alive_at_disconnect = bool(processes_matching(folder))

        status = wait_for_finish(service.url, job_id, timeout=15)
        folder_removed = wait_until(lambda: not Path(folder).exists(), 5)
        leftover_processes = processes_matching(folder)
        calls_after_cancel = service.transcriber.call_count()
        time.sleep(3 * delay)
        calls_later = service.transcriber.call_count()

    assert planned >= 10
    assert ffmpeg_started
    assert ffmpeg_alive_at_disconnect
    assert status["status"] == "cancelled"
    assert folder_removed, f"{folder} still exists"
    assert leftover_processes == []
    assert calls_later == calls_after_cancel
    # Only calls that the pool starts during the 0.5 s grace period may follow the
    # disconnect: with 1 s a call, at most two.
    assert calls_after_cancel <= calls_at_disconnect + 2
    assert calls_after_cancel < planned
    assert_no_job_files(settings.temp_root)


# --- Capacity --------------------------------------------------------------------------


def test_capacity_503_then_queue_drains(tmp_path, media):
    settings = local_settings(tmp_path, workers=1, max_active_jobs=1, max_queued_jobs=1,
                              first_segment_seconds=5.0, segment_seconds=5.0)
    clip = media["speech_20s"]
    with in_process_service(settings, FaultInjectingTranscriber(delay=1.0)) as service:
        first, first_thread = start_stream(service.url, clip)
        second, second_thread = start_stream(service.url, clip)
        first_id = first.first("job")[1].data["job_id"]
        second_id = second.first("job")[1].data["job_id"]
        second_status_while_first_runs = job_status(service.url, second_id)["status"]
        folders_while_full = sorted(path.name for path in settings.temp_root.glob("job-*"))

        with clip.open("rb") as handle:
            busy_response = httpx.post(f"{service.url}/v1/transcriptions",
                                       files={"file": (clip.name, handle)}, timeout=60)

        first_thread.join(120)
        second_thread.join(120)
        with clip.open("rb") as handle:
            after_drain = httpx.post(f"{service.url}/v1/audio/transcriptions",
                                     files={"file": (clip.name, handle)}, timeout=120)

    error = assert_json_error(busy_response, 503)
    assert error["code"] == "server_busy"
    assert busy_response.headers["retry-after"].isdigit()
    assert folders_while_full == sorted([f"job-{first_id}", f"job-{second_id}"])
    assert second_status_while_first_runs == "queued"
    for record in (first, second):
        assert record.error is None, repr(record.error)
        assert record.named("done")[0].data["status"] == "completed"
        assert record.named("done")[0].data["text"]
    first_done_at = first.first("done")[0]
    second_started_at = second.first("segment")[0]
    assert second_started_at > first_done_at
    assert after_drain.status_code == 200, after_drain.text
    assert after_drain.json()["text"]
    assert_no_job_files(settings.temp_root)


def test_queued_jobs_run_in_order(tmp_path, media):
    settings = local_settings(tmp_path, workers=1, max_active_jobs=1, max_queued_jobs=3)
    clip = media["speech_12s"]
    with in_process_service(settings, FaultInjectingTranscriber(delay=0.5)) as service:
        started = [start_stream(service.url, clip) for _ in range(4)]
        for _, thread in started:
            thread.join(180)
    records = [record for record, _ in started]

    for record in records:
        assert record.error is None, repr(record.error)
        assert record.named("done")[0].data["status"] == "completed"
    for earlier, later in zip(records, records[1:]):
        assert later.first("segment")[0] > earlier.first("done")[0]
    assert_no_job_files(settings.temp_root)


# --- A failing worker --------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["error_result", "raised_exception"])
def test_failed_segment_reported_rest_complete(tmp_path, media, failure):
    failed_index = 1
    injected = frozenset({failed_index})
    transcriber = FaultInjectingTranscriber(
        failing=injected if failure == "error_result" else frozenset(),
        raising=injected if failure == "raised_exception" else frozenset(),
    )
    settings = local_settings(tmp_path, first_segment_seconds=5.0, segment_seconds=5.0)
    with in_process_service(settings, transcriber) as service:
        record = StreamRecord()
        stream_upload(service.url, media["speech_20s"], record)
        job_id = record.first("job")[1].data["job_id"]
        status = job_status(service.url, job_id)
        text_download = httpx.get(f"{service.url}/v1/jobs/{job_id}/transcript.txt").text

    assert record.error is None, repr(record.error)
    errors = record.named("error")
    segments = record.named("segment")
    done = record.named("done")
    assert len(errors) == 1, errors
    assert errors[0].data["segment"] == failed_index
    assert errors[0].data["code"] == "segment_failed"
    assert len(segments) >= 2
    assert failed_index not in {event.data["index"] for event in segments}
    transcribed = [event.data["index"] for event in segments]
    assert sorted([*transcribed, failed_index]) == sorted(transcriber.calls)
    assert len(done) == 1
    assert record.events[-1][1].name == "done"
    assert done[0].data["status"] == "completed"
    assert done[0].data["segments_failed"] == [failed_index]
    expected_text = " ".join(
        event.data["text"] for event in sorted(segments, key=lambda event: event.data["start"])
        if event.data["text"])
    assert expected_text
    assert done[0].data["text"] == expected_text
    assert status["status"] == "completed"
    assert status["segments_failed"] == [failed_index]
    assert text_download.strip() == expected_text
    assert_no_job_files(settings.temp_root)


# --- A hanging ffmpeg ----------------------------------------------------------------------


HANGING_FFMPEG = {
    # One process that never writes a byte.
    "single_process": "#!{python}\nimport time\ntime.sleep(3600)\n",
    # A wrapper script whose child inherits the stdout pipe, as the child of a shell
    # wrapper around ffmpeg would. The marker in its environment identifies the child.
    "wrapper_with_child": "#!/bin/sh\nexport {marker_name}={marker}\nsleep 3600\n",
}


@pytest.mark.parametrize("kind", sorted(HANGING_FFMPEG))
def test_hanging_ffmpeg_times_out(tmp_path, media, kind):
    marker = "hang-" + secrets.token_hex(8)
    script = tmp_path / "ffmpeg-that-hangs"
    script.write_text(HANGING_FFMPEG[kind].format(python=sys.executable, marker=marker,
                                                  marker_name="FAKE_FFMPEG_MARKER"))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    server = start_server(tmp_path / "server", ffmpeg=script, decode_stall_seconds=2)
    events: list[Event] = []
    try:
        started = time.monotonic()
        # A read timeout under the 15 s keep-alive interval ends a stream that hangs.
        with httpx.Client(timeout=httpx.Timeout(30, read=10)) as client, \
                media["tone_1s"].open("rb") as handle:
            with client.stream("POST", f"{server.url}/v1/transcriptions",
                               files={"file": ("tone.wav", handle)}) as response:
                with contextlib.suppress(httpx.ReadTimeout):
                    events.extend(read_events(response))
        elapsed = time.monotonic() - started
        no_processes_left = wait_until(lambda: not processes_matching(str(script), marker), 5)
        leftovers = processes_matching(str(script), marker)
    finally:
        server.stop()
        for line in processes_matching(str(script), marker):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)

    names = [event.name for event in events]
    assert names[-1:] == ["done"], f"the stream ended without done: {names}"
    errors = [event.data for event in events if event.name == "error"]
    assert [error["code"] for error in errors] == ["decode_timeout"]
    assert events[-1].data["status"] == "failed"
    assert elapsed < 15
    assert no_processes_left, leftovers
    assert_no_job_files(server.temp_root)


def test_slow_workers_no_decode_timeout(tmp_path, demo_video):
    # With one worker taking 2.5 s a segment, the decoder's queue fills and its thread
    # waits on the workers for longer than the stall limit, and the whole job outlasts
    # the total limit. Neither wait is ffmpeg's, so neither should end the decode.
    settings = local_settings(tmp_path, workers=1, decode_stall_seconds=2.0,
                              decode_timeout_seconds=6.0, segment_seconds=10.0)
    transcriber = FaultInjectingTranscriber(delay=2.5)
    with in_process_service(settings, transcriber) as service:
        record = StreamRecord()
        stream_upload(service.url, demo_video, record)

    assert record.error is None, repr(record.error)
    assert [event.data for event in record.named("error")] == []
    done = record.named("done")[0].data
    assert done["status"] == "completed"
    assert done["truncated"] is False
    assert done["segments"] == len(transcriber.calls)
    assert done["segments"] >= 6
    assert record.events[-1][0] - record.events[0][0] > settings.decode_timeout_seconds


# --- A full temporary disk -------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """Mount a 2 MB tmpfs for the test and unmount it after; skip where mounting fails."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def test_full_temp_disk_gives_clean_error(tmp_path, small_tmpfs):
    server = start_server(tmp_path / "server", temp_root=small_tmpfs)
    try:
        upload = os.urandom(6 * MiB)
        response = httpx.post(f"{server.url}/v1/transcriptions",
                              files={"file": ("big.wav", upload)}, timeout=60)
        healthy = httpx.get(f"{server.url}/healthz", timeout=10).status_code
        left = job_files(small_tmpfs)
    finally:
        server.stop()

    assert response.status_code in (503, 507), response.text
    error = assert_json_error(response, response.status_code)
    assert error["code"] == "insufficient_storage"
    assert healthy == 200
    assert left == []


# --- API key, CORS and path traversal ----------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("guarded"), api_key=API_KEY,
                          cors_origins=ALLOWED_ORIGIN)
    yield server
    server.stop()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def finished_job_id(guarded_server, media) -> str:
    with httpx.Client(timeout=120) as client, media["tone_1s"].open("rb") as handle:
        with client.stream("POST", f"{guarded_server.url}/v1/transcriptions", headers=AUTH,
                           files={"file": ("tone.wav", handle)}) as response:
            assert response.status_code == 200, response.read().decode()
            events = list(read_events(response))
    assert events[-1].name == "done"
    return events[0].data["job_id"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}",
                                           "Bearer", f"Bearer {API_KEY}x"])
def test_api_key_rejects_bad_credentials(guarded_server, media, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    with media["tone_1s"].open("rb") as handle:
        upload = httpx.post(f"{guarded_server.url}/v1/transcriptions", headers=headers,
                            files={"file": ("tone.wav", handle)}, timeout=30)
    with media["tone_1s"].open("rb") as handle:
        openai_upload = httpx.post(f"{guarded_server.url}/v1/audio/transcriptions",
                                   headers=headers, files={"file": ("tone.wav", handle)},
                                   timeout=30)
    status = httpx.get(f"{guarded_server.url}/v1/jobs/{'0' * 32}", headers=headers, timeout=10)

    for response in (upload, openai_upload, status):
        error = assert_json_error(response, 401)
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_api_key_accepts_right_token(guarded_server, media, finished_job_id):
    status = httpx.get(f"{guarded_server.url}/v1/jobs/{finished_job_id}", headers=AUTH, timeout=10)
    with media["tone_1s"].open("rb") as handle:
        openai_upload = httpx.post(f"{guarded_server.url}/v1/audio/transcriptions",
                                   headers=AUTH, files={"file": ("tone.wav", handle)},
                                   timeout=60)

    assert status.status_code == 200, status.text
    assert status.json()["status"] == "completed"
    assert openai_upload.status_code == 200, openai_upload.text
    assert "text" in openai_upload.json()
    assert_no_job_files(guarded_server.temp_root)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_open_without_api_key(guarded_server, path):
    assert httpx.get(f"{guarded_server.url}{path}", timeout=10).status_code == 200


def test_cors_preflight_allows_configured_origin(guarded_server):
    response = httpx.options(f"{guarded_server.url}/v1/transcriptions", timeout=10, headers={
        "Origin": ALLOWED_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })

    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


def test_cors_preflight_rejects_other_origin(guarded_server):
    response = httpx.options(f"{guarded_server.url}/v1/transcriptions", timeout=10, headers={
        "Origin": "http://elsewhere.example.test",
        "Access-Control-Request-Method": "POST",
    })

    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


def test_cors_simple_request_echoes_origin(guarded_server):
    response = httpx.get(f"{guarded_server.url}/healthz", headers={"Origin": ALLOWED_ORIGIN},
                         timeout=10)

    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


TRAVERSAL_PATHS = [
    "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
    "/v1/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/v1/jobs/../../etc/passwd",
    "/v1/jobs/..%5c..%5cetc%5cpasswd",
    "/v1/jobs/%00",
    "/v1/jobs/{job}/transcript.%2e%2e",
    "/v1/jobs/{job}/transcript.%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/v1/jobs/{job}/transcript.txt%2f..%2f..%2f..%2fetc%2fpasswd",
    "/v1/jobs/{job}%2f..%2f..%2fetc%2fpasswd/transcript.txt",
    "/v1/jobs/{job}/../../../../etc/passwd",
    "/v1/jobs/{job}/events/..%2f..%2f..%2fetc%2fpasswd",
    "/..%2f..%2f..%2fetc%2fpasswd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/../../../etc/passwd",
    "/app.js/..%2f..%2f..%2fpyproject.toml",
    "/%2e%2e/pyproject.toml",
]


@pytest.mark.parametrize("template", TRAVERSAL_PATHS)
def test_path_traversal_gives_404_json(guarded_server, finished_job_id, template):
    path = template.format(job=finished_job_id)
    parts = urlsplit(guarded_server.url)
    # http.client sends the path as written, while httpx would remove the dot segments.
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", path, headers=AUTH)
        response = connection.getresponse()
        body = response.read()
        content_type = response.getheader("content-type", "")
    finally:
        connection.close()

    assert response.status == 404, (path, body[:300])
    assert content_type.startswith("application/json"), (path, content_type)
    assert b'"message"' in body
    assert b"root:" not in body
    assert b"[project]" not in body


@pytest.mark.parametrize("resume", ["last_event_id", "after_done", "after_far_past_end"])
def test_resume_past_done_ends_at_once(guarded_server, finished_job_id, resume):
    url = f"{guarded_server.url}/v1/jobs/{finished_job_id}/events"
    with httpx.Client(timeout=10) as client:
        with client.stream("GET", url, headers=AUTH) as response:
            done_id = int(list(read_events(response))[-1].id)
    requests = {
        "last_event_id": ({"Last-Event-ID": str(done_id)}, {}),
        "after_done": ({}, {"after": done_id}),
        "after_far_past_end": ({}, {"after": 10**9}),
    }
    headers, params = requests[resume]

    # Keep-alive pings come every 15 s, so a stream that never ends trips the 5 s
    # read timeout before its first ping.
    with httpx.Client(timeout=httpx.Timeout(10, read=5)) as client:
        with client.stream("GET", url, headers={**AUTH, **headers}, params=params) as response:
            try:
                events = list(read_events(response))
            except httpx.ReadTimeout:
                pytest.fail("the event stream did not end after the job's last event")

    assert response.status_code == 200
    assert events == []


def test_negative_after_replays_from_start(guarded_server, finished_job_id):
    url = f"{guarded_server.url}/v1/jobs/{finished_job_id}/events"
    with httpx.Client(timeout=httpx.Timeout(10, read=5)) as client:
        with client.stream("GET", url, headers=AUTH) as response:
            everything = list(read_events(response))
        with client.stream("GET", url, headers=AUTH, params={"after": -2}) as response:
            replayed = list(read_events(response))

    assert [event.id for event in replayed] == [event.id for event in everything]
    assert replayed[0].name == "job"


def test_guarded_server_leaves_no_job_files(guarded_server, finished_job_id):
    assert_no_job_files(guarded_server.temp_root)
