"""Compare Streamscribe end to end with plain faster-whisper on speech videos of 1, 10 and 60 minutes.

For each video length, with the same model (the bundled tiny.en), compute type (int8)
and beam size (5), it measures:

  plain    `WhisperModel.transcribe` on the whole file, `cpu_threads` = usable cores
  batched  `BatchedInferencePipeline.transcribe` on the whole file, same threads
  service  the server from `tests.helpers.start_server`, a fresh process per video
           and configuration, over HTTP on 127.0.0.1: upload until the `done` event

and reports total seconds, time to the first segment, word error rate against the
reference, peak resident memory (VmHWM of the child process or of the server) and CPU
seconds. `plain` and `batched` run in child processes (`bench.whole_file`), so their
memory is measured the same way as the server's. Model loading is left out of every
time: the server loads its model before /readyz returns 200.

    nice -n 10 python -m bench.compare --lengths 1,10,60
    nice -n 10 python -m bench.compare --lengths 10 --methods service \\
        --service default: --service w1t2:workers=1,threads_per_worker=2 \\
        --service batch1:batch_size=1

`--service` takes the settings described in `bench.service_runner`: `STREAMSCRIBE_*`
fields by name, and `env.NAME=VALUE` for the server's environment.

Results go to bench/.cache/results as JSON after every measurement, and the report to
the "compare" section of docs/benchmarks.md with a plot in docs/benchmarks.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.make_media import SpeechMedia, build_media
from bench.measure import (
    BEAM_SIZE,
    COMPUTE_TYPE,
    cpu_seconds,
    describe_machine,
    machine_busy_seconds,
    peak_rss_bytes,
    usable_cores,
    wait_for_idle_machine,
    word_error_rate,
)
from bench.report import DOCS_PAGE, RESULTS_DIR, ROOT, markdown_table, megabytes, write_docs_section
from bench.service_runner import RssSampler, ServiceConfig, parse_service, start_service, upload_video

PLOT_PATH = DOCS_PAGE.with_name("benchmarks.png")
RUNS_DIR = Path(__file__).resolve().parent / ".cache" / "runs"


WHOLE_FILE_TIMEOUT_SECONDS = 3600

# Targets for the 2-core reference machine, checked in the report.
TARGET_RATIO_TO_PLAIN = 0.5
TARGET_RATIO_TO_BATCHED = 1.0
TARGET_FIRST_SEGMENT_SECONDS = 2.0
TARGET_FIRST_SEGMENT_GROWTH = 0.20
TARGET_SERVER_PEAK_BYTES = 1.5e9
TARGET_PEAK_GROWTH = 0.20
"""Growth of the server's peak memory from the shortest to the longest video that still counts as flat."""
TARGET_LENGTH_MINUTES = 10.0


@dataclass
class Measurement:
    """One transcription of one video by one method, with what was measured."""

    method: str
    minutes: float
    duration: float
    total_seconds: float
    first_segment_seconds: float | None
    word_error_rate: float
    peak_rss_bytes: int
    cpu_seconds: float
    segments: int
    other_cpu_seconds: float
    settings: dict[str, str] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------- measurements

def measure_whole_file(media: SpeechMedia, minutes: float, mode: str, args: argparse.Namespace) -> Measurement:
    """Run `bench.whole_file` in a child process and score its transcript."""
    command = [
        sys.executable, "-m", "bench.whole_file", str(media.video),
        "--mode", mode, "--threads", str(args.threads), "--beam-size", str(BEAM_SIZE),
        "--batch-size", str(args.batch_size), "--compute-type", COMPUTE_TYPE,
    ]
    wait_for_idle_machine(args.idle_cores)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            timeout=WHOLE_FILE_TIMEOUT_SECONDS)
    if result.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} exited with {result.returncode}:\n{result.stderr[-3000:]}"
        )
    record = json.loads(result.stdout.strip().splitlines()[-1])
    settings = {"threads": str(args.threads)}
    if mode == "batched":
        settings["batch_size"] = str(args.batch_size)
    return Measurement(
        method=mode,
        minutes=minutes,
        duration=media.duration,
        total_seconds=record["total_seconds"],
        first_segment_seconds=record["first_segment_seconds"],
        word_error_rate=word_error_rate(media.reference_text(), record["text"]),
        peak_rss_bytes=record["peak_rss_bytes"],
        cpu_seconds=record["cpu_seconds"],
        segments=record["segments"],
        other_cpu_seconds=record["other_cpu_seconds"],
        settings=settings,
        details={"load_seconds": record["load_seconds"], "text": record["text"]},
    )


