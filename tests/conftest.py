from __future__ import annotations

import pytest

from tests.helpers import DEMO_VIDEO, SHARED_MEDIA, ServerProcess, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """One real service for the session, on the bundled model."""
    process = start_server(tmp_path_factory.mktemp("server"))
    yield process
    process.stop()


@pytest.fixture(scope="session")
def demo_video():
    if not DEMO_VIDEO.is_file():
        pytest.skip("sample_media/demo.mp4 is missing; run python sample_media/make_demo.py")
    return DEMO_VIDEO


@pytest.fixture(scope="session")
def shared_media():
    if not SHARED_MEDIA.is_dir():
        pytest.skip("../shared/media is not present")
    return SHARED_MEDIA
