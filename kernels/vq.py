"""Vector-quantization lookup: the nearest codebook entry of every vector, fused.

For z [N, D] and a codebook [K, D], the nearest code under squared L2 is
    argmin_k ||z||^2 - 2 z.e_k + ||e_k||^2  =  argmin_k (||e_k||^2 - 2 z.e_k)
so each implementation streams the codebook through a GEMM against z and keeps a running
(min, argmin) per row, never holding the N x K distance matrix. Cosine is L2 on
L2-normalised z and codebook (the argmin of 2 - 2cos is the argmax of cos).

Gradients (straight-through): d quantized flows to z unchanged, and to the codebook as the
sum over the positions that chose each code (index_add), so a codebook trained by a loss
on `quantized` learns.

Non-finite input: a row of z holding NaN gets index 0 on every backend; a row holding
±Inf gets an index in [0, K) (the code furthest along the infinite direction). No backend
reads or writes out of bounds. A NaN in the codebook is undefined behaviour (the index is
still in range): keep codebooks finite.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from t2i_kernels._dispatch import choose_backend
from t2i_kernels._launch import launch

# ----------------------------------------------------------------------------- Triton kernel


@triton.jit
def _vq_lookup_fwd_kernel(
    z_ptr, cb_ptr, esq_ptr, idx_ptr, q_ptr, dist_ptr,
    N, K, D,
    stride_zn, stride_zd, stride_cbk, stride_qn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: z stays in registers across the K loop
    DOT_PRECISION: tl.constexpr,  # "tf32x3" keeps fp32 inputs fp32-accurate on tensor cores
    WRITE_Q: tl.constexpr, WRITE_DIST: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_d = tl.arange(0, BLOCK_D)
    o_kb = tl.arange(0, BLOCK_K)

    if SINGLE_D:
        m_d = o_d < D
        p_z = z_ptr + o_n[:, None] * stride_zn + o_d[None, :] * stride_zd
        b_z = tl.load(p_z, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_z = b_z.to(cb_ptr.dtype.element_ty)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + o_kb
        m_k = o_k < K
        if SINGLE_D:
            p_cb = cb_ptr + o_k[:, None].to(tl.int64) * stride_cbk + o_d[None, :]
            b_cb = tl.load(p_cb, mask=m_k[:, None] & m_d[None, :], other=0.0)
            b_dot = tl.dot(b_z, tl.trans(b_cb), input_precision=DOT_PRECISION)
        else:
            b_dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                o_dd = d0 + o_d
                m_dd = o_dd < D
                p_z = z_ptr + o_n[:, None] * stride_zn + o_dd[None, :] * stride_zd
                b_zd = tl.load(p_z, mask=m_n[:, None] & m_dd[None, :], other=0.0)
                p_cb = cb_ptr + o_k[:, None].to(tl.int64) * stride_cbk + o_dd[None, :]
                b_cb = tl.load(p_cb, mask=m_k[:, None] & m_dd[None, :], other=0.0)
                b_dot = tl.dot(b_zd.to(cb_ptr.dtype.element_ty), tl.trans(b_cb), b_dot,
                               input_precision=DOT_PRECISION)
        b_esq = tl.load(esq_ptr + o_k, mask=m_k, other=float("inf"))
        b_score = b_esq[None, :] - 2.0 * b_dot  # [BLOCK_N, BLOCK_K]; +inf past K
        b_min = tl.min(b_score, axis=1)
        b_arg = tl.argmin(b_score, axis=1).to(tl.int64) + k0
        # strict: ties keep the earlier code, like torch.argmin; NaN never replaces
        better = b_min < best
        best = tl.where(better, b_min, best)
        best_idx = tl.where(better, b_arg, best_idx)
    best_idx = tl.minimum(best_idx, K - 1)  # belt and braces: never an out-of-range code

    tl.store(idx_ptr + o_n, best_idx, mask=m_n)
    if WRITE_Q or WRITE_DIST:
        z_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_dd = d0 + o_d
            m = m_n[:, None] & (o_dd < D)[None, :]
            if WRITE_Q:
                p_e = cb_ptr + best_idx[:, None] * stride_cbk + o_dd[None, :]
                b_e = tl.load(p_e, mask=m, other=0.0)
                p_q = q_ptr + o_n[:, None] * stride_qn + o_dd[None, :]
                tl.store(p_q, b_e.to(q_ptr.dtype.element_ty), mask=m)
            if WRITE_DIST:
                p_z = z_ptr + o_n[:, None] * stride_zn + o_dd[None, :] * stride_zd
                b_zd = tl.load(p_z, mask=m, other=0.0).to(tl.float32)
                z_sq += tl.sum(b_zd * b_zd, axis=1)
        if WRITE_DIST:
            tl.store(dist_ptr + o_n, tl.maximum(z_sq + best, 0.0), mask=m_n)


# ----------------------------------------------------------------------------- launcher


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def vq_config(D: int, dtype: torch.dtype) -> dict:
    """Block sizes the library launches with for a (padded) D and dtype; t2i_kernels.aot
    compiles every one. Chosen from ptxas reports on sm_80 / sm_90 (no spills):
    - fp16 / bf16: 64 rows x 64 codes, 4 warps; D <= 128 keeps z in registers across the
      code loop, larger D loops over 32-wide slices.
    - fp32: tf32x3 (three TF32 products, fp32-accurate on tensor cores) splits every
      operand in two, so z cannot stay in registers: 32-wide slices, 8 warps, 1 stage.
    """
    if dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 16 if D <= 16 else 32,
                "SINGLE_D": False, "DOT_PRECISION": "tf32x3", "num_warps": 8 if D > 16 else 4,
                "num_stages": 1}
    single = D <= 128
    return {"BLOCK_N": 64, "BLOCK_K": 64,
            "BLOCK_D": max(16, triton.next_power_of_2(D)) if single else 32,
            "SINGLE_D": single, "DOT_PRECISION": "tf32", "num_warps": 4, "num_stages": 2}


def vq_lookup_fwd(z: torch.Tensor, codebook: torch.Tensor, *, write_q: bool = True,
                  write_dist: bool = False, config: dict | None = None):
    """Triton lookup of z [N, D] (any strides) in codebook [K, D] (same dtype).
    -> (indices long [N], quantized [N, D] or None, squared distances fp32 [N] or None).

    D that is not a multiple of 16 is zero-padded (z and codebook copied): unaligned rows
    turn every tile load into scalar loads with their own addresses, which costs twice the
    registers and spills; the zeros change no dot product or norm.
    """
    if z.dtype != codebook.dtype or z.dtype not in _TRITON_DTYPES:
        raise TypeError(f"vq_lookup_fwd: z and codebook must share one of {_TRITON_DTYPES}; "
                        f"got {z.dtype} and {codebook.dtype}")
    n, d = z.shape
    k = codebook.shape[0]
    d_pad = -(-d // 16) * 16
    if d_pad != d:
        z = torch.nn.functional.pad(z, (0, d_pad - d))
        codebook = torch.nn.functional.pad(codebook, (0, d_pad - d))
    codebook = codebook.contiguous()
    esq = codebook.float().pow(2).sum(1)
    idx = torch.empty(n, dtype=torch.long, device=z.device)
    q = torch.empty(n, d_pad, dtype=z.dtype, device=z.device) if write_q else None
    dist = torch.empty(n, dtype=torch.float32, device=z.device) if write_dist else None
    if n > 0:
        cfg = dict(config or vq_config(d_pad, z.dtype))
        launch(
            _vq_lookup_fwd_kernel, (triton.cdiv(n, cfg["BLOCK_N"]),),
            z, codebook, esq, idx, q if write_q else idx, dist if write_dist else esq,
            n, k, d_pad, z.stride(0), z.stride(1), codebook.stride(0),
            q.stride(0) if write_q else 0, WRITE_Q=write_q, WRITE_DIST=write_dist, **cfg)
    if write_q and d_pad != d:
        q = q[:, :d]
    return idx, q, dist


def aot_launches():
    """Run the launcher over every specialisation the library launches (for t2i_kernels.aot):
    each dtype; D in registers (16..128), sliced (256), padded (60); strided z; with and
    without distances."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for dtype in _TRITON_DTYPES:
        for d in (16, 32, 60, 64, 128, 256):
            for write_dist in (False, True):
                yield (f"{names[dtype]} D={d}{' +dist' if write_dist else ''}",
                       lambda dtype=dtype, d=d, w=write_dist: vq_lookup_fwd(
                           torch.empty(256, d, dtype=dtype), torch.empty(512, d, dtype=dtype),
                           write_dist=w))
        yield (f"{names[dtype]} D=64 strided z",
               lambda dtype=dtype: vq_lookup_fwd(torch.empty(256, 128, dtype=dtype)[:, ::2],
                                                 torch.empty(512, 64, dtype=dtype)))