def measure_service(media: SpeechMedia, minutes: float, config: ServiceConfig, workdir: Path,
                    args: argparse.Namespace) -> Measurement:
    """Start a fresh server, upload the video, read events until `done`, then stop it.

    After the full run, `--first-segment-repeats` more uploads each stop at the first
    segment, to give the time to the first segment as a median rather than one sample.
    """
    server = start_service(workdir, config)
    try:
        pid = server.process.pid
        ready_rss = peak_rss_bytes(pid)
        wait_for_idle_machine(args.idle_cores)
        cpu_before = cpu_seconds(pid)
        own_cpu_before = cpu_seconds()
        busy_before = machine_busy_seconds()
        with RssSampler(pid) as sampler:
            run = upload_video(server.url, media.video)
        if run.done is None:
            raise RuntimeError(f"the event stream for {media.video.name} ended without a done event")
        peak = peak_rss_bytes(pid)
        cpu = cpu_seconds(pid) - cpu_before
        other_cpu = machine_busy_seconds() - busy_before - cpu - (cpu_seconds() - own_cpu_before)

        first_segment_times = [run.first_segment_seconds] if run.first_segment_seconds is not None else []
        for _ in range(args.first_segment_repeats):
            wait_for_idle_machine(args.idle_cores)
            repeat = upload_video(server.url, media.video, stop_at_first_segment=True)
            if repeat.first_segment_seconds is not None:
                first_segment_times.append(repeat.first_segment_seconds)
    finally:
        server.stop()

    lengths = run.segment_lengths
    return Measurement(
        method=config.label,
        minutes=minutes,
        duration=media.duration,
        total_seconds=round(run.total_seconds, 3),
        first_segment_seconds=(
            round(statistics.median(first_segment_times), 3) if first_segment_times else None
        ),
        word_error_rate=word_error_rate(media.reference_text(), run.done["text"]),
        peak_rss_bytes=peak,
        cpu_seconds=round(cpu, 2),
        segments=run.done["segments"],
        other_cpu_seconds=round(max(0.0, other_cpu), 2),
        settings=config.settings,
        details={
            "job_event_seconds": run.job_seconds,
            "first_segment_times": [round(value, 3) for value in first_segment_times],
            "ready_rss_bytes": ready_rss,
            "rss_samples": sampler.samples,
            "status": run.done["status"],
            "errors": run.errors,
            "segment_seconds_mean": round(sum(lengths) / len(lengths), 2) if lengths else None,
            "segment_seconds_max": round(max(lengths), 2) if lengths else None,
            "server_log": str(server.log_path),
            "text": run.done["text"],
        },
    )


# ---------------------------------------------------------------- report

def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _by_key(results: list[Measurement]) -> dict[tuple[float, str], Measurement]:
    return {(result.minutes, result.method): result for result in results}


def results_table(results: list[Measurement]) -> str:
    rows = [
        [
            f"{result.duration / 60:.1f}",
            result.method,
            f"{result.total_seconds:.1f}",
            None if result.first_segment_seconds is None else f"{result.first_segment_seconds:.2f}",
            f"{100 * result.word_error_rate:.1f}",
            f"{megabytes(result.peak_rss_bytes):.0f}",
            f"{result.cpu_seconds:.1f}",
            result.segments,
            f"{result.other_cpu_seconds:.1f}",
            " ".join(f"{total:.1f}" for total in result.details.get("round_totals", [result.total_seconds])),
        ]
        for result in results
    ]
    return markdown_table(
        ["video (min)", "method", "total (s)", "first segment (s)", "WER (%)",
         "peak RSS (MB)", "CPU (s)", "segments", "other CPU (s)", "every run (s)"],
        rows,
    )


def ratio_table(results: list[Measurement], service_labels: list[str]) -> str:
    indexed = _by_key(results)
    rows = []
    for minutes in sorted({result.minutes for result in results}):
        plain, batched = indexed.get((minutes, "plain")), indexed.get((minutes, "batched"))
        for label in service_labels:
            service = indexed.get((minutes, label))
            if service is None:
                continue
            to_plain = _ratio(service.total_seconds, plain and plain.total_seconds)
            to_batched = _ratio(service.total_seconds, batched and batched.total_seconds)
            rows.append([
                f"{service.duration / 60:.1f}", label,
                None if to_plain is None else round(to_plain, 2),
                None if to_batched is None else round(to_batched, 2),
            ])
    return markdown_table(["video (min)", "service", "(c)/(a) total", "(c)/(b) total"], rows)


