"""Linear + cross-entropy over a vocabulary, without the [N, V] logits.

loss = mean over non-ignored rows of CE(hidden @ weight.T + bias, targets), with label
smoothing eps: (1 - eps) * (lse - x_target) + eps * (lse - mean_j x_j), as torch's
F.cross_entropy. Rows are processed in chunks: a GEMM gives a chunk's logits, a per-row
pass turns them into the chunk's loss and writes d loss / d logits over them, and two more
GEMMs fold that into the gradients of hidden and weight. The gradients are therefore
computed in the forward pass and scaled by the incoming gradient in backward (Liger-Kernel's
scheme): peak extra memory is one chunk of logits plus the gradients themselves.

All targets ignored gives loss 0 and zero gradients (torch gives NaN).
"""

import torch
import triton
import triton.language as tl

from t2i_kernels._dispatch import choose_backend
from t2i_kernels._launch import launch

# ----------------------------------------------------------------------------- Triton kernel


@triton.jit(do_not_specialize=["ignore_index"])
def _cross_entropy_fwd_kernel(logits_ptr, targets_ptr, loss_ptr, stride_l, V, ignore_index,
                              smoothing, BLOCK_V: tl.constexpr):
    """One row: its loss, and its gradient (unscaled) written over its logits."""
    i = tl.program_id(0).to(tl.int64)
    p = logits_ptr + i * stride_l
    o_v = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + i)
    ignored = target == ignore_index

    # online log-sum-exp, and the sum of the logits for the smoothing term
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    d = 0.0
    total = 0.0
    for v0 in range(0, V, BLOCK_V):
        o = v0 + o_v
        x = tl.load(p + o, mask=o < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        total += tl.sum(tl.where(o < V, x, 0.0), 0)
        m = m_new
    lse = m + tl.log(d)
    x_t = tl.load(p + tl.where(ignored, 0, target)).to(tl.float32)
    loss = (1.0 - smoothing) * (lse - x_t) + smoothing * (lse - total / V)
    tl.store(loss_ptr + i, tl.where(ignored, 0.0, loss))

    # d loss / d logits = softmax - (1 - eps) onehot - eps / V; zero for an ignored row
    for v0 in range(0, V, BLOCK_V):
        o = v0 + o_v
        x = tl.load(p + o, mask=o < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - smoothing / V - tl.where(o == target, 1.0 - smoothing, 0.0)
        g = tl.where(ignored, 0.0, g)
        tl.store(p + o, g.to(logits_ptr.dtype.element_ty), mask=o < V)


# ----------------------------------------------------------------------------- launchers

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHUNK_ELEMENTS = 1 << 22  # logits held at once: 16 MiB in fp32 (measured fastest on CPU)


def cross_entropy_rows_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                           smoothing: float) -> torch.Tensor:
    """Triton: logits [n, V] (rows may be strided, V contiguous) -> loss fp32 [n]; the
    logits are overwritten with the unscaled gradient."""
    if logits.dtype not in _TRITON_DTYPES:
        raise TypeError(f"cross_entropy_rows_fwd: logits must be one of {_TRITON_DTYPES}")
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n > 0:
        launch(_cross_entropy_fwd_kernel, (n,), logits, targets, loss, logits.stride(0), v,
               ignore_index, smoothing, BLOCK_V=min(4096, triton.next_power_of_2(v)),
               num_warps=8)
    return loss


def aot_launches():
    """Every specialisation the library launches (for t2i_kernels.aot): one per dtype."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for dtype in _TRITON_DTYPES:
        yield (f"cross-entropy rows {names[dtype]}",
               lambda dtype=dtype: cross_entropy_rows_fwd(
                   torch.empty(64, 8192, dtype=dtype), torch.empty(64, dtype=torch.long),
                   -100, 0.1))


def cross_entropy_rows_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             smoothing: float) -> torch.Tensor:
    """CPU twin of the kernel: the same contract, in place, in fp32."""
    x = logits.float()
    v = x.shape[1]
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(x, -1)
    loss = (1 - smoothing) * (lse - x.gather(1, t)[:, 0])
    if smoothing:
        loss = loss + smoothing * (lse - x.mean(-1))
    x = x.sub_(lse[:, None]).exp_()  # softmax, in place (x is logits for fp32)
    if smoothing:
        x.sub_(smoothing / v)
    x.scatter_add_(1, t, (valid[:, None] * -(1.0 - smoothing)).to(x.dtype))
    x.mul_(valid[:, None])
    if x.data_ptr() != logits.data_ptr():
        logits.copy_(x)
    return torch.where(valid, loss, 0.0)


# ----------------------------------------------------------------------------- autograd


def _chunked(hidden, weight, bias, targets, ignore_index, smoothing, rows_fn, need_grad):
    n, _ = hidden.shape
    v = weight.shape[0]
    n_valid = (targets != ignore_index).sum().clamp_min(1)  # a tensor: no host sync
    grad_h = torch.empty_like(hidden) if need_grad else None
    grad_w = torch.zeros_like(weight) if need_grad else None
    grad_b = torch.zeros_like(bias) if need_grad and bias is not None else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = max(1, min(n, _CHUNK_ELEMENTS // v))
    for r0 in range(0, n, rows):
        h = hidden[r0:r0 + rows]
        logits = h @ weight.T
        if bias is not None:
            logits += bias
        total += rows_fn(logits, targets[r0:r0 + rows], ignore_index, smoothing).sum()
        if need_grad:  # logits now hold d loss / d logits
            torch.mm(logits, weight, out=grad_h[r0:r0 + rows])
            grad_w.addmm_(logits.T, h)
            if grad_b is not None:
                grad_b += logits.sum(0)
    scale = 1.0 / n_valid
    if need_grad:
        grad_h.mul_(scale.to(grad_h.dtype))
        grad_w.mul_(scale.to(grad_w.dtype))
        if grad_b is not None:
            grad_b.mul_(scale.to(grad_b.dtype))
    return total * scale, grad_h, grad_w, grad_b


class LinearCrossEntropyFunction(torch.autograd.Function):
    """forward(hidden [N, C], weight [V, C], bias [V] or None, targets [N], ignore_index,
    smoothing, rows_fn) -> mean loss; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, smoothing, rows_fn):
        need_grad = any(ctx.needs_input_grad[:3])
        loss, grad_h, grad_w, grad_b = _chunked(hidden, weight, bias, targets, ignore_index,
                                                smoothing, rows_fn, need_grad)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w,
                                                                             grad_b)]
        return (*scaled, None, None, None, None)


