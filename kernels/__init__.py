"""Triton kernels, installed as ``pyllm.kernels``: one file per kernel family, each exposing launchers
with the contract of the C++ ops (csrc/pyllm.cpp). Importing this package does not import triton."""
import os


def interpreting() -> bool:
    """Whether the Triton kernels run in Triton's interpreter (on CPU tensors) instead of compiled for a GPU.

    The one answer pyllm uses (dispatch, launchers, checks). ``triton.jit`` reads ``TRITON_INTERPRET`` when a
    kernel is defined, so set it before anything imports triton (tests/conftest.py does).
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