def target_checks(results: list[Measurement], service_labels: list[str]) -> list[str]:
    """Return one line per target and service configuration: the number and whether the target is met."""
    indexed = _by_key(results)
    lengths = sorted({result.minutes for result in results})
    lines = []
    for label in service_labels:
        services = [indexed[(minutes, label)] for minutes in lengths if (minutes, label) in indexed]
        if not services:
            continue
        reference = indexed.get((TARGET_LENGTH_MINUTES, label))
        if reference is not None:
            plain = indexed.get((TARGET_LENGTH_MINUTES, "plain"))
            batched = indexed.get((TARGET_LENGTH_MINUTES, "batched"))
            to_plain = _ratio(reference.total_seconds, plain and plain.total_seconds)
            to_batched = _ratio(reference.total_seconds, batched and batched.total_seconds)
            if to_plain is not None:
                lines.append(_check(label, f"(c)/(a) at {TARGET_LENGTH_MINUTES:g} min is {to_plain:.3f}",
                                    to_plain <= TARGET_RATIO_TO_PLAIN, f"≤ {TARGET_RATIO_TO_PLAIN}"))
            if to_batched is not None:
                lines.append(_check(label, f"(c)/(b) at {TARGET_LENGTH_MINUTES:g} min is {to_batched:.3f}",
                                    to_batched <= TARGET_RATIO_TO_BATCHED, f"≤ {TARGET_RATIO_TO_BATCHED}"))
            first = reference.first_segment_seconds
            if first is not None:
                lines.append(_check(label, f"first segment at {TARGET_LENGTH_MINUTES:g} min after {first:.2f} s",
                                    first <= TARGET_FIRST_SEGMENT_SECONDS, f"≤ {TARGET_FIRST_SEGMENT_SECONDS} s"))
        if len(services) >= 2 and services[0].first_segment_seconds and services[-1].first_segment_seconds:
            growth = services[-1].first_segment_seconds / services[0].first_segment_seconds - 1
            lines.append(_check(
                label,
                f"first segment grows {100 * growth:+.0f} % from {services[0].minutes:g} to "
                f"{services[-1].minutes:g} min",
                growth < TARGET_FIRST_SEGMENT_GROWTH, f"< {100 * TARGET_FIRST_SEGMENT_GROWTH:.0f} %",
            ))
        for service in services:
            plain = indexed.get((service.minutes, "plain"))
            if plain is not None:
                lines.append(_check(
                    label,
                    f"WER at {service.minutes:g} min is {100 * service.word_error_rate:.1f} % "
                    f"against plain {100 * plain.word_error_rate:.1f} %",
                    service.word_error_rate <= plain.word_error_rate, "no higher than plain",
                ))
        shortest, longest = services[0], services[-1]
        lines.append(_check(
            label,
            f"server peak RSS at {longest.minutes:g} min is {megabytes(longest.peak_rss_bytes):.0f} MB",
            longest.peak_rss_bytes < TARGET_SERVER_PEAK_BYTES, f"< {TARGET_SERVER_PEAK_BYTES / 1e9:g} GB",
        ))
        if len(services) >= 2:
            growth = longest.peak_rss_bytes / shortest.peak_rss_bytes - 1
            lines.append(_check(
                label,
                f"server peak RSS grows {100 * growth:+.0f} % from {shortest.minutes:g} to "
                f"{longest.minutes:g} min ({megabytes(shortest.peak_rss_bytes):.0f} to "
                f"{megabytes(longest.peak_rss_bytes):.0f} MB)",
                growth < TARGET_PEAK_GROWTH, f"flat, taken as < {100 * TARGET_PEAK_GROWTH:.0f} %",
            ))
    return lines


def _check(label: str, fact: str, met: bool, target: str) -> str:
    return f"- {'**met**' if met else '**missed**'} ({label}): {fact}; target {target}"


