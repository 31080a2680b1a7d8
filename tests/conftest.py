"""Test configuration.

PYLLM_TEST_DEVICE=cuda runs the op tests on CUDA tensors with the cuda and triton backends (the GPU
script sets it); by default they run on CPU tensors with the cpu backend and the Triton kernels under
the interpreter (TRITON_INTERPRET=1, set here before anything imports triton).
PYLLM_REQUIRE_BACKENDS=cpu,triton (set by .ci/run) turns "backend not available" skips into failures,
so a broken build can never pass as skipped tests.
"""
import os

DEVICE = os.environ.get("PYLLM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import pyllm  # noqa: E402

KERNEL_BACKENDS = ["cpu", "triton"] if DEVICE == "cpu" else ["cuda", "triton"]
REQUIRED = [b for b in os.environ.get("PYLLM_REQUIRE_BACKENDS", "").split(",") if b]


def need(backend: str) -> None:
    """Skip (or, when the backend is required, fail) if ``backend`` is not available here."""
    why = pyllm.backends.unavailable().get(backend)
    if why is None:
        return
    if backend in REQUIRED:
        pytest.fail(f"backend {backend!r} is required (PYLLM_REQUIRE_BACKENDS) but not available: {why}")
    pytest.skip(f"backend {backend!r} not available: {why}")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
