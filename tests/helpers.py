"""Shared helpers for the test suites: a real server process, media makers, an SSE reader."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MEDIA = ROOT / "sample_media"
DEMO_VIDEO = SAMPLE_MEDIA / "demo.mp4"
DEMO_TEXT = SAMPLE_MEDIA / "demo.txt"
SHARED_MEDIA = ROOT.parent / "shared" / "media"
FFMPEG = shutil.which("ffmpeg") or "ffmpeg"

SERVER_START_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """`streamscribe serve` running in a child process on a free loopback port."""

    url: str
    process: subprocess.Popen
    temp_root: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(workdir: Path, **settings: object) -> ServerProcess:
    """Start the service with `STREAMSCRIBE_*` settings and wait until /readyz returns 200."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    temp_root = workdir / "temp"
    env = {**os.environ, "STREAMSCRIBE_TEMP_ROOT": str(temp_root), "PYTHONUNBUFFERED": "1",
           "STREAMSCRIBE_DATABASE": str(workdir / "jobs.sqlite3")}
    for name, value in settings.items():
        env[f"STREAMSCRIBE_{name.upper()}"] = str(value)
    log_path = workdir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--log-level", "DEBUG", "serve", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", process, temp_root, log_path)
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {SERVER_START_SECONDS} s:\n{server.log()}")


@dataclass(frozen=True)
class Event:
    id: str | None
    name: str
    data: dict


def read_events(response: httpx.Response) -> Iterator[Event]:
    """Parse a `text/event-stream` response into events (comments are skipped)."""
    fields: dict[str, list[str]] = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in fields or "event" in fields:
                data = "\n".join(fields.get("data", []))
                yield Event(
                    id=(fields.get("id") or [None])[-1],
                    name=(fields.get("event") or ["message"])[-1],
                    data=json.loads(data) if data else {},
                )
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)


def post_file(client: httpx.Client, url: str, path: Path, *, filename: str | None = None,
              data: dict | None = None) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post(url, files={"file": (filename or path.name, handle)}, data=data or {})


def transcribe(url: str, path: Path, *, filename: str | None = None, data: dict | None = None,
               timeout: float = 300) -> list[Event]:
    """Upload `path` to the native endpoint and return every event up to `done`."""
    with httpx.Client(timeout=timeout) as client, path.open("rb") as handle:
        files = {"file": (filename or path.name, handle)}
        with client.stream("POST", f"{url}/v1/transcriptions", files=files, data=data or {}) as response:
            assert response.status_code == 200, response.read().decode()
            return list(read_events(response))


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly, raising with its output on failure."""
    result = subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed:\n{result.stderr}")


def wrap_in_mp4(audio: Path, output: Path) -> Path:
    """Put `audio` in an MP4 with a still gray picture, as a stand-in for a phone video."""
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:size=160x120:rate=5", "-i", str(audio),
           "-shortest", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(output))
    return output


def files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def job_files(root: Path) -> list[str]:
    """List the files under `root`, skipping folders that the service deletes meanwhile."""
    return [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names]


def assert_no_job_files(root: Path, timeout: float = 5.0) -> None:
    """Assert that `root` contains no files within `timeout` seconds.

    A job's folder is deleted just after its `done` event is sent, so a client that
    has read `done` may still see it for a moment.
    """
    deadline = time.monotonic() + timeout
    while job_files(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job_files(root) == []


IN_PROCESS_START_SECONDS = 60


@contextlib.contextmanager
def running_service(settings, backend=None, store=None) -> Iterator[tuple[str, object]]:
    """Serve `create_app(settings, backend, store)` with uvicorn in this process on a free loopback port.

    Tests use it to put a counting or failing backend behind the real HTTP service.
    """
    from service.app import create_app

    app = create_app(settings, backend=backend, store=store)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + IN_PROCESS_START_SECONDS
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the service on {url} did not become ready")
            time.sleep(0.1)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
