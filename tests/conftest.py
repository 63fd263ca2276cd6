"""Test setup: without CUDA the Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, which is why it is set here, before any
test module imports the package.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Infinity-norm relative error ``max|a − e| / max|e|`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each trainer run configures accelerate's process-wide state (mixed precision among it): start every test
    from a clean one, whatever the previous test ran with."""
    yield
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state(True)
