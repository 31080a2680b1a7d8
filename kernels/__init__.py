"""Triton kernels, installed as ``pyllm.kernels``: one file per kernel family, each exposing launchers
with the contract of the C++ ops (csrc/pyllm.cpp). Importing this package does not import triton."""
