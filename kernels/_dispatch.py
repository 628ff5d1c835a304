"""Backend choice for every kernel family: triton | torch | reference.

CUDA tensors take the Triton kernel, CPU tensors the torch path. `T2I_KERNEL_BACKEND`
forces one backend for every call (read per call, so tests and benchmarks can switch it).
Forcing `triton` on CPU tensors only works under `TRITON_INTERPRET=1` (tests).
A backend that fails raises: there is no silent fallback.
"""

import os

import torch

BACKENDS = ("reference", "torch", "triton")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(x: torch.Tensor) -> str:
    """The backend for an op whose main input is `x`."""
    forced = os.environ.get("T2I_KERNEL_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"T2I_KERNEL_BACKEND={forced!r}; expected one of {BACKENDS}")
        if forced == "triton" and not x.is_cuda and not interpreting():
            raise RuntimeError(
                "T2I_KERNEL_BACKEND=triton needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                "the kernels in the CPU interpreter)"
            )
        return forced
    return "triton" if x.is_cuda else "torch"
