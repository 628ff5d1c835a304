"""Masked attention: the Triton kernels (interpreter) and the torch path against the
reference, forward and backward, for every mask kind and their combinations."""

import sys
import types

import pytest
import torch

from t2i_kernels import attention as att
from t2i_kernels import masked_attention
from t2i_kernels.attention import (
    MaskedAttentionFunction,
    _Masks,
    dropout_keep_mask,
    masked_attention_reference,
    masked_attention_torch,
)

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


def _qkv(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_()
            for n in (lq, lk, lk)]


def _masks(kind, b, h, lq, lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    if "causal" in kind:
        out["causal"] = True
    if "prefix" in kind:
        out["prefix_len"] = torch.randint(0, lk + 1, (b,), generator=g)
    if "padding" in kind:
        kpm = torch.rand(b, lk, generator=g) > 0.3
        kpm[0, lk // 2:] = False  # a right-padded row: its tail tiles are skipped
        if b > 1:
            kpm[-1] = False  # a fully padded batch item: zeros, zero gradients
        out["key_padding_mask"] = kpm
    if "mask" in kind:
        am = torch.rand(b, 1, lq, lk, generator=g) > 0.4
        am[:, :, lq // 2] = False  # a row that sees nothing
        out["attn_mask"] = am
    return out


def _run(fn, q, k, v, grad, **kw):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, **kw)
    out.backward(grad)
    return [out.detach()] + [t.grad.clone() for t in (q, k, v)]


def _triton(q, k, v, causal=False, prefix_len=None, key_padding_mask=None, attn_mask=None,
            dropout_p=0.0, scale=None):
    if causal and prefix_len is None:
        prefix_len = torch.zeros(q.shape[0], dtype=torch.long)
    masks = _Masks(q, k, prefix_len, key_padding_mask, attn_mask, dropout_p)
    return MaskedAttentionFunction.apply(q, k, v, masks, q.shape[-1] ** -0.5)


def _assert_close(got, want, dtype):
    for g, w in zip(got, want, strict=True):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.float(), w.float(), **TOLERANCE[dtype])


KINDS = ["none", "causal", "prefix", "padding", "mask", "prefix+padding",
         "causal+padding+mask", "prefix+mask"]
SHAPES = [(2, 2, 17, 17, 16), (1, 2, 100, 100, 40), (2, 1, 1, 100, 64), (2, 2, 33, 70, 40)]
# every kind on every shape, and the longest rows (257) for two kinds (interpreter time)
CASES = [(shape, kind) for shape in SHAPES for kind in KINDS] + [
    ((1, 1, 257, 257, 16), "prefix"), ((1, 1, 257, 257, 16), "causal+padding+mask")]


@pytest.mark.interpreter
@pytest.mark.parametrize("shape, kind", CASES,
                         ids=[f"B{b}-H{h}-Lq{lq}-Lk{lk}-D{d}-{kind}"
                              for (b, h, lq, lk, d), kind in CASES])
def test_triton_forward_and_backward_match_reference(shape, kind):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d)
    kw = _masks(kind, b, h, lq, lk)
    grad = torch.randn(b, h, lq, d)
    _assert_close(_run(_triton, q, k, v, grad, **kw),
                  _run(masked_attention_reference, q, k, v, grad, **kw), torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["none", "prefix+padding", "causal+padding+mask"])
def test_triton_half_precision(kind):
    q, k, v = _qkv(2, 2, 40, 40, 32, torch.float16)
    kw = _masks(kind, 2, 2, 40, 40)
    grad = torch.randn(2, 2, 40, 32).half()
    _assert_close(_run(_triton, q, k, v, grad, **kw),
                  _run(masked_attention_reference, q, k, v, grad, **kw), torch.float16)


