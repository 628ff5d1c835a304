"""VQ lookup: the Triton kernel (interpreter) and the torch path against the reference.

Equality of indices: the chosen code's exact distance must be within tolerance of the
exact minimum (ties may flip), computed in fp64 from the very values the kernel saw.
"""

import pytest
import torch

from t2i_kernels import vq as vqmod
from t2i_kernels import vq_lookup, vq_stats
from t2i_kernels.vq import (
    VQLookupFunction,
    vq_lookup_fwd,
    vq_lookup_reference,
    vq_lookup_torch_fwd,
)

# relative to the mean of ||z||^2 + ||e||^2: fp32 is tf32x3 / fp32 GEMM, the halves are
# exact products accumulated in fp32
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def _case(n, d, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g).to(dtype), torch.randn(k, d, generator=g).to(dtype))


def _assert_nearest(z, codebook, idx, dtype):
    """idx picks a code whose exact distance is within tolerance of the exact minimum."""
    zd, cd = z.double(), codebook.double()
    dist = torch.cdist(zd, cd) ** 2  # [N, K]
    assert idx.dtype == torch.long and idx.shape == (z.shape[0],)
    assert ((idx >= 0) & (idx < codebook.shape[0])).all()
    chosen = dist.gather(1, idx[:, None])[:, 0]
    scale = (zd.pow(2).sum(1).mean() + cd.pow(2).sum(1).mean()).item()
    excess = (chosen - dist.min(1).values).max().item() if len(idx) else 0.0
    assert excess <= TOLERANCE[dtype] * scale, f"excess {excess:.3g} of scale {scale:.3g}"


