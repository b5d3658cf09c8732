"""Measurements shared by the benchmarks: word error rate, process memory and CPU, the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import jiwer

from service.evaluation import normalize


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Return the word error rate after `service.evaluation.normalize`, computed by jiwer.

    The same number as `service.evaluation.word_error_rate`, whose pure-Python edit
    distance takes minutes on an hour of text; jiwer's runs in C (rapidfuzz).
    """
    reference_words = normalize(reference)
    if not reference_words:
        raise ValueError("the reference text has no words")
    hypothesis_words = normalize(hypothesis)
    if not hypothesis_words:
        return 1.0
    return jiwer.wer(" ".join(reference_words), " ".join(hypothesis_words))


def _status_field(pid: int | str, name: str) -> int:
    """Return a `kB` field of /proc/PID/status in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/{pid}/status has no {name} field")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Return the process's peak resident memory (VmHWM), which Linux keeps for its life."""
    return _status_field(pid, "VmHWM")


def cpu_seconds(pid: int | str = "self") -> float:
    """Return user plus system CPU time of a process and of its children that it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: utime, stime, cutime, cstime are fields 14-17 of stat(5),
    # that is indices 11-14 here, in clock ticks.
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def describe_machine() -> dict[str, str]:
    """Return the CPU model, core count, memory and OS of this machine, for reports."""
    cpu_model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory = _meminfo_field("MemTotal")
    return {
        "cpu": cpu_model,
        "cores": str(len(os.sched_getaffinity(0))),
        "memory": f"{memory / 1024**3:.1f} GiB",
        "system": f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
    }


def _meminfo_field(name: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"/proc/meminfo has no {name} field")


def usable_cores() -> int:
    """Return the number of cores this process may run on."""
    return len(os.sched_getaffinity(0))