@pytest.mark.interpreter
def test_triton_fully_masked_rows_give_zeros_and_zero_gradients():
    q, k, v = _qkv(2, 1, 20, 20, 16)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1] = False
    out = _triton(q, k, v, key_padding_mask=kpm)
    out.sum().backward()
    assert (out[1] == 0).all() and (q.grad[1] == 0).all() and (k.grad[1] == 0).all()
    assert not torch.isnan(q.grad).any()


@pytest.mark.interpreter
def test_triton_gradients_of_views_into_fused_projections():
    """q, k and v as head views of fused projections (the layout attention modules make):
    not dense, so the gradients get other strides than their inputs and the kernels must
    write through the gradients' own (a store with k's strides ran past dk's end)."""
    b, lq, lk, h, d = 2, 16, 30, 4, 8
    g = torch.Generator().manual_seed(3)
    q_buf = torch.randn(b, lq, 3, h, d, generator=g).requires_grad_()
    kv_buf = torch.randn(b, lk, 2, h, d, generator=g).requires_grad_()
    kpm = torch.rand(b, lk, generator=g) > 0.3
    grad = torch.randn(b, h, lq, d, generator=g)

    def run(fn):
        q_buf.grad = kv_buf.grad = None
        q = q_buf[:, :, 1].transpose(1, 2)
        k, v = kv_buf[:, :, 0].transpose(1, 2), kv_buf[:, :, 1].transpose(1, 2)
        assert not k.is_contiguous() and torch.empty_like(k).stride() != k.stride()
        fn(q, k, v).backward(grad)
        return q_buf.grad.clone(), kv_buf.grad.clone()

    got = run(lambda q, k, v: MaskedAttentionFunction.apply(
        q, k, v, _Masks(q, k, None, kpm, None, 0.0), d ** -0.5))
    want = run(lambda q, k, v: masked_attention_reference(q, k, v, key_padding_mask=kpm))
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["none", "prefix+padding"])
def test_triton_dropout_matches_reference_with_the_same_keep_mask(kind):
    b, h, lq, lk, d, p = 2, 2, 40, 40, 16, 0.3
    q, k, v = _qkv(b, h, lq, lk, d)
    kw = _masks(kind, b, h, lq, lk)
    masks = _Masks(q, k, kw.get("prefix_len"), kw.get("key_padding_mask"), None, p)
    keep = dropout_keep_mask(masks, b, h, lq, lk)
    assert 0.6 < keep.float().mean() < 0.8  # the kept fraction is near 1 - p
    grad = torch.randn(b, h, lq, d)

    def triton_fn(q, k, v, **_):
        return MaskedAttentionFunction.apply(q, k, v, masks, d ** -0.5)

    _assert_close(_run(triton_fn, q, k, v, grad),
                  _run(masked_attention_reference, q, k, v, grad, dropout_keep=keep,
                       dropout_p=p, **kw), torch.float32)


# ----------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("shape", [(2, 3, 300, 300, 40), (2, 2, 50, 50, 24)],
                         ids=["L300", "L50"])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_matches_reference(kind, shape):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d)
    kw = _masks(kind, b, h, lq, lk)
    grad = torch.randn(b, h, lq, d)
    _assert_close(_run(masked_attention_torch, q, k, v, grad, **kw),
                  _run(masked_attention_reference, q, k, v, grad, **kw), torch.float32)


@pytest.mark.parametrize("lq, lk, prefix", [(1, 600, 0), (64, 600, 100), (600, 600, 600),
                                            (700, 700, 1), (513, 513, 256)])
def test_torch_path_prefix_rectangles(lq, lk, prefix):
    """Decoding, a whole-sequence prefix, plain causal, and several query blocks."""
    q, k, v = _qkv(1, 2, lq, lk, 16)
    grad = torch.randn(1, 2, lq, 16)
    kw = {"prefix_len": torch.tensor([prefix])}
    _assert_close(_run(masked_attention_torch, q, k, v, grad, **kw),
                  _run(masked_attention_reference, q, k, v, grad, **kw), torch.float32)


