"""Probe uploaded media with ffprobe: audio streams, duration, codec."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from service.errors import MediaError

logger = logging.getLogger(__name__)

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
FFPROBE = shutil.which("ffprobe") or "ffprobe"
"""The binaries found on PATH at import; settings can name others."""


@dataclass(frozen=True)
class AudioStream:
    index: int
    codec: str
    channels: int
    sample_rate: int
    language: str | None
    is_default: bool
    start_time: float


@dataclass(frozen=True)
class MediaInfo:
    format_name: str
    duration: float | None
    start_time: float
    audio_streams: tuple[AudioStream, ...]
    has_video: bool

    def pick_audio(self, track: int | None = None) -> AudioStream:
        """Return audio track number `track` (0-based among audio streams), else the default one.

        Without a choice, the stream marked default wins, else the first.
        """
        if track is not None:
            if not 0 <= track < len(self.audio_streams):
                raise MediaError(
                    f"audio track {track} does not exist; this file has "
                    f"{len(self.audio_streams)} audio track(s), numbered from 0",
                    code="invalid_audio_track",
                    status_code=400,
                )
            return self.audio_streams[track]
        for stream in self.audio_streams:
            if stream.is_default:
                return stream
        return self.audio_streams[0]

    def timeline_offset(self, stream: AudioStream) -> float:
        """Seconds from the start of the file's timeline to the first audio sample."""
        return max(0.0, stream.start_time - self.start_time)


def _float(value: object, default: float | None = None) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def parse_probe(report: dict) -> MediaInfo:
    """Build `MediaInfo` from ffprobe's `-show_format -show_streams` JSON."""
    streams = report.get("streams") or []
    fmt = report.get("format") or {}
    audio = []
    starts = []
    has_video = False
    for stream in streams:
        start = _float(stream.get("start_time"), 0.0) or 0.0
        kind = stream.get("codec_type")
        if kind == "video" and not (stream.get("disposition") or {}).get("attached_pic"):
            has_video = True
            starts.append(start)
        if kind != "audio":
            continue
        starts.append(start)
        tags = stream.get("tags") or {}
        language = tags.get("language") or tags.get("LANGUAGE")
        audio.append(
            AudioStream(
                index=int(stream.get("index", len(audio))),
                codec=str(stream.get("codec_name") or "unknown"),
                channels=int(stream.get("channels") or 0),
                sample_rate=int(_float(stream.get("sample_rate"), 0.0) or 0),
                language=None if language in (None, "und") else str(language),
                is_default=bool((stream.get("disposition") or {}).get("default")),
                start_time=start,
            )
        )
    duration = _float(fmt.get("duration"))
    if duration is None:
        durations = [_float(s.get("duration")) for s in streams]
        known = [d for d in durations if d is not None]
        duration = max(known) if known else None
    start_time = _float(fmt.get("start_time"))
    if start_time is None:
        start_time = min(starts) if starts else 0.0
    start_time = min([start_time, *starts]) if starts else start_time
    return MediaInfo(
        format_name=str(fmt.get("format_name") or "unknown"),
        duration=duration,
        start_time=start_time,
        audio_streams=tuple(audio),
        has_video=has_video,
    )


def _has_mp4_header(path: Path) -> bool:
    # Every MP4, M4A and MOV file starts with a box whose type sits in bytes 4 to 8.
    with path.open("rb") as handle:
        head = handle.read(12)
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")


def _explain_probe_failure(stderr: str, filename: str, path: Path) -> MediaError:
    lowered = stderr.lower()
    if "moov atom not found" in lowered and _has_mp4_header(path):
        return MediaError(
            f"{filename!r} is incomplete: its MP4 index (moov atom) is missing, which usually "
            "means the upload or the recording was cut short; send the complete file",
            code="incomplete_file",
        )
    return MediaError(
        f"{filename!r} is not a media file ffmpeg can read; send a video or audio file "
        "such as MP4, MKV, WebM, MP3, M4A or WAV",
        code="not_media",
        status_code=415,
    )


async def _run_with_timeout(args: list[str], timeout: float) -> tuple[int, bytes, bytes] | None:
    """Run `args` and return its exit status, stdout and stderr, or None after `timeout` seconds.

    The process is killed and reaped on a timeout and on cancellation.
    """
    process = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        return None
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process.returncode, stdout, stderr


async def measure_duration(path: Path, stream_index: int, *, timeout: float,
                           ffmpeg: str = FFMPEG) -> float | None:
    """Return the length in seconds of stream `stream_index`, found by reading all its packets.

    For files whose header states no duration, such as a WebM recording written to a
    pipe. Packets are copied, not decoded, so this costs one read of the file. Returns
    None when ffmpeg fails or runs past `timeout` seconds.
    """
    args = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path.resolve()),
            "-map", f"0:{stream_index}", "-c", "copy", "-f", "null",
            "-progress", "pipe:1", "-nostats", "-"]
    outcome = await _run_with_timeout(args, timeout)
    if outcome is None:
        logger.warning("ffmpeg timed out after %g s measuring the duration of %s", timeout, path)
        return None
    returncode, stdout, _ = outcome
    # -progress writes blocks of key=value lines, and the last out_time_us is the end.
    times = re.findall(rb"^out_time_us=(\d+)$", stdout, re.MULTILINE)
    if returncode != 0 or not times:
        logger.warning("ffmpeg could not measure the duration of %s (exit status %d)",
                       path, returncode)
        return None
    return int(times[-1]) / 1_000_000


async def probe(path: Path, filename: str, *, timeout: float, ffprobe: str = FFPROBE) -> MediaInfo:
    """Run ffprobe on `path`, killing it after `timeout` seconds.

    Raises `MediaError` for an empty file, a file that is not media, an incomplete MP4
    and a file without an audio stream.
    """
    if path.stat().st_size == 0:
        raise MediaError(
            f"{filename!r} is empty (0 bytes); send a file with content",
            code="empty_file",
            status_code=400,
        )
    # An absolute path never starts with "-", so no file name can be read as an option.
    args = [ffprobe, "-v", "error", "-show_format", "-show_streams", "-of", "json",
            "-probesize", "50M", "-analyzeduration", "20M", str(path.resolve())]
    outcome = await _run_with_timeout(args, timeout)
    if outcome is None:
        raise MediaError(
            f"probing {filename!r} took longer than {timeout:g} s; the file is probably damaged",
            code="probe_timeout",
        )
    returncode, stdout, stderr = outcome
    message = stderr.decode("utf-8", "replace")
    if returncode != 0:
        logger.info("ffprobe rejected %r: %s", filename, message.strip()[-300:])
        raise _explain_probe_failure(message, filename, path)
    try:
        info = parse_probe(json.loads(stdout or b"{}"))
    except (ValueError, TypeError) as error:
        raise _explain_probe_failure(message, filename, path) from error
    if "moov atom not found" in message.lower():
        raise _explain_probe_failure(message, filename, path)
    if not info.audio_streams:
        if info.has_video:
            text = f"{filename!r} has no audio stream (video only); send a file with sound"
        else:
            text = f"{filename!r} has no audio stream; send a video or audio file with sound"
        raise MediaError(text, code="no_audio_stream")
    return info
