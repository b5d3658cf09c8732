"""Render a finished transcript as SRT, WebVTT, plain text or JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from gpu_workers.segments import Cue, SegmentResult

def ordered_cues(results: Iterable[SegmentResult]) -> list[Cue]:
    """Return every cue of every segment in timeline order, with no overlaps."""
    cues = sorted((cue for result in results for cue in result.cues), key=lambda cue: cue.start)
    fixed: list[Cue] = []
    for cue in cues:
        start = max(cue.start, fixed[-1].end) if fixed else cue.start
        end = max(cue.end, start + 0.001)
        fixed.append(_replace_times(cue, start, end))
    return fixed


def _replace_times(cue: Cue, start: float, end: float) -> Cue:
    from dataclasses import replace

    return replace(cue, start=round(start, 3), end=round(end, 3))


def _timestamp(seconds: float, separator: str) -> str:
    milliseconds = max(0, round(seconds * 1000))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{milliseconds:03d}"


def _cue_text(text: str) -> str:
    # A blank line would end the cue early in both formats, and "-->" would be read
    # as a timing line in WebVTT.
    return " ".join(text.split()).replace("-->", "->")


def to_srt(cues: Sequence[Cue]) -> str:
    blocks = [
        f"{number}\n{_timestamp(cue.start, ',')} --> {_timestamp(cue.end, ',')}\n{_cue_text(cue.text)}\n"
        for number, cue in enumerate(cues, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(cues: Sequence[Cue]) -> str:
    blocks = [
        f"{_timestamp(cue.start, '.')} --> {_timestamp(cue.end, '.')}\n{_cue_text(cue.text)}\n"
        for cue in cues
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_text(results: Iterable[SegmentResult]) -> str:
    ordered = sorted(results, key=lambda result: result.start)
    return " ".join(result.text for result in ordered if result.text)


def to_json(job_id: str, duration: float | None, language: str | None,
            results: Iterable[SegmentResult]) -> str:
    results = sorted(results, key=lambda result: result.start)
    cues = ordered_cues(results)
    payload = {
        "id": job_id,
        "duration": duration,
        "language": language,
        "text": to_text(results),
        "segments": [
            {
                "id": number,
                "start": cue.start,
                "end": cue.end,
                "text": cue.text,
                "avg_logprob": cue.avg_logprob,
                "compression_ratio": cue.compression_ratio,
                "no_speech_prob": cue.no_speech_prob,
                **({"words": [vars(word) for word in cue.words]} if cue.words else {}),
            }
            for number, cue in enumerate(cues)
        ],
    }
    return json.dumps(payload, ensure_ascii=False, indent=2)
