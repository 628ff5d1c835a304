"""t2i_kernels: hand-written Triton kernels with torch fallbacks.

Imports torch and triton only (never `t2i`), so other codebases can use the kernels alone.
Each public function dispatches on its inputs: CUDA tensors run the Triton kernel, CPU
tensors the optimised torch path; `T2I_KERNEL_BACKEND=reference|torch|triton` forces one.
"""

__all__: list[str] = []
