"""Run the service as a benchmark subject: start it, upload a video, follow its events.

A `ServiceConfig` names a server: the `STREAMSCRIBE_*` settings by field name, plus
`env.NAME=VALUE`, which sets the server's environment variable NAME (for example
`env.MALLOC_ARENA_MAX=2`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.measure import BEAM_SIZE, COMPUTE_TYPE, resident_bytes
from tests.helpers import ServerProcess, read_events, start_server

ENV_PREFIX = "env."
"""A --service setting named env.NAME sets the server's environment variable NAME as is."""

BENCHMARK_SETTINGS = {"model": "bundled", "device": "cpu", "compute_type": COMPUTE_TYPE,
                      "beam_size": str(BEAM_SIZE)}
"""Settings every benchmark server gets unless its configuration overrides them."""

CANCEL_TIMEOUT_SECONDS = 60
SERVICE_READ_TIMEOUT_SECONDS = 300
"""Maximum wait for the next line of the event stream; the server pings every 15 s."""


@dataclass(frozen=True)
class ServiceConfig:
    """A labelled server configuration, from a `--service LABEL:NAME=VALUE,...` option."""

    label: str
    settings: dict[str, str]


def parse_service(text: str) -> ServiceConfig:
    """Parse `LABEL:NAME=VALUE,...` for argparse; setting names are lower-cased except env.NAME.

    A value that contains a comma writes it as `\\,` (for example `env.MALLOC_CONF=a:1\\,b:2`).
    """
    label, separator, spec = text.partition(":")
    if not separator or not label or label in ("plain", "batched"):
        raise argparse.ArgumentTypeError(
            f"--service takes LABEL:NAME=VALUE,... with a label other than plain or batched, got {text!r}"
        )
    settings = {}
    for item in filter(None, re.split(r"(?<!\\),", spec)):
        item = item.replace("\\,", ",")
        name, equals, value = item.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"--service setting {item!r} is not NAME=VALUE")
        name = name.strip()
        settings[name if name.startswith(ENV_PREFIX) else name.lower()] = value.strip()
    return ServiceConfig(label, settings)


def add_service_options(parser: argparse.ArgumentParser, before_each: str) -> None:
    """Add the --service and --idle-cores options that the service benchmarks share."""
    parser.add_argument("--service", dest="services", type=parse_service, action="append",
                        metavar="LABEL:NAME=VALUE,...",
                        help="a service configuration, as in bench.compare (default: the server's defaults)")
    parser.add_argument("--idle-cores", type=float, default=0.3,
                        help=f"before each {before_each}, wait until other processes use fewer cores than "
                             "this, up to 15 minutes (default: 0.3; 0 disables the wait)")


def start_service(workdir: Path, config: ServiceConfig) -> ServerProcess:
    """Start a server for `config` in a child process and wait until it is ready."""
    settings = {**BENCHMARK_SETTINGS, **config.settings}
    workdir.mkdir(parents=True, exist_ok=True)
    variables = {name[len(ENV_PREFIX):]: settings.pop(name) for name in list(settings)
                 if name.startswith(ENV_PREFIX)}
    with environment_variables(variables):
        return start_server(workdir, **settings)


@dataclass
class StreamRun:
    """The outcome of one upload to the native endpoint, with client-side times from the upload start."""

    job_id: str | None = None
    job_seconds: float | None = None
    first_segment_seconds: float | None = None
    total_seconds: float = 0.0
    done: dict | None = None
    errors: list[dict] = field(default_factory=list)
    segment_lengths: list[float] = field(default_factory=list)


def upload_video(url: str, video: Path, *, stop_at_first_segment: bool = False) -> StreamRun:
    """Upload the video and read its event stream until `done`, or until the first segment.

    With `stop_at_first_segment`, the job is cancelled through its cancel endpoint and
    this returns once the job has stopped, so the next upload gets the whole machine.
    """
    run = StreamRun()
    timeout = httpx.Timeout(30.0, read=SERVICE_READ_TIMEOUT_SECONDS)
    started = time.perf_counter()
    with httpx.Client(timeout=timeout) as client:
        with video.open("rb") as handle:
            files = {"file": (video.name, handle, "video/mp4")}
            with client.stream("POST", f"{url}/v1/transcriptions", files=files) as response:
                if response.status_code != 200:
                    raise RuntimeError(
                        f"upload of {video.name} failed with HTTP {response.status_code}: "
                        f"{response.read().decode(errors='replace')}"
                    )
                for event in read_events(response):
                    elapsed = time.perf_counter() - started
                    if event.name == "job" and run.job_seconds is None:
                        run.job_seconds = elapsed
                        run.job_id = event.data["job_id"]
                    elif event.name == "segment":
                        if run.first_segment_seconds is None:
                            run.first_segment_seconds = elapsed
                        run.segment_lengths.append(event.data["end"] - event.data["start"])
                        if stop_at_first_segment:
                            break
                    elif event.name == "error":
                        run.errors.append(event.data)
                    elif event.name == "done":
                        run.done = event.data
                        break
        run.total_seconds = time.perf_counter() - started
        if stop_at_first_segment and run.job_id is not None and run.done is None:
            _cancel_and_wait(client, url, run.job_id)
    return run


def _cancel_and_wait(client: httpx.Client, url: str, job_id: str) -> None:
    client.post(f"{url}/v1/jobs/{job_id}/cancel").raise_for_status()
    deadline = time.monotonic() + CANCEL_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        status = client.get(f"{url}/v1/jobs/{job_id}").json().get("status")
        if status in ("cancelled", "completed", "failed"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"job {job_id} did not stop within {CANCEL_TIMEOUT_SECONDS} s of its cancel request")


class RssSampler:
    """Samples a process's resident memory (VmRSS) in a thread, every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rss = resident_bytes(self.pid)
            except (OSError, KeyError):
                return
            self.samples.append((round(time.perf_counter() - self._started, 2), rss))


@contextlib.contextmanager
def environment_variables(variables: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, so a child process started in it inherits them."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