@pytest.mark.parametrize("lk, fp32", [(64, True), (600, False)])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_torch_path_attends_short_bf16_sequences_in_fp32(lk, fp32, autocast):
    """bf16 on the CPU with fewer than _CPU_BF16_MIN_KEYS keys: the fp32 result, rounded
    to bf16 (even under autocast, which would turn SDPA back to bf16); longer: bf16 itself."""
    q, k, v = _qkv(2, 2, 48, lk, 32, torch.bfloat16)
    kw = _masks("padding", 2, 2, 48, lk)
    grad = torch.randn(2, 2, 48, 32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = _run(masked_attention_torch, q, k, v, grad, **kw)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = _run(masked_attention_torch, q32, k32, v32, grad.float(), **kw)
    assert got[0].dtype == torch.bfloat16
    same = all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(got, want, strict=True))
    assert same == fp32
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)


def test_torch_path_with_dropout_is_seeded_and_keeps_the_expectation():
    q, k, v = _qkv(1, 2, 64, 64, 16)
    torch.manual_seed(0)
    a = masked_attention(q, k, v, causal=True, dropout_p=0.5)
    torch.manual_seed(0)
    b = masked_attention(q, k, v, causal=True, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, masked_attention(q, k, v, causal=True))


def test_backends_agree_through_the_public_api(monkeypatch):
    q, k, v = _qkv(2, 2, 50, 50, 24)
    kw = _masks("prefix+padding", 2, 2, 50, 50)
    outs = []
    for backend in ("torch", "reference"):
        monkeypatch.setenv("T2I_KERNEL_BACKEND", backend)
        outs.append(masked_attention(q, k, v, **kw))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    prefix_int = masked_attention(q, k, v, prefix_len=7)
    prefix_tensor = masked_attention(q, k, v, prefix_len=torch.tensor([7, 7]))
    assert torch.equal(prefix_int, prefix_tensor)


def test_flash_attn_is_used_only_where_it_fits(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, dropout_p, softmax_scale, causal):
        calls.append(causal)
        return q  # [B, L, H, D]: the layout flash-attn works in

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_func=flash_attn_func))
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    out = att._external_attention(q, q, q, torch.zeros(1, dtype=torch.long), None, None, 0.0,
                                  0.25)
    assert calls == [True] and torch.equal(out, q)
    assert att._external_attention(q, q, q, torch.tensor([3]), None, None, 0.0, 0.25) is None
    assert att._external_attention(q.float(), q.float(), q.float(), None, None, None, 0.0,
                                   0.25) is None
    kpm = torch.ones(1, 8, dtype=torch.bool)
    assert att._external_attention(q, q, q, None, kpm, None, 0.0, 0.25) is None


@pytest.mark.parametrize("args, kwargs, message", [
    ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 9), torch.randn(1, 2, 4, 9)), {},
     "do not fit"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)},
     "key_padding_mask"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"key_padding_mask": torch.ones(1, 4)}, "key_padding_mask"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"attn_mask": torch.ones(1, 3, 4, 4, dtype=torch.bool)},
     "attn_mask"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"prefix_len": 5}, "prefix_len"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"prefix_len": torch.tensor([1.0])}, "prefix_len"),
    ((torch.randn(1, 2, 4, 8),) * 3, {"dropout_p": 1.0}, "dropout_p"),
    ((torch.randn(1, 2, 4, 160),) * 3, {}, "head dim"),
    ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).half(), torch.randn(1, 2, 4, 8)), {},
     "dtypes differ"),
    ((torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8, device="meta"),
      torch.randn(1, 2, 4, 8)), {}, "several devices"),
    ((torch.randn(2, 4, 8),) * 3, {}, "B, H, L, Dh"),
], ids=["shape", "kpm-shape", "kpm-dtype", "mask-heads", "prefix-too-long", "prefix-dtype",
        "dropout", "head-dim", "dtype", "device", "rank"])
def test_bad_input_is_a_clear_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        masked_attention(*args, **kwargs)
