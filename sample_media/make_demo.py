"""Build the demo video sample_media/demo.mp4 from the reference text demo.txt.

Each paragraph of demo.txt (paragraphs are separated by blank lines) is spoken
by espeak-ng (voice en-us, 150 words per minute) into its own WAV file. The
script trims the near-silent start and end of each clip and joins the clips
with pauses of exact, varied lengths (see PAUSE_PATTERN_S), so that a pause
detector has real gaps to find. ffmpeg then muxes that audio with a testsrc2
test picture (320x240, 10 fps) into an H.264/AAC MP4.

Run from the repository root:

    python sample_media/make_demo.py

Needs Python 3.9 or later (standard library only) and the espeak-ng and ffmpeg programs
on PATH. espeak-ng, testsrc2 and the single-threaded encode are
deterministic, so rerunning with the same programs writes a byte-identical
demo.mp4 (checked with ffmpeg 5.1.9 and libx264 0.164.3095 from Debian 12).
Other espeak-ng versions may shift the timing slightly, and other ffmpeg or
x264 versions may write different bytes.
"""

import argparse
import array
import re
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

SAMPLE_MEDIA_DIR = Path(__file__).resolve().parent
DEFAULT_TEXT_PATH = SAMPLE_MEDIA_DIR / "demo.txt"
DEFAULT_VIDEO_PATH = SAMPLE_MEDIA_DIR / "demo.mp4"

ESPEAK_VOICE = "en-us"
ESPEAK_WORDS_PER_MINUTE = 150

# Silence in seconds after paragraph i is PAUSE_PATTERN_S[i % len(PAUSE_PATTERN_S)].
# The lengths differ so that a pause detector's threshold can be tested.
PAUSE_PATTERN_S = (0.8, 1.5, 2.5, 1.0, 2.0, 1.2)
LEAD_SILENCE_S = 0.5
TAIL_SILENCE_S = 0.5

# A sample counts as speech when its absolute value exceeds this fraction of
# 16-bit full scale (about -40 dBFS). The margin keeps soft word onsets and
# endings that fall below the threshold.
SPEECH_THRESHOLD = int(0.01 * 32767)
TRIM_MARGIN_S = 0.03

VIDEO_SIZE = "320x240"
VIDEO_FPS = 10
VIDEO_CRF = 35
AUDIO_BITRATE = "48k"
AUDIO_SAMPLE_RATE = 22050


def read_paragraphs(text_path: Path) -> list[str]:
    """Split the text file into paragraphs at blank lines, joining wrapped lines."""
    text = text_path.read_text(encoding="utf-8")
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        joined = " ".join(block.split())
        if joined:
            paragraphs.append(joined)
    return paragraphs


def synthesize_paragraph(paragraph: str, wav_path: Path) -> None:
    # The text goes through stdin so that a paragraph starting with "-" is not
    # read as an espeak-ng option.
    subprocess.run(
        [
            "espeak-ng",
            "-v", ESPEAK_VOICE,
            "-s", str(ESPEAK_WORDS_PER_MINUTE),
            "-w", str(wav_path),
            "--stdin",
        ],
        input=paragraph,
        text=True,
        check=True,
    )


def read_trimmed_samples(wav_path: Path) -> tuple[array.array, int]:
    """Read the 16-bit mono samples of wav_path and cut leading and trailing near-silence.

    Returns the trimmed samples and the sample rate in Hz.
    """
    with wave.open(str(wav_path), "rb") as wav_file:
        if wav_file.getnchannels() != 1 or wav_file.getsampwidth() != 2:
            raise ValueError(
                f"{wav_path}: expected 16-bit mono WAV from espeak-ng, got "
                f"{wav_file.getnchannels()} channels of {8 * wav_file.getsampwidth()} bits"
            )
        sample_rate = wav_file.getframerate()
        samples = array.array("h", wav_file.readframes(wav_file.getnframes()))
    if sys.byteorder == "big":
        samples.byteswap()

    first_loud = next((i for i, value in enumerate(samples) if abs(value) > SPEECH_THRESHOLD), None)
    if first_loud is None:
        raise ValueError(f"{wav_path}: espeak-ng produced no audible speech")
    last_loud = next(i for i in range(len(samples) - 1, -1, -1) if abs(samples[i]) > SPEECH_THRESHOLD)
    margin = int(TRIM_MARGIN_S * sample_rate)
    start = max(0, first_loud - margin)
    end = min(len(samples), last_loud + 1 + margin)
    return samples[start:end], sample_rate


