"""The server's C memory allocator: jemalloc where it is installed, glibc's malloc otherwise.

With glibc's malloc, the server's resident peak grew with video length: 367, 473 and
524 MB at 1, 10 and 60 minutes. The memory in use at the peak hardly grew (225 to
239 MB). The two workers' allocations, many of them several megabytes, interleave in
glibc's arenas and leave free memory scattered there that glibc does not give back.
jemalloc spreads threads over several arenas, so each worker tends to reuse its own
blocks: with `JEMALLOC_CONF` the peak was 523, 590 and 606 MB, higher for short videos
but reached within the first minute (`python -m bench.compare`, three rounds each).
The 60-minute job also took about 12 % less CPU, 123 to 126 s against 141 to 144 s,
because large blocks are reused rather than mapped afresh. docs/benchmarks.md compares
more allocators and options.

A process's malloc can only be replaced before the C library hands out its first block,
which means before Python starts. `streamscribe serve` therefore calls `restart_under()`
first: when the setting requests jemalloc and it is not loaded yet, the same command runs
again, in the same process (`exec`), with the library in LD_PRELOAD.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

CHOICES = ("auto", "jemalloc", "system")
"""Named values of the `allocator` setting, which also accepts the path of a jemalloc library."""

JEMALLOC_CONF = "oversize_threshold:0"
"""jemalloc options the server starts with, unless MALLOC_CONF is set.

By default jemalloc gives blocks of 8 MiB or more to an arena of their own that returns
them to the system as soon as they are freed. The encoder's attention matrices, 51.5 MiB
each with tiny.en, then come back as fresh pages, zeroed by the kernel, in every call.
With jemalloc's defaults the 10-minute video took 14.5 s and 27.7 s of CPU. With this
option large blocks stay in the arena of the thread that freed them, and it took 12.3 s
and 23.6 s of CPU.
"""

MALLOC_ARENAS = 2
"""Maximum number of glibc malloc arenas, unless the MALLOC_ARENA_MAX variable is set.

glibc gives threads arenas of their own, up to eight per core, and memory freed in one
arena serves only the threads that use it. With two workers, the 10-minute benchmark video
peaked at 501 MB with two arenas against 586 MB without a limit, for the same time
(three runs each of `bench.compare --service`).
"""

M_ARENA_MAX = -8
"""glibc's `mallopt` parameter number for the arena limit (malloc.h)."""


def restart_command(
    choice: str,
    environ: Mapping[str, str],
    argv: list[str],
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
) -> tuple[list[str], dict[str, str]] | None:
    """Return the command and environment that run `argv` again under jemalloc.

    None means the process can go on as it is: the choice is "system", jemalloc is
    already in LD_PRELOAD, or "auto" found no jemalloc. Raises ValueError for an unknown
    choice and FileNotFoundError when "jemalloc" or a path names a library that is not
    there.
    """
    if choice not in CHOICES and "/" not in choice:
        raise ValueError(f"invalid STREAMSCRIBE_ALLOCATOR {choice!r}: expected one of "
                         f"{', '.join(CHOICES)}, or the path of a jemalloc library")
    if choice == "system" or platform.system() != "Linux":
        return None
    if choice in ("auto", "jemalloc"):
        library = find_library("jemalloc")
        if library is None:
            if choice == "jemalloc":
                raise FileNotFoundError("STREAMSCRIBE_ALLOCATOR=jemalloc, but the jemalloc library was not "
                                        "found: install it (Debian and Ubuntu: apt-get install "
                                        "libjemalloc2) or set STREAMSCRIBE_ALLOCATOR=system")
            return None
    else:
        if not Path(choice).is_file():
            raise FileNotFoundError(f"STREAMSCRIBE_ALLOCATOR={choice!r}: library file not found")
        library = choice
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if any(Path(item).name == Path(library).name for item in preloaded):
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join([library, *preloaded])
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return argv, env


def restart_under(choice: str) -> None:
    """Replace this process with the same command under jemalloc when `choice` requests it.

    Call it before anything starts a thread; nothing after it runs when it restarts.
    """
    command = restart_command(choice, os.environ, [sys.executable, *sys.orig_argv[1:]])
    if command is not None:
        argv, env = command
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)


def loaded_allocator() -> str:
    """Return the name of the allocator this process runs on: "jemalloc" or the C library's malloc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if "libjemalloc" in maps:
        return "jemalloc"
    libc = platform.libc_ver()[0]
    return f"{libc} malloc" if libc else "the C library's malloc"


def limit_glibc_arenas(count: int = MALLOC_ARENAS) -> None:
    """Limit glibc's malloc to `count` arenas. Under any other allocator, do nothing.

    A process started with MALLOC_ARENA_MAX keeps what it was given. Call it before the
    model starts CTranslate2's threads, which take their arenas when they first allocate.
    """
    if "MALLOC_ARENA_MAX" in os.environ or loaded_allocator() != "glibc malloc":
        return
    if not ctypes.CDLL(None).mallopt(M_ARENA_MAX, count):
        logger.warning("mallopt failed to limit malloc to %d arenas; set MALLOC_ARENA_MAX=%d "
                       "before starting the server to lower peak memory", count, count)
