"""Check whether the server's memory grows from job to job: several uploads to one server.

For each service configuration it starts one server, then transcribes the same video
`--jobs` times in a row. After each job it prints the server's resident memory (VmRSS)
and its peak so far (VmHWM). Memory that stays level after each job, and a peak that
stops rising, mean nothing is kept between jobs.

    nice -n 10 python -m bench.memory_jobs --minutes 10 --jobs 3 \\
        --service default: --service arena2:env.MALLOC_ARENA_MAX=2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.make_media import build_media
from bench.measure import peak_rss_bytes, resident_bytes, wait_for_idle_machine
from bench.report import markdown_table
from bench.service_runner import ServiceConfig, add_service_options, start_service, upload_video

SETTLE_SECONDS = 1.0
"""Wait after a job's `done` event before reading memory, so the job's cleanup has run."""


def memory_after_jobs(video: Path, config: ServiceConfig, jobs: int, idle_cores: float) -> list[list[str]]:
    """Return one table row per job: resident memory after it and the peak so far, in MB."""
    with tempfile.TemporaryDirectory(prefix="memory-jobs-") as folder:
        server = start_service(Path(folder), config)
        try:
            pid = server.process.pid
            rows = [[config.label, "ready", f"{resident_bytes(pid) / 1e6:.0f}", f"{peak_rss_bytes(pid) / 1e6:.0f}"]]
            for job in range(1, jobs + 1):
                wait_for_idle_machine(idle_cores)
                run = upload_video(server.url, video)
                if run.done is None:
                    raise RuntimeError(f"job {job} on {video.name} ended without a done event")
                time.sleep(SETTLE_SECONDS)
                rows.append([config.label, f"after job {job}", f"{resident_bytes(pid) / 1e6:.0f}",
                             f"{peak_rss_bytes(pid) / 1e6:.0f}"])
            return rows
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the speech video from bench.make_media (default: 10)")
    parser.add_argument("--jobs", type=int, default=3, help="jobs in a row on each server (default: 3)")
    add_service_options(parser, before_each="job")
    args = parser.parse_args(argv)
    media = build_media(args.minutes)
    rows = []
    for config in args.services or [ServiceConfig("default", {})]:
        rows += memory_after_jobs(media.video, config, args.jobs, args.idle_cores)
        print(f"  {config.label}: done", file=sys.stderr)
    print(markdown_table(["service", "when", "VmRSS (MB)", "VmHWM (MB)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