def build_speech_track(paragraphs: list[str], work_dir: Path, output_wav: Path) -> list[tuple[float, float]]:
    """Write all paragraphs as one WAV with the pause pattern between them.

    Returns the (start, end) time in seconds of each paragraph's speech.
    """
    clips = []
    for index, paragraph in enumerate(paragraphs):
        clip_path = work_dir / f"paragraph_{index + 1}.wav"
        synthesize_paragraph(paragraph, clip_path)
        clips.append(read_trimmed_samples(clip_path))

    sample_rate = clips[0][1]
    if any(rate != sample_rate for _, rate in clips):
        raise ValueError("espeak-ng wrote paragraphs at different sample rates")

    def silence(seconds: float) -> array.array:
        return array.array("h", bytes(2 * round(seconds * sample_rate)))

    track = silence(LEAD_SILENCE_S)
    spans = []
    for index, (samples, _) in enumerate(clips):
        start_s = len(track) / sample_rate
        track.extend(samples)
        spans.append((start_s, len(track) / sample_rate))
        if index < len(clips) - 1:
            track.extend(silence(PAUSE_PATTERN_S[index % len(PAUSE_PATTERN_S)]))
    track.extend(silence(TAIL_SILENCE_S))

    if sys.byteorder == "big":
        track.byteswap()
    with wave.open(str(output_wav), "wb") as wav_file:
        wav_file.setnchannels(1)
        wav_file.setsampwidth(2)
        wav_file.setframerate(sample_rate)
        wav_file.writeframes(track.tobytes())
    return spans


def encode_video(speech_wav: Path, duration_s: float, video_path: Path) -> None:
    """Mux the speech WAV with a testsrc2 picture into an H.264/AAC MP4.

    The bitexact flags and the dropped metadata keep encoder version strings
    and timestamps out of the file.
    """
    test_picture = f"testsrc2=size={VIDEO_SIZE}:rate={VIDEO_FPS}:duration={duration_s:.3f}"
    subprocess.run(
        [
            "ffmpeg", "-y", "-hide_banner", "-loglevel", "error",
            "-f", "lavfi", "-i", test_picture,
            "-i", str(speech_wav),
            "-map", "0:v", "-map", "1:a",
            "-c:v", "libx264", "-crf", str(VIDEO_CRF), "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", AUDIO_BITRATE,
            "-ar", str(AUDIO_SAMPLE_RATE), "-ac", "1",
            # With two threads, x264 gave different bytes on each run of a
            # 68 s clip. With one thread, the whole script took about 3 s on a
            # shared 2-core machine.
            "-threads", "1",
            "-map_metadata", "-1",
            "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
            "-movflags", "+faststart",
            "-shortest",
            str(video_path),
        ],
        check=True,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--text", type=Path, default=DEFAULT_TEXT_PATH,
        help=f"reference text, paragraphs separated by blank lines (default: {DEFAULT_TEXT_PATH})",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_VIDEO_PATH,
        help=f"MP4 file to write (default: {DEFAULT_VIDEO_PATH})",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    for program in ("espeak-ng", "ffmpeg"):
        if shutil.which(program) is None:
            print(f"error: {program} not found on PATH. Install it (Debian package: {program}).", file=sys.stderr)
            return 1

    if not args.text.is_file():
        print(f"error: reference text {args.text} not found. Pass an existing file with --text.", file=sys.stderr)
        return 1
    paragraphs = read_paragraphs(args.text)
    if not paragraphs:
        print(f"error: {args.text} contains no text. Add paragraphs separated by blank lines.", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="streamscribe-demo-") as work_dir_name:
        work_dir = Path(work_dir_name)
        speech_wav = work_dir / "speech.wav"
        spans = build_speech_track(paragraphs, work_dir, speech_wav)
        duration_s = spans[-1][1] + TAIL_SILENCE_S
        encode_video(speech_wav, duration_s, args.output)

    print(f"wrote {args.output} ({duration_s:.2f} s, {args.output.stat().st_size} bytes)")
    for index, (start_s, end_s) in enumerate(spans, start=1):
        print(f"paragraph {index}: speech {start_s:6.2f} s to {end_s:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