# ----------------------------------------------------------------------------- reference


def linear_cross_entropy_reference(hidden, weight, targets, *, bias=None, ignore_index=-100,
                                   label_smoothing=0.0):
    """The whole [N, V] logits in fp32, then torch's cross-entropy."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------- public API


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of hidden @ weight.T (+ bias) against targets, never holding the
    [N, V] logits: the output projection and loss of a transformer in one call.

    hidden [..., C], weight [V, C], targets long [...] in [0, V) or ignore_index,
    bias [V] or None -> scalar loss (fp32), differentiable in hidden, weight and bias.
    Targets are checked on the host (one synchronisation on GPU).

    >>> loss = linear_cross_entropy(torch.randn(8, 128, 256), torch.randn(8192, 256),
    ...                             torch.randint(0, 8192, (8, 128)))
    """
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError("linear_cross_entropy: hidden and weight must be floating point")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be [V, C={hidden.shape[-1]}], got "
                         f"{tuple(weight.shape)}")
    if targets.dtype not in (torch.int64, torch.int32) or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets must be integer with shape "
                         f"{tuple(hidden.shape[:-1])}, got {targets.dtype} {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be [{weight.shape[0]}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got "
                         f"{label_smoothing}")
    devices = {t.device for t in (hidden, weight, targets, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"linear_cross_entropy: inputs on several devices: {devices}")
    v = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: targets outside [0, {v}) other than "
                         f"ignore_index={ignore_index}, e.g. {targets[bad][0].item()}")
    hidden2, targets1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    backend = choose_backend(hidden)
    if backend == "reference":
        return linear_cross_entropy_reference(hidden2, weight, targets1, bias=bias,
                                              ignore_index=ignore_index,
                                              label_smoothing=label_smoothing)
    rows_fn = cross_entropy_rows_fwd if backend == "triton" else cross_entropy_rows_torch
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    return LinearCrossEntropyFunction.apply(hidden2, weight, bias, targets1, ignore_index,
                                            float(label_smoothing), rows_fn)