# ----------------------------------------------------------------------------- autograd


class VQLookupFunction(torch.autograd.Function):
    """Straight-through lookup around either fast forward (vq_lookup_fwd, vq_lookup_torch_fwd).

    forward(z [N, D], codebook [K, D], lookup, write_dist)
        -> (indices [N], quantized [N, D], squared distances [N] or None);
    backward: d z = d quantized, d codebook = index_add of d quantized by index.
    """

    @staticmethod
    def forward(ctx, z, codebook, lookup, write_dist):
        idx, q, dist = lookup(z, codebook, write_dist=write_dist)
        ctx.save_for_backward(idx)
        ctx.codebook_shape = codebook.shape
        ctx.codebook_dtype = codebook.dtype
        ctx.mark_non_differentiable(idx, *([dist] if write_dist else []))
        return idx, q, dist

    @staticmethod
    def backward(ctx, _grad_idx, grad_q, _grad_dist):
        (idx,) = ctx.saved_tensors
        grad_z = grad_cb = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_q
        if ctx.needs_input_grad[1]:
            grad_cb = torch.zeros(ctx.codebook_shape, dtype=torch.float32, device=grad_q.device)
            grad_cb.index_add_(0, idx, grad_q.float())
            grad_cb = grad_cb.to(ctx.codebook_dtype)
        return grad_z, grad_cb, None, None


