import os

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _fake_backend():
    """Register the test-only "fake" detector backend (tests/fakes.py)."""
    import models

    models.register("fake", "fakes:FakeDetector")
    yield


@pytest.fixture
def torch_threads():
    """One thread fewer than the cores, as jobs sharing the machine use: on a shared 2-core machine two OpenMP
    threads beside another busy process make every op wait (10-30x slower)."""
    import torch

    from bone_r.runs import default_torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(default_torch_threads())
    yield
    torch.set_num_threads(before)
