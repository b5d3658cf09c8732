"""Decode a file's audio with ffmpeg in a worker thread and stream out segments.

ffmpeg (driven through ffmpeg-python, an argument list, no shell) writes 16 kHz PCM
to a pipe. A thread reads it block by block, scores each block with faster-whisper's
Silero VAD, feeds `PauseSplitter`, and hands finished pieces to the event loop
through a bounded queue. The bound keeps memory flat in the file's length: when the
workers fall behind, the thread stops reading and ffmpeg blocks on the full pipe.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np
from faster_whisper.vad import get_vad_model

from gpu_workers.segments import SAMPLE_RATE
from service.errors import DecodeError
from service.media import FFMPEG
from service.splitter import WINDOW, PauseSplitter, Piece, SplitConfig

logger = logging.getLogger(__name__)

BLOCK_WINDOWS = 64
"""VAD windows read per block: 64 x 512 samples is about 2 s of audio."""

CANCELLATION_RATIO = 0.25
"""A stereo mix quieter than this fraction of its louder channel counts as cancelled."""


@dataclass(frozen=True)
class DecodeSummary:
    """The end of a decode, sent after the last piece: the sample count and ffmpeg's warnings."""

    samples: int
    warnings: str
    truncated: bool


def _to_mono(block: np.ndarray, channels: int) -> np.ndarray:
    """Mix interleaved int16 audio to mono without letting opposite-phase channels cancel.

    A plain average of a stereo pair recorded with one channel inverted is silence.
    So when the mix is far quieter than the louder channel, that channel is used alone.
    """
    if channels == 1:
        return block
    frames = block.reshape(-1, channels).astype(np.float32)
    mix = frames.mean(axis=1)
    channel_rms = np.sqrt(np.mean(frames**2, axis=0))
    loudest = float(channel_rms.max())
    if loudest > 0 and float(np.sqrt(np.mean(mix**2))) < CANCELLATION_RATIO * loudest:
        mix = frames[:, int(channel_rms.argmax())]
    return np.clip(mix, -32768, 32767).astype(np.int16)