def plot(results: list[Measurement], path: Path) -> None:
    """Draw time to first segment and total time against video length, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    methods = list(dict.fromkeys(result.method for result in results))
    lengths = sorted({round(result.duration / 60, 1) for result in results})
    figure, (first_axes, total_axes) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for method in methods:
        rows = sorted((r for r in results if r.method == method), key=lambda r: r.duration)
        minutes = [row.duration / 60 for row in rows]
        label = _method_label(method)
        first_axes.plot(minutes, [row.first_segment_seconds for row in rows], marker="o", label=label)
        total_axes.plot(minutes, [row.total_seconds for row in rows], marker="o", label=label)
    for axes, title in ((first_axes, "Time to first segment"), (total_axes, "Total time")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.xaxis.set_major_locator(FixedLocator(lengths))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticklabels([f"{length:g}" for length in lengths])
        axes.set_xlabel("video length (minutes)")
        axes.set_ylabel("seconds")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _method_label(method: str) -> str:
    if method == "plain":
        return "(a) plain"
    if method == "batched":
        return "(b) batched"
    return f"(c) service {method}"


def render_report(results: list[Measurement], service_labels: list[str], command: str,
                  machine: dict[str, str], results_file: Path, plot_path: Path | None) -> str:
    parts = [
        "## Streamscribe against faster-whisper on whole files",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']} memory, "
        f"{machine['system']}.",
        "",
        f"Model: Whisper tiny.en (bundled), CPU, {COMPUTE_TYPE}, beam size {BEAM_SIZE}. "
        "(a) is `plain`, (b) is `batched`, (c) is each service row. Times exclude model "
        "loading. The first segment of (a) and (b) is the first one their generator yields, "
        "timed from the `transcribe` call. For (c) it is the first `segment` event, timed "
        "from the start of the upload: the median of the full run and of "
        "`--first-segment-repeats` more uploads that are cancelled at their first segment. "
        "Peak RSS is the VmHWM of the child process or of "
        "the server, not counting its ffmpeg child. CPU is that process's user plus system "
        "time during the transcription. `other CPU` is the CPU time that other processes "
        "used during the measurement: on a shared machine it slows every number, so rows "
        "with much of it are suspect. Each measurement waits first until the machine is "
        "nearly idle and is repeated, up to `--retries` times, while other processes "
        "used more than `--max-other-cpu` cores on average; the least disturbed attempt "
        "counts. With `--rounds N` every method runs N times, in turn, and each row shows "
        "the run with the median total time; `every run` lists all of them.",
        "",
        results_table(results),
        "",
        ratio_table(results, service_labels),
        "",
        "Targets:",
        "",
        *target_checks(results, service_labels),
        "",
    ]
    if plot_path is not None:
        parts += [f"![time to first segment and total time against video length]({plot_path.name})", ""]
    parts += [f"Raw results: `{results_file.relative_to(ROOT)}` (not in git)."]
    return "\n".join(parts)


# ---------------------------------------------------------------- command line

def _parse_lengths(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--lengths takes minutes separated by commas, got {text!r}") from error
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"--lengths takes positive numbers, got {text!r}")
    return values


def _parse_methods(text: str) -> list[str]:
    methods = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(methods) - {"plain", "batched", "service"}
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"--methods takes plain, batched and service, got {text!r}")
    return methods


def _load_results(path: Path) -> tuple[list[Measurement], list[str], str]:
    record = json.loads(path.read_text("utf-8"))
    return [Measurement(**item) for item in record["results"]], record["service_labels"], record["command"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=_parse_lengths, default=[1.0, 10.0, 60.0],
                        help="video lengths in minutes, separated by commas (default: 1,10,60)")
    parser.add_argument("--skip-60", action="store_true", help="leave out the 60-minute video")
    parser.add_argument("--methods", type=_parse_methods, default=["plain", "batched", "service"],
                        help="which of plain, batched and service to run (default: all three)")
    parser.add_argument("--service", dest="services", type=parse_service, action="append",
                        metavar="LABEL:NAME=VALUE,...",
                        help="a service configuration: a label, then STREAMSCRIBE_* settings by "
                             "field name; repeat to compare several (default: service: with the "
                             "server's defaults)")
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help="CPU threads for plain and batched (default: usable cores)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="chunks per model call for batched (default: 8, faster-whisper's default)")
    parser.add_argument("--idle-cores", type=float, default=0.3,
                        help="before each measurement, wait until other processes use fewer "
                             "cores than this, up to 15 minutes (default: 0.3; 0 disables the wait)")
    parser.add_argument("--first-segment-repeats", type=int, default=0,
                        help="extra uploads per service measurement that stop at the first "
                             "segment; the table then shows the median time (default: 0)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every method per video, in turn; each row shows the run "
                             "with the median total time (default: 1)")
    parser.add_argument("--retries", type=int, default=2,
                        help="extra attempts for a measurement that other work disturbed (default: 2)")
    parser.add_argument("--max-other-cpu", type=float, default=0.15,
                        help="cores that other processes may use on average during a measurement "
                             "before it counts as disturbed (default: 0.15)")
    parser.add_argument("--no-docs", action="store_true",
                        help="print the report but do not write docs/benchmarks.md or the plot")
    parser.add_argument("--from-results", type=Path, metavar="JSON",
                        help="rebuild the report from a results file instead of measuring")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    if args.from_results:
        results, service_labels, command = _load_results(args.from_results)
        results_file = args.from_results.resolve()
    else:
        command = "python -m bench.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
        results, service_labels, results_file = _measure(args, command)

    machine = describe_machine()
    plot_path = None if args.no_docs else PLOT_PATH
    if plot_path is not None:
        plot(results, plot_path)
    report = render_report(results, service_labels, command, machine, results_file, plot_path)
    print(report)
    if not args.no_docs:
        write_docs_section("compare", report)
        print(f"\nWrote {DOCS_PAGE.relative_to(ROOT)} and {PLOT_PATH.relative_to(ROOT)}")
    return 0


def _measure(args: argparse.Namespace, command: str) -> tuple[list[Measurement], list[str], Path]:
    lengths = [minutes for minutes in args.lengths if not (args.skip_60 and minutes == 60)]
    services = args.services or [ServiceConfig("service", {})]
    service_labels = [config.label for config in services]
    if len(set(service_labels)) != len(service_labels):
        raise SystemExit(f"--service labels must differ, got {service_labels}")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS_DIR / f"compare-{stamp}.json"
    results: list[Measurement] = []

    def save(pending: list[Measurement] = ()) -> None:
        record = {"command": command, "service_labels": service_labels,
                  "results": [asdict(result) for result in [*results, *pending]]}
        results_file.write_text(json.dumps(record, indent=1) + "\n", "utf-8")

    for minutes in lengths:
        media = build_media(minutes)
        print(f"{minutes:g} min: {media.video.name}, {media.duration:.1f} s, {media.words} words",
              file=sys.stderr)
        runs: dict[str, list[Measurement]] = {}
        # Every round measures each method once, so slow drift in the machine's speed
        # reaches all methods alike. Each row then shows the run with the median time.
        for round_index in range(args.rounds):
            if args.rounds > 1:
                print(f" round {round_index + 1} of {args.rounds}", file=sys.stderr)
            for mode in ("plain", "batched"):
                if mode in args.methods:
                    runs.setdefault(mode, []).append(_least_disturbed(
                        lambda: measure_whole_file(media, minutes, mode, args), args))
            if "service" in args.methods:
                for config in services:
                    workdir = RUNS_DIR / stamp / f"{config.label}-{minutes:g}min-{round_index + 1}"
                    runs.setdefault(config.label, []).append(_least_disturbed(
                        lambda: measure_service(media, minutes, config, workdir, args), args))
            save([_median_run(measurements) for measurements in runs.values()])
        results.extend(_median_run(measurements) for measurements in runs.values())
        save()
    return results, service_labels, results_file


def _median_run(measurements: list[Measurement]) -> Measurement:
    """Return the run with the median total time, recording every run's total in its details."""
    ordered = sorted(measurements, key=lambda result: result.total_seconds)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.details["round_totals"] = [result.total_seconds for result in measurements]
    return chosen


