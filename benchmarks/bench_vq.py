"""VQ lookup throughput and memory.

CPU: the torch path against the bare GEMM `z @ codebook.T` of the same shape (the floor:
a lookup cannot be cheaper than its dot products; goal: within 1.5x), the same GEMM into a
preallocated output (pure compute, no 512 MiB allocation), `torch.cdist(...).argmin()` (what
users write), and the reference (full distance matrix). CUDA (skipped without a GPU): the
Triton kernel against cdist+argmin and the torch path, and its roofline.
"""

import pytest
import torch

from benchmarks import roofline
from benchmarks._measure import median_time, mib, peak_extra_bytes
from t2i_kernels.vq import vq_lookup_fwd, vq_lookup_reference, vq_lookup_torch_fwd

SHAPES = [(16384, 64, 8192), (4096, 256, 1024), (65536, 32, 512)]
IDS = [f"N{n}-D{d}-K{k}" for n, d, k in SHAPES]


def _inputs(n, d, k, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g).to(device, dtype),
            torch.randn(k, d, generator=g).to(device, dtype))


def _gate(z, codebook, idx, rtol):
    """Every chosen code within tolerance of the true nearest (fp32 cdist, row chunks)."""
    worst = 0.0
    for s in range(0, z.shape[0], 2048):
        zc = z[s:s + 2048].float()
        dist = torch.cdist(zc, codebook.float()) ** 2
        chosen = dist.gather(1, idx[s:s + 2048, None])[:, 0]
        worst = max(worst, ((chosen - dist.min(1).values) / dist.min(1).values.abs().clamp_min(1))
                    .max().item())
    if worst > rtol:
        pytest.fail(f"correctness gate: a chosen code is {worst:.2e} (relative) further than the "
                    "nearest; no timing is reported")


def _gemm_into_buffer_time(z, codebook) -> float:
    """The GEMM's pure compute: its output buffer allocated (and freed) outside the timing."""
    out = torch.empty(z.shape[0], codebook.shape[0])
    return median_time(lambda: torch.mm(z, codebook.T, out=out), rounds=3)


@pytest.mark.parametrize("n, d, k", SHAPES, ids=IDS)
def bench_vq_lookup_cpu(benchmark, record, n, d, k):
    z, codebook = _inputs(n, d, k)
    _gate(z, codebook, vq_lookup_torch_fwd(z, codebook)[0], rtol=1e-4)

    benchmark.group = "vq_lookup: CPU torch path (fp32)"
    benchmark.pedantic(lambda: vq_lookup_torch_fwd(z, codebook), rounds=5, warmup_rounds=1)
    ours = benchmark.stats.stats.median
    alternatives = {
        "gemm": lambda: z @ codebook.T,
        "cdist_argmin": lambda: torch.cdist(z, codebook).argmin(1),
        "reference": lambda: vq_lookup_reference(z, codebook),
    }
    figures = {f"ratio_{name}": round(ours / median_time(fn, rounds=3), 3)
               for name, fn in alternatives.items()}
    figures["ratio_gemm_prealloc"] = round(ours / _gemm_into_buffer_time(z, codebook), 3)
    figures["peak_mib"] = mib(peak_extra_bytes(lambda: vq_lookup_torch_fwd(z, codebook)))
    for name, fn in alternatives.items():
        figures[f"peak_mib_{name}"] = mib(peak_extra_bytes(fn))
    record(**figures)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n, d, k", SHAPES, ids=IDS)
def bench_vq_lookup_cuda(benchmark, record, n, d, k, dtype):
    z, codebook = _inputs(n, d, k, dtype, "cuda")
    _gate(z, codebook, vq_lookup_fwd(z, codebook)[0], rtol=1e-4 if dtype == torch.float32
          else 1e-2)
    benchmark.group = f"vq_lookup: CUDA Triton ({str(dtype)[6:]})"
    benchmark.pedantic(lambda: (vq_lookup_fwd(z, codebook), torch.cuda.synchronize()),
                       rounds=20, warmup_rounds=3)
    ours = benchmark.stats.stats.median
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    paper = roofline.vq_lookup(n, d, k, name)
    gpu = "H100" if "H100" in torch.cuda.get_device_name() else "A100"
    record(
        ratio_cdist_argmin=round(ours / median_time(
            lambda: torch.cdist(z, codebook).argmin(1), rounds=10, device="cuda"), 3),
        ratio_torch_path=round(ours / median_time(
            lambda: vq_lookup_torch_fwd(z, codebook), rounds=10, device="cuda"), 3),
        ratio_gemm=round(ours / median_time(lambda: z @ codebook.T, rounds=10,
                                            device="cuda"), 3),
        roofline_fraction=round(paper[f"{gpu}_us"] / (ours * 1e6), 3),
        peak_mib=mib(peak_extra_bytes(lambda: vq_lookup_fwd(z, codebook), "cuda")),
        peak_mib_cdist_argmin=mib(peak_extra_bytes(
            lambda: torch.cdist(z, codebook).argmin(1), "cuda")),
    )