def _kill_process_group(process: subprocess.Popen[bytes]) -> None:
    """Kill `process` and every process it started, which share its process group."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def build_ffmpeg_args(path: Path, stream_index: int, channels: int, ffmpeg_binary: str = FFMPEG) -> list[str]:
    """Return ffmpeg's argument list to write one audio stream as 16 kHz s16le PCM to stdout.

    ffmpeg downmixes more than two channels to stereo, and its surround downmix keeps
    the centre channel, where speech usually is. The last step to mono is `_to_mono`.
    """
    stream = ffmpeg.input(str(path.resolve()))
    output = stream.output(
        "pipe:",
        format="s16le",
        acodec="pcm_s16le",
        ac=min(max(channels, 1), 2),
        ar=SAMPLE_RATE,
        map=f"0:{stream_index}",
        vn=None,
        sn=None,
        dn=None,
    )
    return [ffmpeg_binary, "-nostdin", "-hide_banner", "-loglevel", "warning", *output.get_args()]


class AudioDecoder:
    """One file's decode: an ffmpeg process, a reading thread and a bounded hand-off queue."""

    def __init__(
        self,
        path: Path,
        *,
        stream_index: int,
        channels: int,
        split: SplitConfig,
        max_queued: int = 4,
        total_timeout: float = 600.0,
        stall_timeout: float = 60.0,
        stderr_path: Path | None = None,
        ffmpeg_binary: str = FFMPEG,
    ) -> None:
        self.ffmpeg_binary = ffmpeg_binary
        self.path = path
        self.stream_index = stream_index
        self.channels = min(max(channels, 1), 2)
        self.splitter = PauseSplitter(split)
        self.total_timeout = total_timeout
        self.stall_timeout = stall_timeout
        self.stderr_path = stderr_path or path.with_name("ffmpeg.log")
        self._queue: queue.Queue[Piece | DecodeSummary | BaseException] = queue.Queue(max_queued)
        self._stop = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        # The start of the thread's current wait on ffmpeg's output (None between reads)
        # and the total of its past waits. The watchdog times only these waits.
        self._reading_since: float | None = None
        self._read_seconds = 0.0
        # Set once ffmpeg's process group is killed and its leader reaped, after which
        # the leader's id may belong to another process.
        self._reaped = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def pieces(self) -> AsyncIterator[Piece | DecodeSummary]:
        """Start ffmpeg and yield pieces as the thread produces them, then one `DecodeSummary`.

        Raises `DecodeError` when ffmpeg fails, stalls or outlives its time limit.
        """
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def notify() -> None:
            loop.call_soon_threadsafe(ready.set)

        self._thread = threading.Thread(
            target=self._run, args=(notify,), name=f"decode-{self.path.parent.name}", daemon=True
        )
        self._thread.start()
        try:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._queue.empty():
                        await ready.wait()
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, DecodeSummary):
                    return
        finally:
            self.cancel()
            await asyncio.to_thread(self._thread.join, 10)

    def cancel(self) -> None:
        """Stop the thread and kill ffmpeg; safe to call from any thread, more than once."""
        self._stop.set()
        process = self._process
        if process is not None and not self._reaped:
            _kill_process_group(process)

    def _put(self, item: Piece | DecodeSummary | BaseException, notify) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
            except queue.Full:
                continue
            notify()
            return True
        return False

    def _watchdog(self) -> None:
        # While the workers are behind, the thread waits on the full queue and ffmpeg on
        # the full pipe. That time is not ffmpeg's, so only waits on its output count.
        while not self._stop.wait(0.5):
            process = self._process
            if process is None or process.poll() is not None:
                return
            reading_since = self._reading_since
            if reading_since is None:
                continue
            waiting = time.monotonic() - reading_since
            if waiting > self.stall_timeout or self._read_seconds + waiting > self.total_timeout:
                logger.warning("ffmpeg on %s timed out; killing pid %d", self.path, process.pid)
                self._timed_out = True
                _kill_process_group(process)
                return

    def _run(self, notify) -> None:
        self._timed_out = False
        try:
            self._decode(notify)
        except BaseException as error:  # noqa: BLE001 - handed to the event loop, which raises it
            self._put(error, notify)
        finally:
            process = self._process
            if process is not None:
                _kill_process_group(process)
                process.wait()
                self._reaped = True

    def _decode(self, notify) -> None:
        args = build_ffmpeg_args(self.path, self.stream_index, self.channels, self.ffmpeg_binary)
        logger.debug("Running %s", args)
        with open(self.stderr_path, "wb") as stderr:
            # A session of its own puts every process that the `ffmpeg` setting starts in
            # one group, so one kill reaches them all. A wrapper script's child keeps the
            # stdout pipe open, and while it lives the reader never sees the end of output.
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                start_new_session=True,
            )
        threading.Thread(target=self._watchdog, daemon=True).start()
        vad = get_vad_model()
        assert self._process.stdout is not None
        frame_bytes = 2 * self.channels
        block_bytes = BLOCK_WINDOWS * WINDOW * frame_bytes
        leftover = b""
        while not self._stop.is_set():
            self._reading_since = time.monotonic()
            chunk = self._process.stdout.read(block_bytes - len(leftover))
            self._read_seconds += time.monotonic() - self._reading_since
            self._reading_since = None
            if not chunk:
                break
            leftover += chunk
            if len(leftover) < block_bytes:
                continue
            block = _to_mono(np.frombuffer(leftover, dtype="<i2"), self.channels)
            leftover = b""
            probs = vad(block.astype(np.float32) / 32768.0)
            for piece in self.splitter.feed(block, probs[: len(block) // WINDOW]):
                if not self._put(piece, notify):
                    return
        if self._stop.is_set():
            return
        returncode = self._process.wait()
        warnings = self.stderr_path.read_text("utf-8", "replace").strip()
        if self._timed_out:
            raise DecodeError(
                f"decoding stopped: ffmpeg produced no audio for {self.stall_timeout:g} s "
                f"or ran longer than {self.total_timeout:g} s",
                code="decode_timeout",
            )
        tail = leftover[: len(leftover) - len(leftover) % frame_bytes]
        pieces = []
        if tail:
            block = _to_mono(np.frombuffer(tail, dtype="<i2"), self.channels)
            padded = np.pad(block, (0, (-len(block)) % WINDOW)).astype(np.float32) / 32768.0
            probs = vad(padded)
            whole = len(block) - len(block) % WINDOW
            pieces += self.splitter.feed(block[:whole], probs[: whole // WINDOW])
            pieces += self.splitter.finish(block[whole:], probs[whole // WINDOW:])
        else:
            pieces += self.splitter.finish()
        for piece in pieces:
            if not self._put(piece, notify):
                return
        samples = self.splitter.samples_seen
        if returncode != 0 and samples == 0:
            raise DecodeError(f"ffmpeg could not decode the audio: {warnings[-500:] or 'no details'}")
        if samples == 0:
            raise DecodeError(
                "ffmpeg decoded zero audio samples; the audio stream is empty or unreadable",
                code="no_audio_decoded",
            )
        truncated = returncode != 0 or _looks_truncated(warnings)
        self._put(DecodeSummary(samples=samples, warnings=warnings[-2000:], truncated=truncated), notify)


_TRUNCATION_HINTS = (
    "end of file",
    "ended prematurely",
    "invalid data found",
    "truncat",
    "partial file",
    "error while decoding",
    "packet too small",
    "invalid ebml",
    "read error",
)


def _looks_truncated(warnings: str) -> bool:
    lowered = warnings.lower()
    return any(hint in lowered for hint in _TRUNCATION_HINTS)