# ----------------------------------------------------------------------------- reference


def vq_lookup_reference(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2",
                        return_distances: bool = False):
    """The specification: the full [N, K] distance matrix in fp32, argmin, gather.
    z [N, D], codebook [K, D] -> (indices, quantized in z's dtype[, distances fp32])."""
    zf, cf = z.float(), codebook.float()
    if metric == "cosine":
        zf = torch.nn.functional.normalize(zf, dim=-1)
        cf = torch.nn.functional.normalize(cf, dim=-1)
    dist = (zf * zf).sum(1, keepdim=True) - 2 * zf @ cf.T + (cf * cf).sum(1)[None, :]
    idx = dist.argmin(1)
    q = cf[idx]  # gathered: autograd sends d q to the chosen codes (index_add)
    q = q + (zf - zf.detach())  # straight-through: d q reaches z unchanged
    out = (idx, q.to(z.dtype))
    if return_distances:
        best = dist.gather(1, idx[:, None])[:, 0].clamp_min(0)
        out += (best / 2 if metric == "cosine" else best,)
    return out


# ----------------------------------------------------------------------------- torch path

_SCORE_BUDGET = 1 << 22  # elements of the score block held at once (16 MiB fp32)


def _group_size(k: int) -> int:
    """Codes per group in the two-level argmin: about sqrt(K), measured best on 2 cores."""
    return 32 if k <= 512 else 64 if k <= 4096 else 128


