"""Measure /healthz latency while the service transcribes several files at once.

    python -m bench.healthz_latency [--jobs 4] [--rate 20] [MEDIA]

Starts the service in a child process (as `tests.helpers.start_server` does), uploads
MEDIA (default: the demo video) `--jobs` times at once, and meanwhile polls /healthz
about `--rate` times a second over one keep-alive connection until the last job ends.
Prints the p50, p90, p99 and maximum latency in milliseconds, then the same numbers
as one JSON line. The target is a p99 under 100 ms: an event loop that stays free
while jobs upload, probe, decode and stream.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.measure import describe_machine, machine_busy_seconds
from tests.helpers import DEMO_VIDEO, read_events, start_server

TARGET_P99_MS = 100.0

JOB_READ_TIMEOUT_SECONDS = 60.0
"""Maximum seconds without a byte on a job's event stream before the benchmark gives up."""


@dataclass
class JobOutcome:
    """The end state of one upload, as its thread recorded it."""

    status: str = "not finished"
    seconds: float | None = None
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)


def run_job(url: str, media: Path, outcome: JobOutcome) -> None:
    """Upload `media` to the native endpoint and read events until `done`. Runs in a thread."""
    started = time.perf_counter()
    timeout = httpx.Timeout(30.0, read=JOB_READ_TIMEOUT_SECONDS)
    try:
        with httpx.Client(timeout=timeout) as client, media.open("rb") as handle:
            with client.stream("POST", f"{url}/v1/transcriptions",
                               files={"file": (media.name, handle)}) as response:
                if response.status_code != 200:
                    outcome.error = (f"HTTP {response.status_code}: "
                                     f"{response.read().decode(errors='replace')[:300]}")
                    return
                for event in read_events(response):
                    if event.name == "done":
                        outcome.status = event.data["status"]
                        break
        outcome.seconds = time.perf_counter() - started
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
    finally:
        outcome.finished.set()


def poll_healthz(url: str, rate: float, until: threading.Event, max_seconds: float) -> list[float]:
    """Request /healthz `rate` times a second until `until` is set or `max_seconds` pass.

    Returns each latency in milliseconds. A poll that finds the previous one late skips
    the missed slots instead of sending a burst.
    """
    interval = 1.0 / rate
    latencies: list[float] = []
    started = time.perf_counter()
    next_slot = started
    with httpx.Client(timeout=10.0) as client:
        while not until.is_set() and time.perf_counter() - started < max_seconds:
            sent = time.perf_counter()
            response = client.get(f"{url}/healthz")
            latencies.append((time.perf_counter() - sent) * 1000)
            response.raise_for_status()
            next_slot += interval
            now = time.perf_counter()
            if next_slot < now:
                next_slot = now + interval - (now - next_slot) % interval
            time.sleep(next_slot - now)
    return latencies


def _set_when_finished(outcomes: list[JobOutcome], event: threading.Event) -> None:
    for outcome in outcomes:
        outcome.finished.wait()
    event.set()


def summarize(latencies: list[float]) -> dict[str, float]:
    """Return p50, p90, p99 and max of `latencies` in milliseconds, rounded to 0.1 ms."""
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "p50_ms": round(cuts[49], 1),
        "p90_ms": round(cuts[89], 1),
        "p99_ms": round(cuts[98], 1),
        "max_ms": round(max(latencies), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("media", nargs="?", type=Path, default=DEMO_VIDEO,
                        help="video or audio file to upload (default: sample_media/demo.mp4)")
    parser.add_argument("--jobs", type=int, default=4, help="uploads running at once (default: 4)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="/healthz requests per second (default: 20)")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="stop polling after this many seconds even if jobs still run "
                             "(default: 600)")
    args = parser.parse_args(argv)
    if not args.media.is_file():
        parser.error(f"{args.media} is not a file")
    if args.jobs < 1 or args.rate <= 0:
        parser.error("--jobs must be at least 1 and --rate above 0")

    with tempfile.TemporaryDirectory(prefix="healthz-latency-") as workdir:
        # Four jobs must run together, not wait in the queue.
        server = start_server(Path(workdir), max_active_jobs=max(4, args.jobs))
        try:
            idle = poll_healthz(server.url, args.rate, threading.Event(), max_seconds=2.0)
            outcomes = [JobOutcome() for _ in range(args.jobs)]
            all_finished = threading.Event()
            threads = [threading.Thread(target=run_job, args=(server.url, args.media, outcome),
                                        daemon=True) for outcome in outcomes]
            busy_before = machine_busy_seconds()
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            threading.Thread(target=_set_when_finished, args=(outcomes, all_finished),
                             daemon=True).start()
            loaded = poll_healthz(server.url, args.rate, all_finished, args.max_seconds)
            wall_seconds = time.perf_counter() - started
            busy_cores = (machine_busy_seconds() - busy_before) / wall_seconds
            for thread in threads:
                thread.join(JOB_READ_TIMEOUT_SECONDS)
        finally:
            server.stop()

    result = {
        "media": args.media.name,
        "jobs": args.jobs,
        "polls": len(loaded),
        "seconds": round(wall_seconds, 1),
        "busy_cores": round(busy_cores, 2),
        "idle": summarize(idle),
        "under_load": summarize(loaded),
        "job_statuses": [outcome.error or outcome.status for outcome in outcomes],
        "job_seconds": [None if outcome.seconds is None else round(outcome.seconds, 1)
                        for outcome in outcomes],
        "machine": describe_machine(),
    }
    under_load = result["under_load"]
    print(f"/healthz while {args.jobs} jobs of {args.media.name} ran: {len(loaded)} requests "
          f"in {wall_seconds:.1f} s, {busy_cores:.2f} cores busy on the machine")
    for name in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
        idle_value = result["idle"][name]
        print(f"  {name[:-3]:>4}: {under_load[name]:7.1f} ms   (idle: {idle_value:.1f} ms)")
    met = under_load["p99_ms"] < TARGET_P99_MS
    print(f"target p99 under {TARGET_P99_MS:g} ms: {'met' if met else 'missed'}")
    print(f"jobs: {', '.join(map(str, result['job_statuses']))}")
    print(json.dumps(result))
    failed = [status for status in result["job_statuses"] if status != "completed"]
    if failed:
        print(f"{len(failed)} of {args.jobs} jobs did not complete", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
