"""Masked attention at B=4, H=8, L=1024, Dh=64.

CPU: the torch path against SDPA with the equivalent mask (goals: prefix 256 at least 1.3x
faster than SDPA with the dense mask, forward; no slower than SDPA for a padding mask).
CUDA (skipped without a GPU): the Triton kernel against SDPA with the dense mask, and its
fraction of the roofline over the tiles it visits.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks import roofline
from benchmarks._measure import interleaved_medians, median_time, mib, peak_extra_bytes
from t2i_kernels.attention import _Masks, attention_fwd, masked_attention_torch, visible_mask

B, H, L, D, PREFIX = 4, 8, 1024, 64, 256


def _case(kind, device="cpu", dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype).requires_grad_(grad)
               for _ in range(3))
    ours, sdpa_kw = {}, {}
    if kind == "prefix 256":
        ours["prefix_len"] = torch.full((B,), PREFIX, device=device)
        sdpa_kw["attn_mask"] = visible_mask(B, H, L, L, prefix_len=ours["prefix_len"],
                                            device=device)
    elif kind == "causal":
        ours["causal"], sdpa_kw["is_causal"] = True, True
    elif kind == "padding":
        kpm = torch.ones(B, L, dtype=torch.bool, device=device)
        for i, n in enumerate((1024, 900, 700, 512)):
            kpm[i, n:] = False
        ours["key_padding_mask"], sdpa_kw["attn_mask"] = kpm, kpm[:, None, None, :]
    return q, k, v, ours, sdpa_kw


def _gate(a, b, tol):
    if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
        pytest.fail("correctness gate: output differs from SDPA; no timing reported")


@pytest.mark.parametrize("kind", ["prefix 256", "causal", "padding", "none"])
def bench_attention_forward_cpu(benchmark, record, kind):
    q, k, v, ours, sdpa_kw = _case(kind)
    with torch.no_grad():
        _gate(masked_attention_torch(q, k, v, **ours),
              F.scaled_dot_product_attention(q, k, v, **sdpa_kw), 1e-4)
        benchmark.group = "masked_attention forward: CPU torch path, B=4 H=8 L=1024 Dh=64 fp32"
        benchmark.pedantic(lambda: masked_attention_torch(q, k, v, **ours), rounds=7,
                           warmup_rounds=1)
        t_ours, t_sdpa = interleaved_medians(
            lambda: masked_attention_torch(q, k, v, **ours),
            lambda: F.scaled_dot_product_attention(q, k, v, **sdpa_kw), rounds=9)
        record(ratio_sdpa=round(t_ours / t_sdpa, 3),
               peak_mib=mib(peak_extra_bytes(lambda: masked_attention_torch(q, k, v, **ours))),
               peak_mib_sdpa=mib(peak_extra_bytes(
                   lambda: F.scaled_dot_product_attention(q, k, v, **sdpa_kw))))


def bench_attention_forward_backward_cpu(benchmark, record):
    q, k, v, ours, sdpa_kw = _case("prefix 256", grad=True)
    go = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1))

    def step(fn):
        def run():
            for t in (q, k, v):
                t.grad = None
            fn().backward(go)
            return [t.grad for t in (q, k, v)]
        return run

    run_ours = step(lambda: masked_attention_torch(q, k, v, **ours))
    run_sdpa = step(lambda: F.scaled_dot_product_attention(q, k, v, **sdpa_kw))
    for a, b in zip(run_ours(), run_sdpa(), strict=True):
        _gate(a, b, 1e-3)
    benchmark.group = "masked_attention forward+backward: CPU, prefix 256, fp32"
    benchmark.pedantic(run_ours, rounds=3, warmup_rounds=1)
    t_ours, t_sdpa = interleaved_medians(run_ours, run_sdpa, rounds=5)
    record(ratio_sdpa=round(t_ours / t_sdpa, 3),
           peak_mib=mib(peak_extra_bytes(run_ours)), peak_mib_sdpa=mib(peak_extra_bytes(run_sdpa)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["prefix 256", "causal", "padding", "none"])
def bench_attention_forward_cuda(benchmark, record, kind):
    q, k, v, ours, sdpa_kw = _case(kind, "cuda", torch.bfloat16)
    prefix = ours.get("prefix_len", torch.zeros(B, dtype=torch.long, device="cuda")
                      if ours.get("causal") else None)
    masks = _Masks(q, k, prefix, ours.get("key_padding_mask"), None, 0.0)
    _gate(attention_fwd(q, k, v, masks, D ** -0.5)[0],
          F.scaled_dot_product_attention(q, k, v, **sdpa_kw), 2e-2)
    benchmark.group = "masked_attention forward: CUDA Triton, bf16"
    benchmark.pedantic(lambda: (attention_fwd(q, k, v, masks, D ** -0.5),
                                torch.cuda.synchronize()), rounds=50, warmup_rounds=5)
    ours_t = benchmark.stats.stats.median
    p = PREFIX if kind == "prefix 256" else 0 if kind == "causal" else None
    paper = roofline.attention(B, H, L, D, p, "bf16")
    gpu = "H100" if "H100" in torch.cuda.get_device_name() else "A100"
    dense = {"attn_mask": visible_mask(B, H, L, L, **{k: v for k, v in ours.items()},
                                       device="cuda")} if ours else {}
    record(ratio_sdpa=round(ours_t / median_time(
        lambda: F.scaled_dot_product_attention(q, k, v, **sdpa_kw), rounds=20, device="cuda"), 3),
        ratio_sdpa_dense_mask=round(ours_t / median_time(
            lambda: F.scaled_dot_product_attention(q, k, v, **dense), rounds=20,
            device="cuda"), 3),
        roofline_fraction=round(paper[f"{gpu}_us"] / (ours_t * 1e6), 3))
