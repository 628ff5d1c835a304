"""Token sampling and MaskGIT re-masking.

CPU: the torch path against the sort-based reference (goal: top-k 64 + top-p 0.9 at B=256,
V=8192 at least 3x faster). CUDA (skipped without a GPU): the Triton kernels against the
torch path and the reference, and the fraction of the memory roofline (logits read once).
"""

import pytest
import torch

from benchmarks import roofline
from benchmarks._measure import median_time, mib, peak_extra_bytes
from t2i_kernels.sampling import (
    lowest_k_mask_fwd,
    lowest_k_mask_reference,
    lowest_k_mask_torch,
    sample_logits_fwd,
    sample_logits_reference,
    sample_logits_torch,
)

SETTINGS = {"top-k64 top-p0.9": dict(top_k=64, top_p=0.9), "top-p0.9": dict(top_p=0.9),
            "plain": {}, "greedy": dict(temperature=0.0), "cfg3 top-k64": dict(top_k=64)}


def _logits(b, v, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, v, generator=g) * 3).to(device, dtype)


def _kwargs(name, x):
    kw = dict(SETTINGS[name])
    if name.startswith("cfg"):
        kw.update(cond_logits=x.flip(0), cfg_scale=3.0)
    return kw


def _gate(x, kw, fn):
    """Same noise, same tokens as the reference, for both kinds of noise (one uniform a
    token: the race; one a row: the inverse CDF, which the torch path also takes when it
    draws its own); else no timing."""
    ref_kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    for shape in (x.shape, x.shape[:1]):
        u = torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(x.device)
        got = fn(x, noise=u, **kw)[0]
        want = sample_logits_reference(x.cpu(), noise=u.cpu(), **ref_kw)[0]
        if not torch.equal(got.cpu(), want):
            pytest.fail(f"correctness gate: draws with noise {tuple(shape)} differ from the "
                        f"reference; no timing reported")


@pytest.mark.parametrize("name", list(SETTINGS))
def bench_sample_logits_cpu(benchmark, record, name):
    x = _logits(256, 8192)
    kw = _kwargs(name, x)
    _gate(x, kw, sample_logits_torch)
    benchmark.group = "sample_logits: CPU torch path, B=256 V=8192 fp32"
    benchmark.pedantic(lambda: sample_logits_torch(x, **kw), rounds=7, warmup_rounds=1)
    ours = benchmark.stats.stats.median
    record(ratio_reference=round(ours / median_time(
        lambda: sample_logits_reference(x, **kw), rounds=5), 3),
        peak_mib=mib(peak_extra_bytes(lambda: sample_logits_torch(x, **kw))),
        peak_mib_reference=mib(peak_extra_bytes(lambda: sample_logits_reference(x, **kw))))


@pytest.mark.parametrize("b, n", [(32, 256), (32, 1024), (8, 4096)],
                         ids=["B32-L256", "B32-L1024", "B8-L4096"])
def bench_lowest_k_mask_cpu(benchmark, record, b, n):
    s = torch.rand(b, n, generator=torch.Generator().manual_seed(0))
    k = torch.randint(0, n, (b,), generator=torch.Generator().manual_seed(1))
    if not torch.equal(lowest_k_mask_torch(s, k), lowest_k_mask_reference(s, k)):
        pytest.fail("correctness gate: masks differ from the reference")
    benchmark.group = "lowest_k_mask: CPU torch path"
    benchmark.pedantic(lambda: lowest_k_mask_torch(s, k), rounds=20, warmup_rounds=2)
    record(ratio_reference=round(benchmark.stats.stats.median / median_time(
        lambda: lowest_k_mask_reference(s, k), rounds=20), 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SETTINGS))
def bench_sample_logits_cuda(benchmark, record, name, dtype):
    x = _logits(256, 8192, "cuda", dtype)
    kw = _kwargs(name, x)
    _gate(x, kw, sample_logits_fwd)
    benchmark.group = f"sample_logits: CUDA Triton, B=256 V=8192 {str(dtype)[6:]}"
    benchmark.pedantic(lambda: (sample_logits_fwd(x, **kw), torch.cuda.synchronize()),
                       rounds=50, warmup_rounds=5)
    ours = benchmark.stats.stats.median
    paper = roofline.sample_logits(256, 8192, "fp32" if dtype == torch.float32 else "bf16",
                                   cfg=name.startswith("cfg"))
    gpu = "H100" if "H100" in torch.cuda.get_device_name() else "A100"
    record(ratio_torch_path=round(ours / median_time(
        lambda: sample_logits_torch(x, **kw), rounds=10, device="cuda"), 3),
        ratio_reference=round(ours / median_time(
            lambda: sample_logits_reference(x, **kw), rounds=10, device="cuda"), 3),
        roofline_fraction=round(paper[f"{gpu}_us"] / (ours * 1e6), 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def bench_lowest_k_mask_cuda(benchmark, record):
    s = torch.rand(32, 1024, device="cuda")
    k = torch.randint(0, 1024, (32,), device="cuda")
    if not torch.equal(lowest_k_mask_fwd(s, k).cpu(), lowest_k_mask_reference(s.cpu(), k.cpu())):
        pytest.fail("correctness gate: masks differ from the reference")
    benchmark.group = "lowest_k_mask: CUDA Triton, B=32 L=1024"
    benchmark.pedantic(lambda: (lowest_k_mask_fwd(s, k), torch.cuda.synchronize()), rounds=50)
    record(ratio_reference=round(benchmark.stats.stats.median / median_time(
        lambda: lowest_k_mask_reference(s, k), rounds=20, device="cuda"), 3))
