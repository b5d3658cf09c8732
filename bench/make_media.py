"""Build speech videos of a chosen length whose reference transcript is known.

espeak-ng reads licence texts that every Debian system has under
/usr/share/common-licenses. Each paragraph is spoken on its own, its silent edges are
trimmed, and the paragraphs are joined with pauses of set, varied lengths, so the
result has real gaps between paragraphs and espeak-ng's own short pauses between
sentences. ffmpeg puts the audio (AAC) under a still picture (H.264) in an MP4.

The reference is exactly the text handed to espeak-ng. Cleaning removes what a reader
would not say aloud or what Whisper would write differently from how espeak-ng says
it: list and section numbers, sentences with digits, URLs, e-mail addresses,
bracketed placeholders and lines of symbols.

Results are cached in bench/.cache/media under a key built from every input (texts,
voice, rate, pauses, length, espeak-ng and ffmpeg versions), so reruns reuse them.

    python -m bench.make_media --minutes 1,10,60
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache" / "media"
LICENSE_DIR = Path("/usr/share/common-licenses")

# Read in this order until the video is long enough: about two hours of speech after cleaning.
DOCUMENTS = (
    "GPL-3", "Apache-2.0", "MPL-2.0", "GPL-2", "LGPL-2.1", "MPL-1.1", "GFDL-1.3",
    "Artistic", "CC0-1.0", "BSD",
)

ESPEAK = shutil.which("espeak-ng") or "espeak-ng"
FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
VOICE = "en-us"
WORDS_PER_MINUTE = 165

PARAGRAPH_PAUSES = (0.8, 1.6, 1.1, 2.4, 0.9, 1.3)
"""Seconds of silence after paragraph i: PARAGRAPH_PAUSES[i % 6]."""

LEAD_SECONDS = 0.5
TAIL_SECONDS = 0.5
MIN_PARAGRAPH_WORDS = 2

SILENCE_LEVEL = 0.005 * 32767
"""Samples quieter than this (about -46 dBFS) at a clip's edges are trimmed."""

EDGE_SECONDS = 0.02
"""Sound kept beyond the first and last loud sample, so soft word edges survive."""

PICTURE = "smptebars=size=320x240:rate=1"
AUDIO_BITRATE = "64k"

FORMAT_VERSION = 1
"""Raise when the output changes for the same inputs, so old cache entries are ignored."""


@dataclass(frozen=True)
class SpeechMedia:
    """A built video, its reference text and how it was made."""

    video: Path
    reference: Path
    duration: float
    words: int
    paragraphs: int
    documents: tuple[str, ...]

    def reference_text(self) -> str:
        return self.reference.read_text("utf-8")


# ---------------------------------------------------------------- text cleaning

_LIST_MARKER = re.compile(r"^(?:\d+(?:\.\d+)*\.?|\(?[a-z]\)|\(?[ivx]+\)|\(\d+\))\s+", re.IGNORECASE)
_INLINE_MARKER = re.compile(r"\((?:[a-z]|[ivx]+|\d+)\)\s*", re.IGNORECASE)
_UNSPOKEN = re.compile(r"[0-9<>\[\]{}=_*#|\\~+$%^@]|https?:|www\.|\.com\b|\.org\b")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
_REPLACEMENTS = (
    ("--", ", "),
    ("and/or", "and or"),
    ("e.g.", "for example"),
    ("i.e.", "that is"),
    ("etc.", "and so on"),
    ("&", " and "),
    ("/", " "),
    ("``", '"'),
    ("''", '"'),
)


def clean_paragraph(block: str) -> str:
    """Return the part of a licence paragraph that reads naturally aloud, or ""."""
    text = " ".join(block.split())
    while (marker := _LIST_MARKER.match(text)) is not None:
        text = text[marker.end():]
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = _INLINE_MARKER.sub("", text)
    kept = [
        sentence for sentence in _SENTENCE_END.split(text)
        if re.search(r"[A-Za-z]", sentence) and not _UNSPOKEN.search(sentence)
    ]
    cleaned = " ".join(" ".join(kept).split())
    cleaned = cleaned.replace(" ,", ",").replace("()", "").strip(" ,;:")
    return cleaned if len(cleaned.split()) >= MIN_PARAGRAPH_WORDS else ""


