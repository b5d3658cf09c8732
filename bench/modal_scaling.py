"""Measure how the Modal backend's job time scales with the number of GPU containers.

The GPU side is `ModalMapStandIn` from the backend's tests, whose every call takes a
fixed `--latency` on one of C "containers", so the ideal job time is
latency × ceil(segments / C). Everything else is real: the service from
`create_app` behind uvicorn on 127.0.0.1, the upload over HTTP, ffprobe, ffmpeg
decoding and the pause splitter, on a speech video from `bench.make_media`. For each C
it prints the segments sent, the ideal and measured job times, and the time the
service adds per segment:

    python -m bench.modal_scaling --minutes 10 --latency 1.0 --containers 1,2,4,8,16

Measured job time is the `elapsed_seconds` of the `done` event: from the job's start
(upload stored and probed) to its last segment. The upload and probe are shown apart.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.make_media import build_media
from bench.measure import describe_machine
from gpu_workers.segments import SegmentInput, SegmentResult
from service.backends.modal import ModalBackend
from service.settings import Settings
from tests.helpers import read_events
from tests.helpers import running_service
from tests.modal_stand_in import ModalMapStandIn, fake_result


@dataclass(frozen=True)
class ScalingRun:
    containers: int
    segments: int
    ideal_seconds: float
    job_seconds: float
    request_seconds: float
    first_segment_seconds: float

    @property
    def overhead_per_segment(self) -> float:
        return (self.job_seconds - self.ideal_seconds) / self.segments


def measure(video: Path, containers: int, latency: float, workdir: Path) -> ScalingRun:
    """Transcribe `video` once through the service with `containers` stand-in containers."""

    def call(segment: SegmentInput) -> SegmentResult:
        time.sleep(latency)
        return fake_result(segment)

    stand_in = ModalMapStandIn(call, containers)
    settings = Settings(temp_root=workdir / "temp", database=workdir / "jobs.sqlite3")
    try:
        with running_service(settings, ModalBackend(stand_in)) as (url, _):
            done, request_seconds, first_segment_seconds = _stream_job(url, video)
    finally:
        stand_in.shutdown()

    if done["status"] != "completed" or done["segments_failed"]:
        raise RuntimeError(f"the job did not complete cleanly: {done}")
    segments = done["segments"]
    return ScalingRun(
        containers=containers,
        segments=segments,
        ideal_seconds=latency * math.ceil(segments / containers),
        job_seconds=done["elapsed_seconds"],
        request_seconds=request_seconds,
        first_segment_seconds=first_segment_seconds,
    )


def _stream_job(url: str, video: Path) -> tuple[dict, float, float]:
    """Upload `video`; return the `done` data, the request's seconds and the first segment's."""
    first_segment = math.nan
    started = time.perf_counter()
    with httpx.Client(timeout=600) as client, video.open("rb") as handle:
        files = {"file": (video.name, handle)}
        with client.stream("POST", f"{url}/v1/transcriptions", files=files) as response:
            if response.status_code != 200:
                raise RuntimeError(f"upload failed with {response.status_code}: "
                                   f"{response.read().decode()}")
            for event in read_events(response):
                if event.name == "segment" and math.isnan(first_segment):
                    first_segment = time.perf_counter() - started
                if event.name == "done":
                    return event.data, time.perf_counter() - started, first_segment
    raise RuntimeError("the event stream ended without a done event")


def print_table(runs: list[ScalingRun], latency: float, video_seconds: float) -> None:
    print(f"stand-in latency {latency:g} s per call, video {video_seconds / 60:.1f} min")
    header = ("containers", "segments", "ideal s", "job s", "job/ideal",
              "added s/segment", "first segment s", "upload+probe s")
    print("  ".join(f"{name:>15}" for name in header))
    for run in runs:
        row = (
            f"{run.containers}",
            f"{run.segments}",
            f"{run.ideal_seconds:.2f}",
            f"{run.job_seconds:.2f}",
            f"{run.job_seconds / run.ideal_seconds:.2f}",
            f"{run.overhead_per_segment:.3f}",
            f"{run.first_segment_seconds:.2f}",
            f"{run.request_seconds - run.job_seconds:.2f}",
        )
        print("  ".join(f"{cell:>15}" for cell in row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.modal_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the speech video in minutes (default: 10)")
    parser.add_argument("--latency", type=float, default=1.0,
                        help="seconds each stand-in call takes (default: 1.0)")
    parser.add_argument("--containers", default="1,2,4,8,16",
                        help="comma-separated container counts to measure (default: 1,2,4,8,16)")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.containers.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        parser.error(f"--containers must list whole numbers of at least 1, not {args.containers!r}")

    media = build_media(args.minutes)
    machine = describe_machine()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}; "
          f"{machine['system']}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="modal-scaling-") as folder:
        for containers in counts:
            runs.append(measure(media.video, containers, args.latency,
                                Path(folder) / f"c{containers}"))
    print_table(runs, args.latency, media.duration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
