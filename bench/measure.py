"""Measurements shared by the benchmarks: word error rate, process memory and CPU, the machine."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import jiwer

from service.evaluation import normalize

BEAM_SIZE = 5
COMPUTE_TYPE = "int8"
"""Decoding settings shared by every benchmark, so all methods decode alike."""


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


def resident_bytes(pid: int | str = "self") -> int:
    """Return the process's resident memory now (VmRSS)."""
    return _status_field(pid, "VmRSS")


def cpu_seconds(pid: int | str = "self") -> float:
    """Return user plus system CPU time of a process and of its children that it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: utime, stime, cutime, cstime are fields 14-17 of stat(5),
    # that is indices 11-14 here, in clock ticks.
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Return the CPU seconds all processes have used since boot, summed over cores.

    Subtracting a measured process's own CPU time from the change over a measurement
    gives the CPU time other work took from it on a shared machine.
    """
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_idle_machine(max_busy_cores: float, sample_seconds: float = 3.0,
                          timeout: float = 900.0) -> float:
    """Block until all processes together use under `max_busy_cores` cores; return seconds waited.

    Busy time is sampled over `sample_seconds`. After `timeout` seconds it gives up and
    returns, so a benchmark on a loaded machine still finishes, with a message on stderr.
    A `max_busy_cores` of 0 or less returns at once.
    """
    if max_busy_cores <= 0:
        return 0.0
    started = time.monotonic()
    announced = False
    while True:
        before = machine_busy_seconds()
        time.sleep(sample_seconds)
        busy_cores = (machine_busy_seconds() - before) / sample_seconds
        waited = time.monotonic() - started
        if busy_cores < max_busy_cores:
            return waited
        if waited >= timeout:
            print(f"  machine still busy ({busy_cores:.2f} cores) after {waited:.0f} s; measuring anyway",
                  file=sys.stderr)
            return waited
        if not announced:
            print(f"  waiting for other work to finish ({busy_cores:.2f} cores busy)", file=sys.stderr)
            announced = True


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
