"""t2i_kernels: hand-written Triton kernels with torch fallbacks.

Imports torch and triton only (never `t2i`), so other codebases can use the kernels alone.
Each public function dispatches on its inputs: CUDA tensors run the Triton kernel, CPU
tensors the optimised torch path; `T2I_KERNEL_BACKEND=reference|torch|triton` forces one.

    >>> from t2i_kernels import vq_lookup
    >>> indices, quantized = vq_lookup(torch.randn(4, 256, 64), torch.randn(1024, 64))
"""

from t2i_kernels.attention import masked_attention
from t2i_kernels.cross_entropy import linear_cross_entropy
from t2i_kernels.sampling import lowest_k_mask, sample_logits
from t2i_kernels.vq import VQStats, vq_lookup, vq_stats

__all__ = ["VQStats", "linear_cross_entropy", "lowest_k_mask", "masked_attention",
           "sample_logits", "vq_lookup", "vq_stats"]
