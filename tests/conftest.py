import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import Proc  # noqa: E402


@pytest.fixture
def procs():
    """Processes a test starts; every one is killed at the end, whatever happened."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


@pytest.fixture
def sample_csv(tmp_path):
    path = tmp_path / "gpu.csv"
    path.write_bytes(
        b"gpu_id,utilization,temperature,memory_used,hostname,active\n"
        + b"".join(b"%d,%d.5,%d,%d,node-%d,%s\n" % (i % 8, i % 100, 40 + i % 30, 1024 * i, i % 3, b"true" if i % 2 else b"false") for i in range(200))
    )
    return str(path)
