"""Fused linear cross-entropy, forward + backward, against F.cross_entropy on the full
logits (goal at N=8192, C=512, V=8192: peak memory at most 1/4 of it, and no slower)."""

import pytest
import torch

from benchmarks._measure import median_time, mib, peak_extra_bytes
from t2i_kernels.cross_entropy import (
    LinearCrossEntropyFunction,
    cross_entropy_rows_fwd,
    cross_entropy_rows_torch,
    linear_cross_entropy_reference,
)

SHAPES = [(8192, 512, 8192), (4096, 256, 16384)]


def _inputs(n, c, v, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, c, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, c, generator=g) * 0.05).to(device, dtype).requires_grad_()
    return hidden, weight, torch.randint(0, v, (n,), generator=g).to(device)


def _step(fn, hidden, weight, targets):
    def run():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets)
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad
    return run


def _ours(rows_fn):
    return lambda h, w, t: LinearCrossEntropyFunction.apply(h, w, None, t, -100, 0.0, rows_fn)


def _gate(ours, ref, rtol):
    for a, b in zip(ours(), ref(), strict=True):
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * 1e-2):
            pytest.fail("correctness gate: loss or gradients differ; no timing reported")


@pytest.mark.parametrize("n, c, v", SHAPES, ids=[f"N{n}-C{c}-V{v}" for n, c, v in SHAPES])
def bench_linear_cross_entropy_cpu(benchmark, record, n, c, v):
    h, w, t = _inputs(n, c, v)
    ours = _step(_ours(cross_entropy_rows_torch), h, w, t)
    ref = _step(lambda *a: linear_cross_entropy_reference(*a), h, w, t)
    _gate(ours, ref, 1e-4)
    benchmark.group = "linear_cross_entropy: CPU torch path, forward + backward, fp32"
    benchmark.pedantic(ours, rounds=3, warmup_rounds=1)
    peak, peak_ref = peak_extra_bytes(ours), peak_extra_bytes(ref)
    record(ratio_reference=round(benchmark.stats.stats.median / median_time(ref, rounds=3), 3),
           peak_mib=mib(peak), peak_mib_reference=mib(peak_ref),
           peak_ratio_reference=round(peak / peak_ref, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, c, v", SHAPES, ids=[f"N{n}-C{c}-V{v}" for n, c, v in SHAPES])
def bench_linear_cross_entropy_cuda(benchmark, record, n, c, v):
    h, w, t = _inputs(n, c, v, "cuda", torch.bfloat16)
    ours = _step(_ours(cross_entropy_rows_fwd), h, w, t)
    ref = _step(lambda *a: linear_cross_entropy_reference(*a), h, w, t)
    _gate(ours, ref, 3e-2)
    benchmark.group = "linear_cross_entropy: CUDA, forward + backward, bf16"
    benchmark.pedantic(lambda: (ours(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
    peak, peak_ref = peak_extra_bytes(ours, "cuda"), peak_extra_bytes(ref, "cuda")
    record(ratio_reference=round(benchmark.stats.stats.median / median_time(
        ref, rounds=10, device="cuda"), 3), peak_mib=mib(peak), peak_mib_reference=mib(peak_ref))
