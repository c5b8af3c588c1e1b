import os

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _fake_backend():
    """Register the test-only "fake" detector backend (tests/fakes.py)."""
    import models

    models.register("fake", "fakes:FakeDetector")
    yield
