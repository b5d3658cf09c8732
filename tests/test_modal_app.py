"""The Modal app: what it registers and installs, and its GPU class run in-process.

Nothing here reaches Modal's servers. The registrations are read from `Function.info()`,
which modal 1.6.4 fills locally for functions defined in this process. The image
layers are rendered from the unbuilt `Image` objects (see `_image_layers`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import modal
import pytest

from gpu_workers.segments import SAMPLE_RATE, SegmentInput
from service.evaluation import word_error_rate
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
JFK_TEXT = ("And so, my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.")
MAX_WORD_ERROR_RATE = 0.1


@pytest.fixture(scope="module")
def modal_app():
    import gpu_workers.modal_app

    return gpu_workers.modal_app


def _image_layers(image: modal.Image) -> tuple[list[str], list[object]]:
    """Return the Dockerfile commands and the local-file mount entries of `image`.

    An unbuilt image is a chain of lazy layers. modal 1.6.4 keeps each layer's base
    images and Dockerfile function, or its base image and mount, only in the closure
    of the layer's loader. No public method lists them, so this reads the closures,
    which ties the helper to modal 1.6.4. Commands come oldest layer first.
    """
    from modal._image import LATEST_IMAGE_BUILDER_VERSION
    from modal._utils.async_utils import synchronizer

    commands: list[str] = []
    mount_entries: list[object] = []

    def visit(layer) -> None:
        loader = layer._load
        cells = dict(zip(loader.__code__.co_freevars,
                         (cell.cell_contents for cell in loader.__closure__ or ())))
        if "mount" in cells:
            visit(cells["base_image"])
            mount_entries.extend(synchronizer._translate_in(cells["mount"])._entries)
            return
        for base in cells.get("base_images", {}).values():
            visit(base)
        build_dockerfile = cells.get("dockerfile_function")
        if build_dockerfile is not None:
            commands.extend(build_dockerfile(LATEST_IMAGE_BUILDER_VERSION).commands)

    visit(synchronizer._translate_in(image))
    return commands, mount_entries


def _commands_with(commands: list[str], text: str) -> list[str]:
    return [command for command in commands if text in command]


def test_app_imports_without_credentials(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("MODAL_")}
    env["HOME"] = str(tmp_path)
    env["MODAL_CONFIG_PATH"] = str(tmp_path / "absent.toml")
    result = subprocess.run(
        [sys.executable, "-c", "import gpu_workers.modal_app as m; print(m.app.name)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == Settings().modal_app_name


def test_app_names_match_service_settings(modal_app):
    settings = Settings()
    assert modal_app.app.name == settings.modal_app_name
    # The backend looks the class up by this name with `modal.Cls.from_name`.
    assert isinstance(getattr(modal_app, settings.modal_class_name), modal.Cls)
    assert repr(modal_app.WhisperWorker) == f"Cls({settings.modal_class_name})"


def test_gpu_class_registration(modal_app):
    info = modal_app.WhisperWorker().transcribe.info()
    assert info.gpus == [(modal_app.GPU_TYPE, 1)]
    assert modal_app.GPU_TYPE == "L4"
    assert info.method_names == ["transcribe"]
    assert info.timeout == modal_app.SEGMENT_TIMEOUT
    assert info.startup_timeout == modal_app.STARTUP_TIMEOUT
    assert info.max_retries == 2
    assert info.batching_info is None
    assert info.concurrency_info.max_inputs == modal_app.INPUTS_PER_CONTAINER
    assert info.web_info is None
    mount = info.volumes[modal_app.MODEL_CACHE_DIR]
    assert mount.name == "streamscribe-models"
    assert not mount.read_only


def test_web_function_registration(modal_app):
    info = modal_app.web.info()
    assert info.web_info is not None
    assert info.web_info.method is None  # an ASGI app, not a single-route endpoint
    assert info.gpus == []
    assert info.timeout == modal_app.WEB_TIMEOUT
    assert info.concurrency_info.max_inputs == modal_app.WEB_CONCURRENT_REQUESTS
    assert info.volumes == {}


def test_web_function_builds_service_app(modal_app, tmp_path, monkeypatch):
    from fastapi import FastAPI

    from service.backends.modal import DEFAULT_IN_FLIGHT, ModalBackend

    monkeypatch.setenv("STREAMSCRIBE_DATABASE", str(tmp_path / "jobs.sqlite3"))
    monkeypatch.setenv("STREAMSCRIBE_TEMP_ROOT", str(tmp_path / "temp"))
    service_app = modal_app.web.local()

    assert isinstance(service_app, FastAPI)
    backend = service_app.state.backend
    assert isinstance(backend, ModalBackend)
    assert backend.ready
    expected = max(DEFAULT_IN_FLIGHT, modal_app.MAX_CONTAINERS * modal_app.INPUTS_PER_CONTAINER)
    assert backend.in_flight == expected
    assert service_app.state.settings.backend == "modal"


def test_images_install_pinned_packages(modal_app):
    for image in (modal_app.gpu_image, modal_app.web_image):
        commands, _ = _image_layers(image)
        assert commands[0] == f"FROM {modal_app.BASE_IMAGE}"
        assert modal_app.BASE_IMAGE.startswith(f"python:{modal_app.PYTHON_VERSION}.")
        assert _commands_with(commands, "apt-get install -y ffmpeg")
        pip_lines = _commands_with(commands, "pip install")
        for package in modal_app.PYTHON_PACKAGES:
            assert "==" in package, f"{package} is not pinned"
            assert any(package in line for line in pip_lines), f"{package} is not installed"


def test_gpu_image_adds_cublas_only_there(modal_app):
    gpu_commands, _ = _image_layers(modal_app.gpu_image)
    web_commands, _ = _image_layers(modal_app.web_image)
    assert _commands_with(gpu_commands, "nvidia-cublas-cu12==12.8.4.1")
    assert _commands_with(gpu_commands, f"echo {modal_app.CUBLAS_LIBRARY_DIR}")
    assert _commands_with(gpu_commands, "ldconfig")
    assert not _commands_with(web_commands, "nvidia-")
    assert not _commands_with(gpu_commands + web_commands, "torch")


def test_images_add_project_code(modal_app):
    for image in (modal_app.gpu_image, modal_app.web_image):
        _, entries = _image_layers(image)
        modules = {entry.module_name for entry in entries if hasattr(entry, "module_name")}
        assert modules == {"gpu_workers", "service"}
        folders = {str(entry.remote_path) for entry in entries if hasattr(entry, "local_dir")}
        expected = {"/root/web"} if (ROOT / "web").is_dir() else set()
        assert folders == expected


def _read_wav(path: Path) -> bytes:
    with wave.open(str(path)) as audio:
        assert audio.getframerate() == SAMPLE_RATE
        assert audio.getnchannels() == 1
        assert audio.getsampwidth() == 2
        return audio.readframes(audio.getnframes())


@pytest.mark.filterwarnings("ignore:The WhisperWorker.transcribe function is executing locally")
def test_gpu_class_runs_locally_on_bundled_model(modal_app, monkeypatch):
    jfk = SHARED_MEDIA / "jfk.wav"
    if not jfk.is_file():
        pytest.skip(f"{jfk} is not present")
    monkeypatch.setenv("STREAMSCRIBE_MODAL_MODEL", "bundled")
    segment = SegmentInput(index=3, offset=12.5, pcm=_read_wav(jfk))

    worker = modal_app.WhisperWorker()
    result = worker.transcribe.local(segment)
    transcriber = worker.transcriber
    second = worker.transcribe.local(segment)

    assert result.error is None
    assert result.index == 3
    assert result.start == 12.5
    assert result.end == pytest.approx(12.5 + 11.0, abs=0.01)
    assert word_error_rate(JFK_TEXT, result.text) <= MAX_WORD_ERROR_RATE, result.text
    assert all(12.5 <= cue.start <= cue.end <= result.end for cue in result.cues)
    assert worker.transcriber is transcriber  # `@modal.enter` ran once for both calls
    assert second.text == result.text