def vq_lookup_torch_fwd(z: torch.Tensor, codebook: torch.Tensor, *, write_q: bool = True,
                        write_dist: bool = False):
    """CPU lookup: GEMM chunks of rows (and of codes when K is huge) with a running min.

    Scores come from one addmm per chunk (||e||^2 - 2 z.e), reduced by a two-level argmin:
    the minimum of each group of ~sqrt(K) codes (a vectorised amin), then argmin over groups
    and inside the winning group. torch.argmin over a whole row is up to 7x slower, and this
    keeps the first minimum, exactly as it would. The codebook is padded to a multiple of
    the group with +inf norms so every block is contiguous. Extra memory: O(K*D + 4M) floats.
    """
    n, d = z.shape
    k = codebook.shape[0]
    cf = codebook.float()
    group = _group_size(k)
    k_pad = -(-k // group) * group
    esq = torch.full((k_pad,), float("inf"), device=z.device)
    esq[:k] = (cf * cf).sum(1)
    cb_pad = torch.zeros(k_pad, d, device=z.device)
    cb_pad[:k] = cf
    k_chunk = min(k_pad, max(group, _SCORE_BUDGET // 16 // group * group))
    rows = max(1, min(n, 1024, _SCORE_BUDGET // k_chunk))
    idx = torch.empty(n, dtype=torch.long, device=z.device)
    best_val = torch.empty(n, device=z.device) if write_dist else None
    scores = torch.empty(rows * k_chunk, device=z.device)
    for r0 in range(0, n, rows):
        zc = z[r0:r0 + rows].float()
        r = zc.shape[0]
        best = torch.full((r,), float("inf"), device=z.device)
        best_i = torch.zeros(r, dtype=torch.long, device=z.device)
        for k0 in range(0, k_pad, k_chunk):
            kc = min(k_chunk, k_pad - k0)
            s = scores[:r * kc].view(r, kc)
            torch.addmm(esq[k0:k0 + kc], zc, cb_pad[k0:k0 + kc].T, alpha=-2, out=s)
            groups = s.view(r, kc // group, group)
            g = groups.amin(2).argmin(1)  # first group holding the minimum (NaN counts)
            within = groups[torch.arange(r, device=z.device), g]  # [r, GROUP]
            j = within.argmin(1)
            val = within.gather(1, j[:, None])[:, 0]
            better = val < best  # strict, as in the kernel: NaN never replaces
            best = torch.where(better, val, best)
            best_i = torch.where(better, k0 + g * group + j, best_i)
        idx[r0:r0 + r] = best_i.clamp_(max=k - 1)
        if write_dist:
            best_val[r0:r0 + r] = (best + (zc * zc).sum(1)).clamp_min_(0)
    q = codebook.index_select(0, idx).to(z.dtype) if write_q else None
    return idx, q, best_val


# ----------------------------------------------------------------------------- public API


class VQStats(NamedTuple):
    counts: torch.Tensor  # float [K]: how many vectors chose each code
    sums: torch.Tensor  # float [K, D]: the sum of the vectors that chose each code
    usage: torch.Tensor  # float []: fraction of codes chosen at least once
    perplexity: torch.Tensor  # float []: exp(entropy of the code histogram)


def vq_stats(indices: torch.Tensor, z: torch.Tensor, num_codes: int) -> VQStats:
    """Per-code counts and sums of z (for EMA codebook updates and dead-code restarts),
    codebook usage and perplexity. indices long [...], z [..., D] -> VQStats (fp32)."""
    idx = indices.reshape(-1)
    zf = z.reshape(-1, z.shape[-1]).float()
    if idx.shape[0] != zf.shape[0]:
        raise ValueError(f"vq_stats: {idx.shape[0]} indices for {zf.shape[0]} vectors")
    counts = torch.bincount(idx, minlength=num_codes).float()
    if counts.shape[0] != num_codes:
        raise ValueError(f"vq_stats: an index is >= num_codes={num_codes}")
    sums = torch.zeros(num_codes, zf.shape[1], device=zf.device).index_add_(0, idx, zf)
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return VQStats(counts, sums, (counts > 0).float().mean(), entropy.exp())


def _check(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    if metric not in ("l2", "cosine"):
        raise ValueError(f"vq_lookup: metric must be 'l2' or 'cosine', got {metric!r}")
    if not isinstance(z, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise TypeError("vq_lookup: z and codebook must be tensors")
    if z.dim() < 1:
        raise ValueError("vq_lookup: z must be [..., D], got a scalar")
    if codebook.dim() != 2:
        raise ValueError(f"vq_lookup: codebook must be [K, D], got shape {tuple(codebook.shape)}")
    if not z.is_floating_point() or not codebook.is_floating_point():
        raise TypeError(f"vq_lookup: z and codebook must be floating point, got {z.dtype} "
                        f"and {codebook.dtype}")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"vq_lookup: z has D={z.shape[-1]} but the codebook has "
                         f"D={codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("vq_lookup: the codebook is empty (K=0)")
    if z.device != codebook.device:
        raise ValueError(f"vq_lookup: z is on {z.device} but the codebook on {codebook.device}")


def vq_lookup(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2",
              return_distances: bool = False):
    """Nearest codebook entry of every vector, without the [N, K] distance matrix.

    z: [..., D] float; codebook: [K, D] float (any float dtypes; computed in the wider one).
    metric: "l2" (squared Euclidean) or "cosine" (both sides L2-normalised; quantized is
    then the normalised code).
    Returns (indices long [...], quantized [..., D] in z's dtype), plus distances fp32 [...]
    (squared L2, or 1 - cos) with return_distances=True. Differentiable (straight-through
    to z, index_add to the codebook); distances carry no gradient.

    >>> z, codebook = torch.randn(2, 16, 8), torch.randn(512, 8)
    >>> indices, quantized = vq_lookup(z, codebook)   # long [2, 16], [2, 16, 8]
    """
    _check(z, codebook, metric)
    lead, d = z.shape[:-1], z.shape[-1]
    backend = choose_backend(z)
    if backend == "reference":
        out = vq_lookup_reference(z.reshape(-1, d), codebook, metric=metric,
                                  return_distances=return_distances)
        return (out[0].view(lead), out[1].view(*lead, d)) + tuple(o.view(lead) for o in out[2:])

    dtype = torch.promote_types(z.dtype, codebook.dtype)
    z2, cb = z.reshape(-1, d).to(dtype), codebook.to(dtype)
    if metric == "cosine":  # autograd runs through the normalisation
        z2 = torch.nn.functional.normalize(z2, dim=-1)
        cb = torch.nn.functional.normalize(cb, dim=-1)
    fwd = vq_lookup_fwd if backend == "triton" else vq_lookup_torch_fwd
    idx, q, dist = VQLookupFunction.apply(z2, cb, fwd, return_distances)
    out = (idx.view(lead), q.to(z.dtype).view(*lead, d))
    if return_distances:
        out += ((dist / 2 if metric == "cosine" else dist).view(lead),)
    return out
