"""The Triton kernels compiled for and run on a real GPU, against the references in fp32/fp64.

Skipped on machines without CUDA (CI) and under the interpreter. On a GPU machine:

    TRITON_INTERPRET=0 pytest tests/kernels/test_cuda.py

What the interpreter cannot check is checked here: bf16 arithmetic, tensor-core precision
(tf32 dots in attention, tf32x3 in the VQ lookup), sizes of thousands of rows, in-kernel
Philox noise and many programs racing. Errors are relative norms ||got - ref|| / ||ref||
against a reference computed in fp64 (attention, cross-entropy) or exact comparisons
(indices, token draws, masks). Outputs are allocated by the kernels themselves from
torch.empty, which is poisoned here (NaN / -1) so that unwritten elements fail.
"""

import pytest
import torch

from t2i_kernels._dispatch import interpreting
from t2i_kernels.attention import (
    MaskedAttentionFunction,
    _Masks,
    dropout_keep_mask,
    masked_attention_reference,
)
from t2i_kernels.cross_entropy import (
    LinearCrossEntropyFunction,
    cross_entropy_rows_fwd,
    linear_cross_entropy_reference,
)
from t2i_kernels.sampling import (
    lowest_k_mask_fwd,
    lowest_k_mask_reference,
    sample_logits_fwd,
    sample_logits_reference,
)
from t2i_kernels.vq import VQLookupFunction, vq_lookup_fwd, vq_lookup_reference
from tests.kernels.test_attention import _masks as attention_masks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                                reason="needs a CUDA GPU and TRITON_INTERPRET=0")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like fill floats with NaN and integers with -1."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(out):
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_like(*a, **k)))


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _rel(got, want):
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), "NaN in the kernel's output"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- VQ lookup

