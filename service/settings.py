"""Service settings, read from `STREAMSCRIBE_*` environment variables."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def _default_workers() -> int:
    # On one or two cores, each core gets its own single-threaded worker. On bigger
    # machines, one worker per two cores leaves CTranslate2 two threads per worker.
    cores = os.cpu_count() or 1
    return max(1, cores if cores <= 2 else cores // 2)


@dataclass
class Settings:
    """Everything an operator can tune; each field maps to `STREAMSCRIBE_<NAME>`."""

    host: str = "127.0.0.1"
    port: int = 8000

    # Where the work goes: "local" (the faster-whisper pool on this machine) or "modal".
    backend: str = "local"
    model: str = "bundled"
    device: str = "auto"
    compute_type: str = "auto"
    workers: int = field(default_factory=_default_workers)
    threads_per_worker: int = 1
    # Segments a local worker decodes in one model call once the first result is out.
    batch_size: int = 2
    beam_size: int = 5
    # The C memory allocator `streamscribe serve` runs on: "auto" (jemalloc when it is
    # installed), "jemalloc" (exit when it is missing), "system", or a path to a jemalloc library.
    allocator: str = "auto"

    # Splitting, in seconds of audio. Each piece of up to 29.5 s is one Whisper window,
    # which costs the same however little audio it holds, so pieces are cut near 27 s.
    first_segment_seconds: float = 8.0
    segment_seconds: float = 27.0
    max_segment_seconds: float = 29.5
    min_pause_seconds: float = 0.2

    # The ffmpeg and ffprobe programs: a name looked up on PATH, or a path.
    ffmpeg: str = field(default_factory=lambda: shutil.which("ffmpeg") or "ffmpeg")
    ffprobe: str = field(default_factory=lambda: shutil.which("ffprobe") or "ffprobe")

    # Limits on input.
    max_upload_bytes: int = 2 * 1024**3
    max_duration_seconds: float = 4 * 3600.0
    probe_timeout_seconds: float = 20.0
    decode_timeout_seconds: float = 600.0
    decode_stall_seconds: float = 60.0

    # Access. With an API key set, every /v1 request must send "Authorization: Bearer KEY".
    api_key: str = ""
    # Origins allowed to call the API from a browser on another site, comma-separated;
    # "*" allows any. Empty: same-origin only.
    cors_origins: str = ""

    # Jobs.
    max_active_jobs: int = 4
    max_queued_jobs: int = 16
    grace_seconds: float = 30.0
    # Where jobs are kept: "sqlite" (the file below) or "modal-dict" (a modal.Dict
    # named by modal_dict_name, which every container of a Modal app reads).
    job_store: str = "sqlite"
    modal_dict_name: str = "streamscribe-jobs"
    # The SQLite job store; ":memory:" keeps jobs only for the life of the process.
    database: Path = field(default_factory=lambda: _data_home() / "streamscribe" / "jobs.sqlite3")
    # Finished jobs older than this are deleted from the store.
    retention_seconds: float = 7 * 24 * 3600.0
    # Finished jobs stay in memory this long, then are read back from the store on demand.
    memory_seconds: float = 600.0
    temp_root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "streamscribe")

    # Test hook: when above 0, the upload's own event stream closes from the server side
    # after this many events, so tests can check that clients resume. Never set it in
    # production.
    test_break_stream_after: int = 0

    # Modal backend.
    modal_app_name: str = "streamscribe"
    modal_class_name: str = "WhisperWorker"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from `STREAMSCRIBE_*` variables, then apply `overrides`."""
        environ = dict(os.environ if environ is None else environ)
        settings = cls()
        for item in fields(cls):
            raw = environ.get(f"STREAMSCRIBE_{item.name.upper()}")
            if raw is None:
                continue
            setattr(settings, item.name, _parse(item.name, raw, type(getattr(settings, item.name))))
        for name, value in overrides.items():
            if not hasattr(settings, name):
                raise TypeError(f"unknown setting {name!r}")
            setattr(settings, name, value)
        settings.temp_root = Path(settings.temp_root)
        settings.database = Path(settings.database)
        return settings


def _parse(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if issubclass(kind, Path):
            return Path(raw)
    except ValueError as error:
        raise ValueError(
            f"STREAMSCRIBE_{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from error
    return raw


def model_label(model: str) -> str:
    """Return the name users see for the `model` setting ("bundled" is tiny.en)."""
    return "tiny.en" if model in ("", "bundled") else model
