"""Fused linear cross-entropy: the Triton row kernel (interpreter) and the torch path
against torch's F.cross_entropy on the full logits."""

import pytest
import torch

from t2i_kernels import cross_entropy as ce
from t2i_kernels import linear_cross_entropy
from t2i_kernels.cross_entropy import (
    LinearCrossEntropyFunction,
    cross_entropy_rows_fwd,
    cross_entropy_rows_torch,
    linear_cross_entropy_reference,
)


def _case(n, c, v, seed=0, ignore_every=5, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g)
    weight = torch.randn(v, c, generator=g) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    b = torch.randn(v, generator=g) if bias else None
    return hidden, weight, targets, b


def _grads(fn, hidden, weight, bias, targets, smoothing, scale=1.5):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    b = bias.clone().requires_grad_() if bias is not None else None
    loss = fn(leaves[0], leaves[1], b, targets, smoothing)
    (loss * scale).backward()
    return [loss.detach()] + [t.grad for t in leaves] + ([b.grad] if b is not None else [])


def _reference(h, w, b, t, eps):
    return linear_cross_entropy_reference(h, w, t, bias=b, label_smoothing=eps)


CASES = [(1, 16, 7, 0.0, False), (37, 16, 1000, 0.1, True), (300, 48, 257, 0.0, True),
         (64, 32, 4100, 0.2, False)]
IDS = [f"N{n}-C{c}-V{v}-eps{e}{'-bias' if b else ''}" for n, c, v, e, b in CASES]


@pytest.mark.interpreter
@pytest.mark.parametrize("n, c, v, eps, bias", CASES, ids=IDS)
def test_triton_rows_match_reference(monkeypatch, n, c, v, eps, bias):
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", 16 * v)  # several chunks of 16 rows
    h, w, t, b = _case(n, c, v, ignore_every=5 if n > 1 else 0, bias=bias)
    got = _grads(lambda *a: LinearCrossEntropyFunction.apply(*a[:3], a[3], -100, a[4],
                                                             cross_entropy_rows_fwd),
                 h, w, b, t, eps)
    want = _grads(_reference, h, w, b, t, eps)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n, c, v, eps, bias", CASES + [(2048, 128, 8192, 0.1, True)],
                         ids=IDS + ["N2048-C128-V8192-eps0.1-bias"])
def test_torch_path_matches_reference(monkeypatch, n, c, v, eps, bias):
    monkeypatch.setattr(ce, "_CHUNK_ELEMENTS", 64 * v)
    h, w, t, b = _case(n, c, v, ignore_every=5 if n > 1 else 0, bias=bias)
    got = _grads(lambda *a: LinearCrossEntropyFunction.apply(*a[:3], a[3], -100, a[4],
                                                             cross_entropy_rows_torch),
                 h, w, b, t, eps)
    want = _grads(_reference, h, w, b, t, eps)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.interpreter
def test_triton_rows_half_precision():
    h, w, t, _ = _case(32, 16, 300)
    logits = (h @ w.T).half()
    loss = cross_entropy_rows_fwd(logits.clone(), t, -100, 0.0)
    want = torch.nn.functional.cross_entropy(logits.float(), t, reduction="none")
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)


def test_public_api_leading_dims_and_no_grad():
    h, w, t, _ = _case(24, 8, 50, ignore_every=0)
    loss = linear_cross_entropy(h.view(2, 12, 8), w, t.view(2, 12))
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, t))
    with torch.no_grad():
        assert torch.isfinite(linear_cross_entropy(h, w, t))


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    h, w, t, _ = _case(8, 8, 20)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, torch.full_like(t, -100))
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all()


def test_a_model_trains_with_it():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 16, generator=g)
    t = (h[:, 0] > 0).long() + 2 * (h[:, 1] > 0).long()  # 4 learnable classes
    w = torch.zeros(4, 16, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    first = None
    for _ in range(50):
        loss = linear_cross_entropy(h, w, t)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


@pytest.mark.parametrize("targets, kwargs, error, message", [
    (torch.tensor([0, 7]), {}, ValueError, "outside"),
    (torch.tensor([0, -1]), {}, ValueError, "outside"),
    (torch.tensor([0.0, 1.0]), {}, ValueError, "integer"),
    (torch.tensor([0, 1, 2]), {}, ValueError, "shape"),
    (torch.tensor([0, 1]), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    (torch.tensor([0, 1]), {"bias": torch.zeros(3)}, ValueError, "bias"),
], ids=["too-big", "negative", "float-targets", "shape", "smoothing", "bias"])
def test_bad_input(targets, kwargs, error, message):
    with pytest.raises(error, match=message):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(7, 4), targets, **kwargs)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(7, 5), torch.tensor([0, 1]))
