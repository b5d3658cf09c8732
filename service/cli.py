"""The `streamscribe` command: run the service, or transcribe a file and watch it stream."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from pathlib import Path

import httpx

from service.client import StreamscribeClient, StreamscribeError

FORMATS = ("srt", "vtt", "txt", "json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamscribe", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port to bind (default: 8000)")

    transcribe = commands.add_parser(
        "transcribe",
        help="transcribe a file, printing text as it arrives and progress on stderr",
    )
    transcribe.add_argument("file", type=Path, help="video or audio file")
    transcribe.add_argument("--url", help="a running server to use (default: start one in this process)")
    transcribe.add_argument("--format", choices=FORMATS, help="also produce the transcript in this format")
    transcribe.add_argument("-o", "--output", type=Path,
                            help="write the --format output here (default: stdout, after the text)")
    transcribe.add_argument("--language", help="language code such as 'en' (default: detect)")
    transcribe.add_argument("--word-timestamps", action="store_true", help="ask for word times")
    transcribe.add_argument("--quiet", action="store_true", help="no progress bar")

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args)
    return _transcribe(args)


def _serve(args: argparse.Namespace) -> int:
    from service.allocator import loaded_allocator, restart_under
    from service.settings import Settings

    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value}
    settings = Settings.from_env(**overrides)
    try:
        restart_under(settings.allocator)
    except (ValueError, FileNotFoundError) as error:
        print(f"streamscribe: {error}", file=sys.stderr)
        return 2

    import uvicorn

    from service.app import create_app

    logging.getLogger(__name__).info("Memory allocator: %s", loaded_allocator())
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    return 0


class _InProcessServer:
    """A service on a free loopback port in a background thread, for `transcribe` without --url."""

    def __init__(self) -> None:
        import uvicorn

        from service.app import create_app
        from service.settings import Settings

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        settings = Settings.from_env(host="127.0.0.1", port=port)
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            if not self.thread.is_alive():
                break
            time.sleep(0.2)
        raise RuntimeError("the in-process server did not become ready")

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _bar(percent: float, done: int, total: int | None, seconds: float) -> str:
    width = 30
    filled = int(width * percent / 100)
    total_text = "?" if total is None else str(total)
    return (f"\r[{'#' * filled}{'.' * (width - filled)}] {percent:5.1f}%  "
            f"segments {done}/{total_text}  audio {seconds:6.1f} s")


def _transcribe(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        print(f"streamscribe: {args.file} is not a file", file=sys.stderr)
        return 2
    if args.url:
        return _run_client(args, args.url.rstrip("/"))
    with _InProcessServer() as url:
        return _run_client(args, url)


def _run_client(args: argparse.Namespace, url: str) -> int:
    fields: dict[str, str | bool] = {}
    if args.language:
        fields["language"] = args.language
    if args.word_timestamps:
        fields["word_timestamps"] = True
    show_progress = not args.quiet
    failed = False
    job_id = None
    with StreamscribeClient(url) as client:
        try:
            for event in client.transcribe(args.file, **fields):
                if event.name == "job":
                    job_id = event.data["job_id"]
                elif event.name == "segment":
                    if show_progress:
                        sys.stderr.write("\r\033[K")
                    start = event.data["start"]
                    print(f"[{int(start // 60):02d}:{start % 60:05.2f}] {event.data['text']}", flush=True)
                elif event.name == "progress" and show_progress:
                    data = event.data
                    sys.stderr.write(_bar(data["percent"], data["segments_done"],
                                          data["segments_total"], data["seconds_done"]))
                    sys.stderr.flush()
                elif event.name == "error":
                    failed = True
                    print(f"\nstreamscribe: {event.data['message']}", file=sys.stderr)
                elif event.name == "done":
                    if show_progress:
                        sys.stderr.write(_bar(100.0 if event.data["status"] == "completed" else 0,
                                              event.data["segments"], event.data["segments"],
                                              event.data["duration"] or 0) + "\n")
                    for note in event.data.get("notes", []):
                        print(f"streamscribe: note: {note}", file=sys.stderr)
                    failed = failed or event.data["status"] != "completed"
        except StreamscribeError as error:
            print(f"streamscribe: {error.message}", file=sys.stderr)
            return 1
        if args.format and job_id:
            body = client.download(job_id, args.format)
            if args.output:
                args.output.write_text(body, encoding="utf-8")
                print(f"streamscribe: wrote {args.output}", file=sys.stderr)
            else:
                sys.stdout.write("\n" + body)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