# fp32 runs as tf32x3 (fp32-accurate); the halves multiply exactly and accumulate in fp32
VQ_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
VQ_SHAPES = [(16384, 64, 8192), (4096, 256, 1024), (65536, 32, 512), (1000, 60, 1000),
             (3, 8, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n, d, k", VQ_SHAPES, ids=[f"N{n}-D{d}-K{k}" for n, d, k in VQ_SHAPES])
def test_vq_lookup_picks_the_nearest_code(n, d, k, dtype):
    g = _gen(n + d + k)
    z = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    codebook = torch.randn(k, d, device="cuda", generator=g).to(dtype)
    idx, q, dist = vq_lookup_fwd(z, codebook, write_dist=True)
    torch.cuda.synchronize()
    assert ((idx >= 0) & (idx < k)).all()
    assert torch.equal(q, codebook[idx])
    worst, scale = 0.0, 0.0
    for s in range(0, n, 4096):  # exact distances in fp64, row chunks
        zc, cb = z[s:s + 4096].double(), codebook.double()
        full = (zc.pow(2).sum(1, keepdim=True) - 2 * zc @ cb.T + cb.pow(2).sum(1))
        chosen = full.gather(1, idx[s:s + 4096, None])[:, 0]
        worst = max(worst, (chosen - full.min(1).values).max().item())
        scale = max(scale, (zc.pow(2).sum(1).mean() + cb.pow(2).sum(1).mean()).item())
        exact = (zc - cb[idx[s:s + 4096]]).pow(2).sum(1)
        torch.testing.assert_close(dist[s:s + 4096].double(), exact, rtol=1e-3, atol=1e-3)
    assert worst <= VQ_TOL[dtype] * scale, f"chosen code {worst:.3g} further; scale {scale:.3g}"


def test_vq_gradients_match_the_reference():
    g = _gen(1)
    z = torch.randn(5000, 64, device="cuda", generator=g)
    codebook = torch.randn(512, 64, device="cuda", generator=g)
    grad = torch.randn(5000, 64, device="cuda", generator=g)
    zt, ct = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    idx, q, _ = VQLookupFunction.apply(zt, ct, vq_lookup_fwd, False)
    (q * grad).sum().backward()
    zr, cr = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    ref_idx, qr = vq_lookup_reference(zr, cr)
    (qr * grad).sum().backward()
    assert (idx == ref_idx).float().mean() > 0.999  # near-ties may flip in the last bit
    same = idx == ref_idx
    torch.testing.assert_close(zt.grad, zr.grad)
    ours = torch.zeros_like(codebook).index_add_(0, idx[same], grad[same])
    torch.testing.assert_close(ours, torch.zeros_like(codebook).index_add_(0, ref_idx[same],
                                                                            grad[same]))
    assert _rel(ct.grad, cr.grad) < 0.05  # flipped rows move their gradient to the tie


# ----------------------------------------------------------------------------- attention

# Errors against fp64 may be at most twice those of the reference run in the same dtype
# (FlashAttention's criterion), or under a floor: fp32 dots run as tf32 on tensor cores,
# whereas torch's fp32 reference is fp32-exact (seen on an H100: dq of one query row over
# 777 keys 3.2e-3, through two tf32 products and the cancellation in dS = P (dP - delta)).
ATT_FLOOR = {torch.float32: 5e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ATT_KINDS = ["none", "causal", "prefix+padding", "causal+padding+mask", "prefix+mask"]
ATT_SHAPES = [(4, 8, 1024, 1024, 64), (2, 4, 333, 333, 40), (2, 4, 1, 777, 64),
              (2, 2, 256, 512, 128), (8, 8, 257, 257, 32)]


def _masks(kind, b, h, lq, lk, seed):
    """test_attention's masks of each kind, on the GPU."""
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v
            for k, v in attention_masks(kind, b, h, lq, lk, seed).items()}


def _assert_attention_close(got, same_dtype, exact, dtype):
    ours = [_rel(x, y) for x, y in zip(got, exact, strict=True)]
    torch_ = [_rel(x, y) for x, y in zip(same_dtype, exact, strict=True)]
    for name, e, t in zip(["out", "dq", "dk", "dv"], ours, torch_, strict=True):
        assert e <= max(2 * t, ATT_FLOOR[dtype]), (
            f"{name}: relative error {e:.2e}; the reference in {dtype}: {t:.2e}")


def _attention(q, k, v, grad, masks, fn):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ATT_KINDS)
@pytest.mark.parametrize("shape", ATT_SHAPES, ids=[f"B{b}-H{h}-Lq{lq}-Lk{lk}-D{d}"
                                                   for b, h, lq, lk, d in ATT_SHAPES])
def test_attention_forward_and_backward_match_fp64(shape, kind, dtype):
    b, h, lq, lk, d = shape
    g = _gen(lq * 7 + d)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
               for n in (lq, lk, lk))
    grad = torch.randn(b, h, lq, d, device="cuda", generator=g).to(dtype)
    kw = _masks(kind, b, h, lq, lk, seed=d)
    prefix = kw.get("prefix_len")
    if kw.get("causal") and prefix is None:
        prefix = torch.zeros(b, dtype=torch.long, device="cuda")
    masks = _Masks(q, k, prefix, kw.get("key_padding_mask"), kw.get("attn_mask"), 0.0)
    got = _attention(q, k, v, grad, masks,
                     lambda *t: MaskedAttentionFunction.apply(*t, masks, d ** -0.5))
    exact = _attention(q.double(), k.double(), v.double(), grad.double(), masks,
                       lambda *t: masked_attention_reference(*t, **kw))
    same_dtype = _attention(q, k, v, grad, masks, lambda *t: masked_attention_reference(*t, **kw))
    assert got[0].dtype == dtype
    _assert_attention_close(got, same_dtype, exact, dtype)
    if "padding" in kind:  # the fully padded item: exact zeros, not NaN
        assert (got[0][-1] == 0).all() and (got[1][-1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_dropout_matches_the_reference_with_the_kernels_keep_mask(dtype):
    b, h, lq, lk, d, p = 2, 4, 300, 300, 64, 0.2
    g = _gen(3)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype)
               for n in (lq, lk, lk))
    grad = torch.randn(b, h, lq, d, device="cuda", generator=g).to(dtype)
    masks = _Masks(q, k, None, None, None, p)
    keep = dropout_keep_mask(masks, b, h, lq, lk)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    got = _attention(q, k, v, grad, masks,
                     lambda *t: MaskedAttentionFunction.apply(*t, masks, d ** -0.5))
    def reference(*t):
        return masked_attention_reference(*t, dropout_keep=keep, dropout_p=p)

    exact = _attention(q.double(), k.double(), v.double(), grad.double(), masks, reference)
    _assert_attention_close(got, _attention(q, k, v, grad, masks, reference), exact, dtype)


# ----------------------------------------------------------------------------- sampling

SAMPLE_CASES = [(8192, 64, 0.9, 1.0, False), (8192, None, 0.9, 0.8, True),
                (8192, None, None, 1.0, False), (8192, None, None, 0.0, True),
                (1000, 5, None, 1.3, True), (50257, 50, 0.95, 1.0, False), (7, 9, 0.5, 1.0, False)]


