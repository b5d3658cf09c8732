"""Measure only the time to the first segment: repeated uploads, each cancelled at its first segment.

For each video length and service configuration it starts one server, uploads the
video `--uploads` times, stops reading at the first `segment` event, cancels the job
and waits for it to stop before the next upload. It prints the median and every time,
from the start of the upload. This costs a second or two of CPU per upload whatever
the video's length, so it can check how the first segment's latency grows with
length without transcribing an hour of audio.

    nice -n 10 python -m bench.first_segment --lengths 1,10,60 --uploads 7 \\
        --service default: --service batch1:batch_size=1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.make_media import build_media
from bench.measure import wait_for_idle_machine
from bench.report import markdown_table
from bench.service_runner import ServiceConfig, add_service_options, start_service, upload_video


def first_segment_times(video: Path, config: ServiceConfig, uploads: int, idle_cores: float) -> list[float]:
    """Start a server for `config` and return the time to the first segment of each upload."""
    with tempfile.TemporaryDirectory(prefix="first-segment-") as folder:
        server = start_service(Path(folder), config)
        try:
            times = []
            for _ in range(uploads):
                wait_for_idle_machine(idle_cores)
                run = upload_video(server.url, video, stop_at_first_segment=True)
                if run.first_segment_seconds is None:
                    raise RuntimeError(f"no segment event came back for {video.name}")
                times.append(run.first_segment_seconds)
            return times
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1,10,60",
                        help="video lengths in minutes, separated by commas (default: 1,10,60)")
    parser.add_argument("--uploads", type=int, default=7, help="uploads per length and configuration (default: 7)")
    add_service_options(parser, before_each="upload")
    args = parser.parse_args(argv)
    try:
        lengths = [float(part) for part in args.lengths.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--lengths takes minutes separated by commas, got {args.lengths!r}")
    services = args.services or [ServiceConfig("default", {})]

    rows = []
    for minutes in lengths:
        media = build_media(minutes)
        for config in services:
            times = first_segment_times(media.video, config, args.uploads, args.idle_cores)
            rows.append([f"{media.duration / 60:.1f}", config.label, f"{statistics.median(times):.2f}",
                         f"{min(times):.2f}", f"{max(times):.2f}", " ".join(f"{t:.2f}" for t in times)])
            print(f"  {minutes:g} min, {config.label}: median {statistics.median(times):.2f} s", file=sys.stderr)
    print(markdown_table(["video (min)", "service", "median (s)", "min (s)", "max (s)", "all (s)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
