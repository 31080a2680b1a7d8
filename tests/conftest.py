"""Test configuration.

PYLLM_TEST_DEVICE=cuda runs the op tests on CUDA tensors with the cuda and triton backends (the GPU
script sets it); by default they run on CPU tensors with the cpu backend and the Triton kernels under
the interpreter (TRITON_INTERPRET=1, set here before anything imports triton). On CUDA tensors the Triton
kernels run without autotuning unless PYLLM_TRITON_AUTOTUNE is set.
PYLLM_REQUIRE_BACKENDS=cpu,triton (set by .ci/run) turns "backend not available" skips into failures,
so a broken build can never pass as skipped tests.
PYLLM_TEST_BACKENDS=cuda (or triton, ...) narrows the kernel backends the op tests parametrize over, so the
GPU script runs each backend's test files in processes of their own. PYLLM_TEST_TIMEOUT=S fails
a test that runs longer than S seconds (SIGALRM; a GPU script backstops a hang inside C with `timeout`).
"""
import os
import signal

DEVICE = os.environ.get("PYLLM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
else:  # the tests check numbers, not speed: one heuristic Triton config per shape, no autotuning (with it, the
    # triton attention files ran out of time on an H200, 2026-11-30); PYLLM_TRITON_AUTOTUNE=1 overrides
    os.environ.setdefault("PYLLM_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

import pyllm  # noqa: E402

KERNEL_BACKENDS = ["cpu", "triton"] if DEVICE == "cpu" else ["cuda", "triton"]
if os.environ.get("PYLLM_TEST_BACKENDS"):
    KERNEL_BACKENDS = [b for b in KERNEL_BACKENDS if b in os.environ["PYLLM_TEST_BACKENDS"].split(",")]
TIMEOUT_S = int(os.environ.get("PYLLM_TEST_TIMEOUT", "0") or 0)
REQUIRED = [b for b in os.environ.get("PYLLM_REQUIRE_BACKENDS", "").split(",") if b]


def need(backend: str) -> None:
    """Skip (or, when the backend is required, fail) if ``backend`` is not available here."""
    why = pyllm.backends.unavailable().get(backend)
    if why is None:
        return
    if backend in REQUIRED:
        pytest.fail(f"backend {backend!r} is required (PYLLM_REQUIRE_BACKENDS) but not available: {why}")
    pytest.skip(f"backend {backend!r} not available: {why}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Under PYLLM_TEST_TIMEOUT, a test that runs too long fails (and the next one starts)."""
    if TIMEOUT_S <= 0:
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran longer than PYLLM_TEST_TIMEOUT={TIMEOUT_S}s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