def licence_paragraphs(documents: tuple[str, ...] = DOCUMENTS) -> Iterator[tuple[str, str]]:
    """Yield (document name, cleaned paragraph) for each paragraph worth reading aloud."""
    for name in documents:
        text = (LICENSE_DIR / name).read_text("utf-8", "replace")
        for block in re.split(r"\n\s*\n", text):
            paragraph = clean_paragraph(block)
            if paragraph:
                yield name, paragraph


# ---------------------------------------------------------------- speech

def _tool_version(*command: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[0].strip()


def speak(text: str) -> tuple[np.ndarray, int]:
    """Synthesise `text` with espeak-ng; return int16 mono samples and the sample rate.

    The text goes in on stdin, so a paragraph that starts with "-" is not taken for an
    option.
    """
    result = subprocess.run(
        [ESPEAK, "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "--stdin", "--stdout"],
        input=text.encode("utf-8"),
        capture_output=True,
        check=True,
    )
    with wave.open(io.BytesIO(result.stdout)) as clip:
        rate = clip.getframerate()
        frames = clip.readframes(clip.getnframes())
    # Writing to stdout, espeak-ng puts a placeholder data length in the header. `wave`
    # then reads to the end, and should it read nothing, the data follows the 44-byte header.
    if not frames:
        frames = result.stdout[44:]
    samples = np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2")
    return samples, rate


def trim_silence(samples: np.ndarray, rate: int) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > SILENCE_LEVEL)
    if len(loud) == 0:
        return samples[:0]
    edge = int(EDGE_SECONDS * rate)
    return samples[max(0, loud[0] - edge): loud[-1] + 1 + edge]


# ---------------------------------------------------------------- building

def cache_key(minutes: float) -> str:
    """Hash every input that changes the video for `minutes`."""
    inputs = {
        "format": FORMAT_VERSION,
        "minutes": minutes,
        "documents": {
            name: hashlib.sha256((LICENSE_DIR / name).read_bytes()).hexdigest()
            for name in DOCUMENTS
        },
        "voice": VOICE,
        "words_per_minute": WORDS_PER_MINUTE,
        "pauses": PARAGRAPH_PAUSES,
        "lead": LEAD_SECONDS,
        "tail": TAIL_SECONDS,
        "silence_level": SILENCE_LEVEL,
        "edge": EDGE_SECONDS,
        "picture": PICTURE,
        "audio_bitrate": AUDIO_BITRATE,
        "espeak": _tool_version(ESPEAK, "--version"),
        "ffmpeg": _tool_version(FFMPEG, "-version"),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _paths(minutes: float, key: str) -> tuple[Path, Path, Path]:
    stem = CACHE_DIR / f"speech-{minutes:g}min-{key}"
    return stem.with_suffix(".mp4"), stem.with_suffix(".txt"), stem.with_suffix(".json")


def build_media(minutes: float, *, force: bool = False) -> SpeechMedia:
    """Return the cached speech video of about `minutes` minutes, building it if needed."""
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes!r}")
    key = cache_key(minutes)
    video, reference, manifest = _paths(minutes, key)
    if not force and video.is_file() and reference.is_file() and manifest.is_file():
        return _load_manifest(manifest)

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    audio, rate, chosen = _assemble_speech(minutes * 60.0)
    reference_text = "\n\n".join(text for _, text in chosen) + "\n"
    _encode_video(audio, rate, video)
    reference.write_text(reference_text, "utf-8")
    media = SpeechMedia(
        video=video,
        reference=reference,
        duration=round(len(audio) / rate, 3),
        words=len(reference_text.split()),
        paragraphs=len(chosen),
        documents=tuple(dict.fromkeys(name for name, _ in chosen)),
    )
    record = {**asdict(media), "video": video.name, "reference": reference.name,
              "voice": VOICE, "words_per_minute": WORDS_PER_MINUTE, "key": key}
    manifest.write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    return media


def _load_manifest(manifest: Path) -> SpeechMedia:
    record = json.loads(manifest.read_text("utf-8"))
    return SpeechMedia(
        video=manifest.with_name(record["video"]),
        reference=manifest.with_name(record["reference"]),
        duration=record["duration"],
        words=record["words"],
        paragraphs=record["paragraphs"],
        documents=tuple(record["documents"]),
    )


def _assemble_speech(target_seconds: float) -> tuple[np.ndarray, int, list[tuple[str, str]]]:
    """Speak paragraphs in order until the audio is within a tolerance of the target.

    A paragraph that would overshoot the target by more than the tolerance is skipped
    and the next one tried, so a short video does not overshoot by a whole long paragraph.
    """
    tolerance = max(3.0, 0.02 * target_seconds)
    rate = 0
    pieces: list[np.ndarray] = []
    chosen: list[tuple[str, str]] = []
    total = LEAD_SECONDS + TAIL_SECONDS
    for name, paragraph in licence_paragraphs():
        clip, clip_rate = speak(paragraph)
        if rate and clip_rate != rate:
            raise RuntimeError(f"espeak-ng changed its sample rate from {rate} to {clip_rate} Hz")
        rate = clip_rate
        clip = trim_silence(clip, rate)
        if len(clip) == 0:
            continue
        pause = PARAGRAPH_PAUSES[len(chosen) % len(PARAGRAPH_PAUSES)] if chosen else 0.0
        added = pause + len(clip) / rate
        if total + added > target_seconds + tolerance:
            continue
        if chosen:
            pieces.append(np.zeros(int(pause * rate), dtype=np.int16))
        pieces.append(clip)
        chosen.append((name, paragraph))
        total += added
        if total >= target_seconds - tolerance:
            break
    else:
        raise RuntimeError(
            f"the licence texts contain only {total:.0f} s of speech, less than the "
            f"{target_seconds:.0f} s requested; add documents to DOCUMENTS"
        )
    lead = np.zeros(int(LEAD_SECONDS * rate), dtype=np.int16)
    tail = np.zeros(int(TAIL_SECONDS * rate), dtype=np.int16)
    return np.concatenate([lead, *pieces, tail]), rate, chosen


def _encode_video(audio: np.ndarray, rate: int, video: Path) -> None:
    """Mux `audio` (int16 mono) under a still test picture into an H.264/AAC MP4."""
    partial = video.with_name(video.stem + ".partial.mp4")
    duration = len(audio) / rate
    command = [
        FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", PICTURE,
        "-f", "s16le", "-ar", str(rate), "-ac", "1", "-i", "pipe:0",
        "-t", f"{duration:.3f}",
        "-map", "0:v", "-map", "1:a",
        "-c:v", "libx264", "-preset", "veryfast", "-tune", "stillimage", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", AUDIO_BITRATE,
        "-movflags", "+faststart",
        str(partial),
    ]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    _, errors = process.communicate(audio.astype("<i2").tobytes())
    if process.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed to encode {video.name}: {errors.decode(errors='replace')}")
    os.replace(partial, video)


def _parse_minutes(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--minutes takes numbers separated by commas, got {text!r}") from error
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"--minutes takes positive numbers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=_parse_minutes, default=[1.0, 10.0, 60.0],
                        help="video lengths in minutes, separated by commas (default: 1,10,60)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached video exists")
    args = parser.parse_args(argv)
    for minutes in args.minutes:
        started = time.perf_counter()
        media = build_media(minutes, force=args.force)
        print(
            f"{minutes:g} min: {media.video} ({media.duration:.1f} s, {media.words} words, "
            f"{media.paragraphs} paragraphs from {', '.join(media.documents)}) "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