@pytest.mark.parametrize("per_row", [False, True], ids=["race", "per-row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("v, top_k, top_p, temperature, cfg", SAMPLE_CASES,
                         ids=[f"V{v}-k{k}-p{p}-T{t}{'-cfg' if c else ''}"
                              for v, k, p, t, c in SAMPLE_CASES])
def test_sample_logits_draws_equal_the_reference(v, top_k, top_p, temperature, cfg, dtype,
                                                 per_row):
    b = 256
    g = _gen(v)
    x = (torch.randn(b, v, device="cuda", generator=g) * 2).to(dtype)
    if v >= 4:
        x[1, v // 2:] = float("-inf")
        x[2, : v // 2] = 1.25  # ties straddling the thresholds
    # one uniform a token (the race) or one a row (the inverse CDF)
    noise = torch.rand(b, device="cuda", generator=g) if per_row else \
        torch.rand(b, v, device="cuda", generator=g)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    if cfg:
        kw.update(cond_logits=(torch.randn(b, v, device="cuda", generator=g) * 2).to(dtype),
                  cfg_scale=2.5)
    tokens, probs = sample_logits_fwd(x, noise=noise, **kw)
    # the reference on the values the kernel reads: fp32 upcast of the same logits
    ref_kw = dict(kw, cond_logits=kw["cond_logits"].float()) if cfg else kw
    ref_tokens, ref_probs = sample_logits_reference(x.float(), noise=noise, **ref_kw)
    agree = (tokens == ref_tokens).float().mean().item()
    # fp32 row reductions in another order can move a near-tie across a threshold
    assert agree >= 0.99, f"{agree:.4f} of draws agree"
    same = tokens == ref_tokens
    torch.testing.assert_close(probs[same], ref_probs[same], rtol=1e-4, atol=1e-6)


def test_sample_logits_in_kernel_noise_is_seeded_and_follows_the_distribution():
    b, v = 4096, 16
    logits = torch.randn(1, v, device="cuda", generator=_gen(0)).expand(b, v).contiguous()
    first, _ = sample_logits_fwd(logits, generator=_gen(5))
    again, _ = sample_logits_fwd(logits, generator=_gen(5))
    other, _ = sample_logits_fwd(logits, generator=_gen(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    counts = torch.bincount(first, minlength=v).double()
    expected = torch.softmax(logits[0].double(), 0) * b
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 45.0  # chi-square, 15 degrees of freedom: p < 1e-4 beyond 45


@pytest.mark.parametrize("b, n", [(32, 1024), (8, 4096), (64, 256), (3, 5)])
def test_lowest_k_mask_equals_the_reference(b, n):
    g = _gen(n)
    scores = torch.rand(b, n, device="cuda", generator=g)
    scores[0, : n // 2] = 0.5  # ties: the lower index is masked first
    k = torch.randint(0, n + 1, (b,), device="cuda", generator=g)
    k[0] = n // 3
    got = lowest_k_mask_fwd(scores, k)
    assert torch.equal(got, lowest_k_mask_reference(scores, k))
    assert torch.equal(got.sum(1), k)


# ----------------------------------------------------------------------------- cross-entropy

CE_CASES = [(8192, 256, 8192, 0.0, False), (4096, 512, 16384, 0.1, True),
            (1000, 64, 1000, 0.0, True), (37, 16, 50257, 0.2, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n, c, v, eps, bias", CE_CASES,
                         ids=[f"N{n}-C{c}-V{v}-eps{e}{'-bias' if b else ''}"
                              for n, c, v, e, b in CE_CASES])
def test_linear_cross_entropy_matches_fp64(n, c, v, eps, bias, dtype):
    g = _gen(n + v)
    hidden = torch.randn(n, c, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(v, c, device="cuda", generator=g) * c ** -0.5).to(dtype)
    b = torch.randn(v, device="cuda", generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::5] = -100

    def run(fn, dt):
        leaves = [t.detach().clone().to(dt).requires_grad_() for t in (hidden, weight)]
        lb = b.detach().clone().to(dt).requires_grad_() if b is not None else None
        loss = fn(leaves[0], leaves[1], lb)
        (loss * 1.5).backward()
        return [loss.detach()] + [t.grad for t in leaves] + ([lb.grad] if lb is not None else [])

    got = run(lambda h, w, lb: LinearCrossEntropyFunction.apply(
        h, w, lb, targets, -100, eps, cross_entropy_rows_fwd), dtype)
    want = run(lambda h, w, lb: linear_cross_entropy_reference(
        h, w, targets, bias=lb, label_smoothing=eps), torch.float64)
    tol = 1e-3 if dtype == torch.float32 else 2e-2  # cuBLAS's fp32 GEMM may run as tf32
    errors = [_rel(x, y) for x, y in zip(got, want, strict=True)]
    assert max(errors) < tol, f"loss, grads: {errors}"
