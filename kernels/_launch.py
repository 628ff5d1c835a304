"""Every Triton launch in t2i_kernels goes through `launch`, so that `t2i_kernels.aot` can
run the real launchers on CPU tensors and record the exact specialisations they would
compile (dtypes, alignment, constexprs, warps) instead of launching them."""

from collections.abc import Callable
from contextlib import contextmanager

_recorder: Callable | None = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or hand the launch to the active recorder."""
    if _recorder is not None:
        _recorder(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextmanager
def recording(callback: Callable):
    """Within the block, launches call callback(kernel, grid, args, kwargs) instead."""
    global _recorder
    previous, _recorder = _recorder, callback
    try:
        yield
    finally:
        _recorder = previous