def _least_disturbed(run: Callable[[], Measurement], args: argparse.Namespace) -> Measurement:
    """Run a measurement, and again while other work disturbed it; return the least disturbed attempt.

    The disturbance is other processes' CPU time divided by the wall time, that is the
    cores they used on average. Above `--max-other-cpu` the measurement is repeated, up
    to `--retries` times.
    """
    attempts = []
    for attempt in range(1 + args.retries):
        result = run()
        _progress(result)
        attempts.append(result)
        share = result.other_cpu_seconds / max(result.total_seconds, 1e-9)
        if share <= args.max_other_cpu:
            break
        if attempt < args.retries:
            print(f"  other processes used {share:.2f} cores; measuring again", file=sys.stderr)
    return min(attempts, key=lambda result: result.other_cpu_seconds / max(result.total_seconds, 1e-9))


def _progress(result: Measurement) -> None:
    first = "none" if result.first_segment_seconds is None else f"{result.first_segment_seconds:.2f} s"
    print(
        f"  {result.method}: total {result.total_seconds:.1f} s, first segment {first}, "
        f"WER {100 * result.word_error_rate:.1f} %, peak {megabytes(result.peak_rss_bytes):.0f} MB, "
        f"CPU {result.cpu_seconds:.1f} s, other CPU {result.other_cpu_seconds:.1f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