@pytest.fixture
def nan_outputs(monkeypatch):
    """torch.empty fills floats with NaN and integers with -1, so unwritten outputs fail."""
    real_empty = torch.empty

    def empty(*size, dtype=None, **kwargs):
        out = real_empty(*size, dtype=dtype, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", empty)


SHAPES = [(1, 3, 1), (1, 16, 5), (7, 16, 512), (7, 60, 5), (300, 64, 1000), (300, 3, 512),
          (7, 64, 1), (300, 60, 1000), (130, 200, 70)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n, d, k", SHAPES, ids=[f"N{n}-D{d}-K{k}" for n, d, k in SHAPES])
def test_triton_lookup_matches_reference(nan_outputs, n, d, k, dtype):
    z, codebook = _case(n, d, k, dtype)
    idx, q, dist = vq_lookup_fwd(z, codebook, write_dist=True)
    _assert_nearest(z, codebook, idx, dtype)
    assert q.dtype == dtype and torch.equal(q, codebook[idx])
    exact = ((z.double() - codebook.double()[idx]) ** 2).sum(1)
    torch.testing.assert_close(dist.double(), exact, rtol=1e-3, atol=1e-3)


@pytest.mark.interpreter
def test_triton_lookup_strided_z_and_empty_z(nan_outputs):
    z, codebook = _case(130, 32, 100)
    strided = torch.cat([z, torch.zeros_like(z)], 1)[:, ::2]  # stride 2 along D
    strided_z = torch.empty_like(z).copy_(strided)
    idx, q, _ = vq_lookup_fwd(strided, codebook)
    ref_idx, _, _ = vq_lookup_fwd(strided_z.contiguous(), codebook)
    assert not strided.is_contiguous() and torch.equal(idx, ref_idx)
    idx, q, dist = vq_lookup_fwd(z[:0], codebook, write_dist=True)
    assert idx.shape == (0,) and q.shape == (0, 32) and dist.shape == (0,)


def _exact_ties(n, d, k):
    """Small integers: every product and sum is exact in any order, so the three copies of
    each code score exactly the same."""
    g = torch.Generator().manual_seed(0)
    z = torch.randint(-3, 4, (n, d), generator=g).float()
    codebook = torch.randint(-3, 4, (k, d), generator=g).float()
    return z, torch.cat([codebook, codebook, codebook])  # code c at c, c+k, c+2k


@pytest.mark.interpreter
def test_triton_ties_take_the_first_code_like_torch():
    z, codebook = _exact_ties(64, 16, 30)  # 90 codes: copies straddle the 64-code blocks
    idx, _, _ = vq_lookup_fwd(z, codebook)
    assert (idx < 30).all()
    assert torch.equal(idx, vq_lookup_reference(z, codebook)[0])


@pytest.mark.interpreter
def test_triton_gradients_match_the_reference():
    z, codebook = _case(100, 16, 40)
    grad = torch.randn(100, 16)
    zt, ct = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    _, q, _ = VQLookupFunction.apply(zt, ct, vq_lookup_fwd, False)
    (q * grad).sum().backward()
    zr, cr = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    _, qr = vq_lookup_reference(zr, cr)
    (qr * grad).sum().backward()
    torch.testing.assert_close(zt.grad, zr.grad)  # straight-through: the gradient itself
    torch.testing.assert_close(ct.grad, cr.grad)  # summed over the rows that chose each code
    assert ct.grad.abs().sum() > 0 and torch.equal(zt.grad, grad)


@pytest.mark.interpreter
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_public_api_forced_to_triton(monkeypatch, metric):
    calls = []
    real = vqmod.vq_lookup_fwd
    monkeypatch.setattr(vqmod, "vq_lookup_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("T2I_KERNEL_BACKEND", "triton")
    z, codebook = _case(2 * 37, 24, 90)
    z3 = z.view(2, 37, 24)
    idx, q, dist = vq_lookup(z3, codebook, metric=metric, return_distances=True)
    assert calls and idx.shape == (2, 37) and q.shape == (2, 37, 24) and dist.shape == (2, 37)
    ref_idx, ref_q, ref_dist = vq_lookup_reference(z, codebook, metric=metric,
                                                   return_distances=True)
    assert torch.equal(idx.view(-1), ref_idx)
    torch.testing.assert_close(q.view(-1, 24), ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist.view(-1), ref_dist, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- torch path


TORCH_SHAPES = [(1, 3, 1), (2000, 64, 4096), (1500, 60, 1000), (513, 256, 129), (64, 8, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n, d, k", TORCH_SHAPES,
                         ids=[f"N{n}-D{d}-K{k}" for n, d, k in TORCH_SHAPES])
def test_torch_path_matches_reference(nan_outputs, n, d, k, dtype):
    z, codebook = _case(n, d, k, dtype)
    idx, q, dist = vq_lookup_torch_fwd(z, codebook, write_dist=True)
    _assert_nearest(z, codebook, idx, dtype)
    assert q.dtype == dtype and torch.equal(q, codebook[idx])
    exact = ((z.double() - codebook.double()[idx]) ** 2).sum(1)
    torch.testing.assert_close(dist.double(), exact, rtol=1e-4, atol=1e-3)


def test_torch_path_chunks_over_codes_when_k_is_large(monkeypatch):
    z, codebook = _case(300, 16, 1000)
    whole = vq_lookup_torch_fwd(z, codebook, write_dist=True)
    monkeypatch.setattr(vqmod, "_SCORE_BUDGET", 16 * 256)  # 256-code chunks, 16-row blocks
    chunked = vq_lookup_torch_fwd(z, codebook, write_dist=True)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[2], chunked[2])


def test_torch_path_ties_take_the_first_code(monkeypatch):
    z, codebook = _exact_ties(500, 16, 100)  # 300 codes: copies in other groups of 128
    assert torch.equal(vq_lookup_torch_fwd(z, codebook)[0], vq_lookup_reference(z, codebook)[0])
    assert (vq_lookup_torch_fwd(z, codebook)[0] < 100).all()
    monkeypatch.setattr(vqmod, "_SCORE_BUDGET", 16 * 128)  # copies in other code chunks too
    assert (vq_lookup_torch_fwd(z, codebook)[0] < 100).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_torch_path_gradients_match_the_reference(metric):
    z, codebook = _case(200, 16, 50)
    grad = torch.randn(200, 16)
    outs = []
    for backend in ("torch", "reference"):
        zz, cc = z.clone().requires_grad_(), codebook.clone().requires_grad_()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("T2I_KERNEL_BACKEND", backend)
            _, q = vq_lookup(zz, cc, metric=metric)
        (q * grad).sum().backward()
        outs.append((q.detach(), zz.grad, cc.grad))
    for got, want in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_compute_in_the_wider_and_return_z_dtype():
    z, codebook = _case(100, 32, 64)
    idx, q = vq_lookup(z.half(), codebook)
    assert q.dtype == torch.float16 and idx.shape == (100,)
    assert torch.equal(idx, vq_lookup_reference(z.half().float(), codebook)[0])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_non_finite_rows_get_valid_indices(monkeypatch, backend):
    monkeypatch.setenv("T2I_KERNEL_BACKEND", backend)
    z, codebook = _case(6, 8, 20)
    z[1, 3] = float("nan")
    z[2, 0] = float("inf")
    z[3, 5] = -float("inf")
    idx, q = vq_lookup(z, codebook)
    assert ((idx >= 0) & (idx < 20)).all() and idx[1] == 0
    assert torch.isfinite(q[0]).all()


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN
def test_triton_non_finite_rows_get_valid_indices():
    z, codebook = _case(6, 16, 20)
    z[1, 3] = float("nan")
    z[2, 0] = float("inf")
    idx, _, _ = vq_lookup_fwd(z, codebook)
    assert ((idx >= 0) & (idx < 20)).all() and idx[1] == 0


# ----------------------------------------------------------------------------- stats, errors


def test_vq_stats_counts_sums_usage_perplexity():
    idx = torch.tensor([0, 0, 2, 3])
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    stats = vq_stats(idx, z, 5)
    assert torch.equal(stats.counts, torch.tensor([2.0, 0, 1, 1, 0]))
    assert torch.equal(stats.sums[0], torch.tensor([4.0, 0.0]))
    assert stats.usage.item() == pytest.approx(3 / 5)
    assert stats.perplexity.item() == pytest.approx(2 ** 1.5)  # entropy of (1/2, 1/4, 1/4)
    with pytest.raises(ValueError, match="num_codes"):
        vq_stats(torch.tensor([7]), z[:1], 5)
    with pytest.raises(ValueError, match="indices for"):
        vq_stats(idx, z[:2], 5)


@pytest.mark.parametrize("z, codebook, kwargs, error, message", [
    (torch.randn(4, 8), torch.randn(2, 3, 8), {}, ValueError, "codebook must be"),
    (torch.tensor(1.0), torch.randn(3, 1), {}, ValueError, "scalar"),
    (torch.randn(4, 8), torch.randn(3, 7), {}, ValueError, "D=8 but the codebook has D=7"),
    (torch.ones(4, 8, dtype=torch.long), torch.randn(3, 8), {}, TypeError, "floating point"),
    (torch.randn(4, 8), torch.randn(0, 8), {}, ValueError, "empty"),
    (torch.randn(4, 8), torch.randn(3, 8), {"metric": "l1"}, ValueError, "metric"),
    (torch.randn(4, 8, device="meta"), torch.randn(3, 8), {}, ValueError, "on meta"),
], ids=["codebook-rank", "scalar-z", "D-mismatch", "integer", "K0", "metric", "device"])
def test_bad_input_is_a_clear_error(z, codebook, kwargs, error, message):
    with pytest.raises(error, match=message):
        vq_lookup(z, codebook, **kwargs)


def test_triton_launcher_refuses_fp64():
    z, codebook = _case(4, 16, 3)
    with pytest.raises(TypeError, match="must share one of"):
        vq_lookup_fwd(z.double(), codebook.double())
