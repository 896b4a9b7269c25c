"""Test-wide settings: the models here are tiny, where one torch thread is fastest and immune to a
busy machine (two threads on a loaded 2-core box slow tiny ops down many times). ``--device cuda`` runs the
device-agnostic core tests (marked ``device``) on that device: ``python -m pytest -m device --device cuda``
(benchmarks/gpu_check.py does)."""

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers (toy.py) by name


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device of the tests marked 'device' (default: cpu)")


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device ``--device`` names; a CUDA device that is not there fails the test rather than skipping it."""
    chosen = torch.device(request.config.getoption("--device"))
    if chosen.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda, but torch sees no CUDA device")
    return chosen
