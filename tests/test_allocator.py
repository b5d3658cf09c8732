"""The server runs on jemalloc when it is installed, and on glibc's malloc when configured so."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.allocator import JEMALLOC_CONF, restart_command
from tests.helpers import ROOT, ServerProcess, start_server, transcribe

JEMALLOC = ctypes.util.find_library("jemalloc")
needs_jemalloc = pytest.mark.skipif(
    JEMALLOC is None, reason="needs jemalloc (Debian: apt-get install libjemalloc2)"
)
ARGV = ["/usr/bin/python3", "-m", "service.cli", "serve"]


def found(name: str) -> str | None:
    return "libjemalloc.so.2" if name == "jemalloc" else None


def missing(name: str) -> None:
    return None


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_auto_restarts_with_jemalloc_preloaded():
    argv, env = restart_command("auto", {"PATH": "/bin"}, ARGV, found)
    assert argv == ARGV
    assert env["LD_PRELOAD"] == "libjemalloc.so.2"
    assert env["PATH"] == "/bin"


def test_restart_keeps_other_preloaded_libraries():
    _, env = restart_command("auto", {"LD_PRELOAD": "/opt/libhook.so"}, ARGV, found)
    assert env["LD_PRELOAD"].split() == ["libjemalloc.so.2", "/opt/libhook.so"]


@pytest.mark.parametrize("preload", ["libjemalloc.so.2", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                                     "/opt/libhook.so:libjemalloc.so.2"])
def test_no_restart_when_already_preloaded(preload):
    assert restart_command("auto", {"LD_PRELOAD": preload}, ARGV, found) is None


def test_restart_sets_jemalloc_options():
    _, env = restart_command("auto", {}, ARGV, found)
    assert env["MALLOC_CONF"] == JEMALLOC_CONF


def test_operator_malloc_conf_is_kept():
    _, env = restart_command("auto", {"MALLOC_CONF": "narenas:1"}, ARGV, found)
    assert env["MALLOC_CONF"] == "narenas:1"


def test_no_restart_for_system_or_missing():
    assert restart_command("system", {}, ARGV, found) is None
    assert restart_command("auto", {}, ARGV, missing) is None


def test_required_jemalloc_missing_raises():
    with pytest.raises(FileNotFoundError, match="apt-get install libjemalloc2"):
        restart_command("jemalloc", {}, ARGV, missing)


def test_library_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="library file not found"):
        restart_command(str(tmp_path / "libjemalloc.so.2"), {}, ARGV, found)
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    _, env = restart_command(str(library), {}, ARGV, missing)
    assert env["LD_PRELOAD"] == str(library)


def test_unknown_choice_raises():
    with pytest.raises(ValueError, match="auto, jemalloc, system"):
        restart_command("tcmalloc", {}, ARGV, found)


def test_serve_rejects_unknown_allocator():
    env = {**os.environ, "STREAMSCRIBE_ALLOCATOR": "tcmalloc"}
    result = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "1"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid STREAMSCRIBE_ALLOCATOR 'tcmalloc'" in result.stderr


@needs_jemalloc
def test_default_server_runs_on_jemalloc(server: ServerProcess):
    assert "libjemalloc" in mapped_libraries(server.process.pid)
    assert "Memory allocator: jemalloc" in server.log()


@needs_jemalloc
def test_system_allocator_server_transcribes(tmp_path, demo_video):
    env_preload = os.environ.pop("LD_PRELOAD", None)
    try:
        server = start_server(tmp_path, allocator="system")
    finally:
        if env_preload is not None:
            os.environ["LD_PRELOAD"] = env_preload
    try:
        assert "libjemalloc" not in mapped_libraries(server.process.pid)
        assert "Memory allocator: glibc malloc" in server.log()
        events = transcribe(server.url, demo_video)
        assert events[-1].name == "done"
        assert events[-1].data["status"] == "completed"
        assert any(event.name == "segment" and event.data["text"].strip() for event in events)
    finally:
        server.stop()
