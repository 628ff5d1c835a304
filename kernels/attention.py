"""Masked attention: causal, prefix-LM, key padding and arbitrary boolean masks, combined,
forward and backward, with attention dropout.

Mask semantics (the reference is the specification). Queries are aligned to the end of the
keys: query i sits at position i + (Lk - Lq), so Lq = 1 against a KV cache is the last
position. Key j is visible from query i when all of these hold:
- prefix_len P (int or long [B]): j <= max(pos_i, P - 1) -- positions before P attend to
  each other bidirectionally, later ones causally to everything before them. causal=True is
  P = 0 (with a prefix, the prefix rule already implies causality after it);
- key_padding_mask[b, j] (True = keep);
- attn_mask[b, h, i, j] (True = attend; B and H may be 1).
A query with no visible key returns zeros, and its gradients are zero: never NaN.

The Triton kernel is FlashAttention-2 (online softmax over key tiles; backward recomputes
the probabilities from the fp32 log-sum-exp, one kernel for dK/dV and one for dQ): the
causal/prefix rule bounds the loops, so tiles no row can see are never visited, and tiles
every row can see skip the element mask. Trailing padded key tiles are skipped too.
"""

import torch
import triton
import triton.language as tl

from t2i_kernels._dispatch import choose_backend
from t2i_kernels._launch import launch

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _visible(i_b, i_h, o_m, o_n, m_m, m_n, limit, check_limit, kpm_ptr, skpm_b, mask_ptr,
             sm_b, sm_h, sm_q, has_kpm, has_mask):
    """Which (row, key) pairs of a tile may attend: bool [BLOCK_M, BLOCK_N]."""
    vis = m_m[:, None] & m_n[None, :]
    if check_limit:
        vis = vis & (o_n[None, :] <= limit[:, None])
    if has_kpm != 0:
        kp = tl.load(kpm_ptr + i_b * skpm_b + o_n, mask=m_n, other=0)
        vis = vis & (kp[None, :] != 0)
    if has_mask != 0:
        mt = tl.load(mask_ptr + i_b * sm_b + i_h * sm_h + o_m[:, None] * sm_q + o_n[None, :],
                     mask=m_m[:, None] & m_n[None, :], other=0)
        vis = vis & (mt != 0)
    return vis


@triton.jit
def _load_rows(ptr, i_b, i_h, s_b, s_h, s_l, o_l, m_l, o_d, m_d):
    """Rows o_l of head (i_b, i_h) of a [B, H, L, D] tensor: [rows, D_PAD], 0 outside."""
    return tl.load(ptr + i_b * s_b + i_h * s_h + o_l[:, None] * s_l + o_d[None, :],
                   mask=m_l[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _dropout_keep(seed, i_bh, o_m, o_n, Lq, Lk, dropout_p):
    """Philox keep-mask of a tile; the same offsets in forward and backward."""
    return tl.rand(seed, (i_bh * Lq + o_m[:, None]) * Lk + o_n[None, :]) >= dropout_p


@triton.jit
def _key_range(i_b, block_first_row, block_last_row, off, prefix_ptr, klen_ptr, is_prefix):
    """Keys [0, hi) that some row of a query block may see, and [0, full) that all can."""
    hi = tl.load(klen_ptr + i_b).to(tl.int64)  # keys after the last kept one are skipped
    full = hi
    p_len = hi * 0
    if is_prefix != 0:
        p_len = tl.load(prefix_ptr + i_b)
        hi = tl.minimum(hi, tl.maximum(block_last_row + off, p_len - 1) + 1)
        full = tl.maximum(block_first_row + off, p_len - 1) + 1
    return hi, full, p_len


# Mask switches are runtime scalars (uniform over a launch: cheap branches, fewer compiled
# variants); dropout is a constexpr: its Philox draws inside the loop cost registers enough
# to spill every kernel that merely contains them.
_ATTN_SWITCHES = ["dropout_p", "has_kpm", "has_mask", "is_prefix"]


@triton.jit(do_not_specialize=_ATTN_SWITCHES)
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, prefix_ptr, klen_ptr, kpm_ptr, mask_ptr, seed_ptr,
    H, Lq, Lk, D,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l,
    skpm_b, sm_b, sm_h, sm_q,
    scale, dropout_p, has_kpm, has_mask, is_prefix,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D_PAD)
    m_m, m_d = o_m < Lq, o_d < D
    off = Lk - Lq
    b_q = _load_rows(q_ptr, i_b, i_h, sq_b, sq_h, sq_l, o_m, m_m, o_d, m_d)
    hi, full, p_len = _key_range(i_b, i_m * BLOCK_M, tl.minimum(i_m * BLOCK_M + BLOCK_M, Lq) - 1,
                                 off, prefix_ptr, klen_ptr, is_prefix)
    limit = tl.maximum(o_m + off, p_len - 1)
    seed = tl.load(seed_ptr)
    qk_scale = scale * _LOG2E  # exp2 instead of exp

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < Lk
        b_k = _load_rows(k_ptr, i_b, i_h, sk_b, sk_h, sk_l, o_n, m_n, o_d, m_d)
        b_v = _load_rows(v_ptr, i_b, i_h, sv_b, sv_h, sv_l, o_n, m_n, o_d, m_d)
        s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
        check = (is_prefix != 0) & (n0 + BLOCK_N > full)  # a tile past `full` needs the limit
        vis = _visible(i_b, i_h, o_m, o_n, m_m, m_n, limit, check, kpm_ptr, skpm_b, mask_ptr,
                       sm_b, sm_h, sm_q, has_kpm, has_mask)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty so far: exp2 gives 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # on the normalised probabilities: l_i stays undropped
            keep = _dropout_keep(seed, i_bh, o_m, o_n, Lq, Lk, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * _LN2)
    tl.store(o_ptr + i_b * so_b + i_h * so_h + o_m[:, None] * so_l + o_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(lse_ptr + i_bh * Lq + o_m, lse, mask=m_m)


@triton.jit(do_not_specialize=_ATTN_SWITCHES)
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    prefix_ptr, kpm_ptr, mask_ptr, seed_ptr,
    H, Lq, Lk, D,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l,
    sdk_b, sdk_h, sdk_l, sdv_b, sdv_h, sdv_l,
    skpm_b, sm_b, sm_h, sm_q,
    scale, dropout_p, has_kpm, has_mask, is_prefix,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    m_n, m_d = o_n < Lk, o_d < D
    off = Lk - Lq
    b_k = _load_rows(k_ptr, i_b, i_h, sk_b, sk_h, sk_l, o_n, m_n, o_d, m_d)
    b_v = _load_rows(v_ptr, i_b, i_h, sv_b, sv_h, sv_l, o_n, m_n, o_d, m_d)
    # the rows that see some key of this block start at m_lo; rows below `partial` may not
    # see all of them (key j is visible from row i when j <= max(i + off, P - 1))
    zero = (i_n * 0).to(tl.int64)
    m_lo, partial, p_len = zero, zero, zero
    if is_prefix != 0:
        p_len = tl.load(prefix_ptr + i_b)
        first, last = i_n * BLOCK_N, tl.minimum(i_n * BLOCK_N + BLOCK_N, Lk) - 1
        m_lo = (tl.where(first <= p_len - 1, 0, tl.maximum(first - off, 0)) // BLOCK_M
                * BLOCK_M).to(tl.int64)
        partial = tl.where(last <= p_len - 1, 0, last - off + 1).to(tl.int64)
    m_hi = zero + Lq
    if has_kpm != 0:  # a block of padding keys gets no gradient: skip every row
        kp = tl.load(kpm_ptr + i_b * skpm_b + o_n, mask=m_n, other=0)
        m_hi = tl.where(tl.max(kp.to(tl.int32), 0) == 0, m_lo, Lq)
    seed = tl.load(seed_ptr)
    qk_scale = scale * _LOG2E

    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < Lq
        b_q = _load_rows(q_ptr, i_b, i_h, sq_b, sq_h, sq_l, o_m, m_m, o_d, m_d)
        b_do = _load_rows(do_ptr, i_b, i_h, sdo_b, sdo_h, sdo_l, o_m, m_m, o_d, m_d)
        lse = tl.load(lse_ptr + i_bh * Lq + o_m, mask=m_m, other=float("inf"))
        delta = tl.load(delta_ptr + i_bh * Lq + o_m, mask=m_m, other=0.0)
        s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
        p = tl.exp2(s - lse[:, None] * _LOG2E)  # lse = +inf for an empty row: p = 0
        limit = tl.maximum(o_m + off, p_len - 1)
        vis = _visible(i_b, i_h, o_m, o_n, m_m, m_n, limit, (is_prefix != 0) & (m0 < partial),
                       kpm_ptr, skpm_b, mask_ptr, sm_b, sm_h, sm_q, has_kpm, has_mask)
        p = tl.where(vis, p, 0.0)
        dp = tl.dot(b_do, tl.trans(b_v))
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, i_bh, o_m, o_n, Lq, Lk, dropout_p)
            dv += tl.dot(tl.trans(tl.where(keep, p / (1.0 - dropout_p), 0.0).to(b_do.dtype)),
                         b_do)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            dv += tl.dot(tl.trans(p.to(b_do.dtype)), b_do)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(b_q.dtype)), b_q)
    dk = dk * scale
    p_out = i_b * sdk_b + i_h * sdk_h + o_n[:, None] * sdk_l + o_d[None, :]
    tl.store(dk_ptr + p_out, dk.to(dk_ptr.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])
    p_out = i_b * sdv_b + i_h * sdv_h + o_n[:, None] * sdv_l + o_d[None, :]
    tl.store(dv_ptr + p_out, dv.to(dv_ptr.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])


@triton.jit(do_not_specialize=_ATTN_SWITCHES)
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    prefix_ptr, klen_ptr, kpm_ptr, mask_ptr, seed_ptr,
    H, Lq, Lk, D,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l,
    sdq_b, sdq_h, sdq_l,
    skpm_b, sm_b, sm_h, sm_q,
    scale, dropout_p, has_kpm, has_mask, is_prefix,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D_PAD)
    m_m, m_d = o_m < Lq, o_d < D
    off = Lk - Lq
    p_row = i_b * sq_b + i_h * sq_h + o_m[:, None] * sq_l + o_d[None, :]
    b_q = tl.load(q_ptr + p_row, mask=m_m[:, None] & m_d[None, :], other=0.0)
    b_do = _load_rows(do_ptr, i_b, i_h, sdo_b, sdo_h, sdo_l, o_m, m_m, o_d, m_d)
    lse = tl.load(lse_ptr + i_bh * Lq + o_m, mask=m_m, other=float("inf"))
    delta = tl.load(delta_ptr + i_bh * Lq + o_m, mask=m_m, other=0.0)
    hi, full, p_len = _key_range(i_b, i_m * BLOCK_M, tl.minimum(i_m * BLOCK_M + BLOCK_M, Lq) - 1,
                                 off, prefix_ptr, klen_ptr, is_prefix)
    limit = tl.maximum(o_m + off, p_len - 1)
    seed = tl.load(seed_ptr)
    qk_scale = scale * _LOG2E

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < Lk
        b_k = _load_rows(k_ptr, i_b, i_h, sk_b, sk_h, sk_l, o_n, m_n, o_d, m_d)
        b_v = _load_rows(v_ptr, i_b, i_h, sv_b, sv_h, sv_l, o_n, m_n, o_d, m_d)
        s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
        p = tl.exp2(s - lse[:, None] * _LOG2E)
        check = (is_prefix != 0) & (n0 + BLOCK_N > full)  # a tile past `full` needs the limit
        vis = _visible(i_b, i_h, o_m, o_n, m_m, m_n, limit, check, kpm_ptr, skpm_b, mask_ptr,
                       sm_b, sm_h, sm_q, has_kpm, has_mask)
        p = tl.where(vis, p, 0.0)
        dp = tl.dot(b_do, tl.trans(b_v))
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, i_bh, o_m, o_n, Lq, Lk, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(b_k.dtype), b_k)
    p_out = i_b * sdq_b + i_h * sdq_h + o_m[:, None] * sdq_l + o_d[None, :]
    tl.store(dq_ptr + p_out, (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _dropout_keep_kernel(seed_ptr, out_ptr, Lq, Lk, dropout_p, BLOCK_N: tl.constexpr):
    """The keep-mask the kernels draw, materialised [B*H, Lq, Lk] (for tests)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1)
    o_m = i_m + tl.zeros([1], tl.int32)
    seed = tl.load(seed_ptr)
    for n0 in range(0, Lk, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, i_bh, o_m, o_n, Lq, Lk, dropout_p)
        tl.store(out_ptr + (i_bh * Lq + i_m) * Lk + o_n[None, :], keep.to(tl.int8),
                 mask=o_n[None, :] < Lk)


# ----------------------------------------------------------------------------- launchers

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128


def _config(kernel: str, lq: int, d: int, dtype: torch.dtype, dropout: bool) -> dict:
    """Block sizes per kernel, chosen from ptxas reports on sm_80 and sm_90 (t2i_kernels.aot
    compiles every one): see _BLOCKS. The head dim is padded to a power of two >= 16."""
    d_pad = max(16, triton.next_power_of_2(d))
    if kernel == "fwd" and lq <= 16:  # decoding: one query row, 16-row blocks
        block_m, block_n, warps = 16, 64, 4
    else:
        block_m, block_n, warps = _BLOCKS(kernel, d_pad, dtype, dropout)
    # maxnreg: without it ptxas budgets 128 registers at 8 warps (168 at 4) to fit two
    # blocks per SM, and spilled 16-28 B in several backward kernels; they need ~170.
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "D_PAD": d_pad, "HAS_DROPOUT": dropout,
            "num_warps": warps, "num_stages": 2, "maxnreg": 255}


def _BLOCKS(kernel, d_pad, dtype, dropout):  # noqa: N802
    """(BLOCK_M, BLOCK_N, warps): 64 x 32 at 4 warps where it fits in registers; fp32
    operands, D=128 and in-loop dropout need 32 x 32 at 8 warps (64-row tiles spilled up to
    1.1 KB on sm_90, 4 warps 16 B). Tuning for speed needs a GPU; these are the largest
    tiles that compile without spills."""
    if dtype == torch.float32 or d_pad == 128 or dropout:
        return 32, 32, 8
    return 64, 32, 4


class _Masks:
    """What the kernels read besides q, k, v: per-batch prefix length and key count, the
    int8 views of the masks (broadcast dims get stride 0), the dropout seed."""

    def __init__(self, q, k, prefix_len, key_padding_mask, attn_mask, dropout_p):
        b, h, _, _ = q.shape
        lk = k.shape[2]
        device = q.device
        self.is_prefix = prefix_len is not None
        self.prefix = (prefix_len if self.is_prefix else torch.zeros(b, dtype=torch.long,
                                                                     device=device))
        self.has_kpm = key_padding_mask is not None
        if self.has_kpm:
            self.kpm = key_padding_mask.contiguous().view(torch.int8)
            # one past the last kept key: tiles after it are all padding
            idx = torch.arange(1, lk + 1, device=device)
            self.klen = (key_padding_mask * idx).amax(-1).to(torch.int32)
        else:
            self.kpm = self.prefix
            self.klen = torch.full((b,), lk, dtype=torch.int32, device=device)
        self.has_mask = attn_mask is not None
        if self.has_mask:
            m = attn_mask if attn_mask.stride(-1) == 1 else attn_mask.contiguous()
            self.mask = m.view(torch.int8).expand(b, h, *m.shape[2:])
        else:
            self.mask = self.prefix
        self.dropout_p = float(dropout_p)
        self.seed = (torch.randint(0, 2**31 - 1, (1,), device=device) if dropout_p > 0
                     else torch.zeros(1, dtype=torch.long, device=device))

    def strides(self):
        kpm_b = self.kpm.stride(0) if self.has_kpm else 0
        m = self.mask
        return ((kpm_b, m.stride(0), m.stride(1), m.stride(2)) if self.has_mask
                else (kpm_b, 0, 0, 0))

    def switches(self):
        return (self.dropout_p, int(self.has_kpm), int(self.has_mask), int(self.is_prefix))


def attention_fwd(q, k, v, masks: _Masks, scale: float):
    """Triton forward: q [B, H, Lq, D], k, v [B, H, Lk, D] (last dim contiguous)
    -> (out like q, lse fp32 [B, H, Lq]: natural log, +inf for rows with no visible key)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    if b * h * lq == 0:
        return out, lse
    cfg = _config("fwd", lq, d, q.dtype, masks.dropout_p > 0)
    launch(_attention_fwd_kernel, (triton.cdiv(lq, cfg["BLOCK_M"]), b * h),
           q, k, v, out, lse, masks.prefix, masks.klen, masks.kpm, masks.mask, masks.seed,
           h, lq, lk, d, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
           *masks.strides(), scale, *masks.switches(), **cfg)
    return out, lse


def attention_bwd(do, q, k, v, out, lse, masks: _Masks, scale: float):
    """Triton backward -> (dq, dk, dv), each shaped like its input. Their strides are their
    own: empty_like gives a view of a fused projection (k and v as slices of one [B, L, 2,
    H, D] buffer, say) a dense layout with other strides than the view's."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = (out.float() * do.float()).sum(-1)  # [B, H, Lq]: rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if b * h == 0 or lq == 0 or lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dropout = masks.dropout_p > 0
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    rest = (*masks.strides(), scale, *masks.switches())
    cfg = _config("dkdv", lq, d, q.dtype, dropout)
    launch(_attention_bwd_dkdv_kernel, (triton.cdiv(lk, cfg["BLOCK_N"]), b * h),
           q, k, v, do, lse, delta, dk, dv, masks.prefix, masks.kpm, masks.mask, masks.seed,
           h, lq, lk, d, *strides, *dk.stride()[:3], *dv.stride()[:3], *rest, **cfg)
    cfg = _config("dq", lq, d, q.dtype, dropout)
    launch(_attention_bwd_dq_kernel, (triton.cdiv(lq, cfg["BLOCK_M"]), b * h),
           q, k, v, do, lse, delta, dq, masks.prefix, masks.klen, masks.kpm, masks.mask,
           masks.seed, h, lq, lk, d, *strides, *dq.stride()[:3], *rest, **cfg)
    return dq, dk, dv


def dropout_keep_mask(masks: _Masks, b: int, h: int, lq: int, lk: int) -> torch.Tensor:
    """The dropout keep-mask the Triton kernels use for this seed: bool [B, H, Lq, Lk]."""
    out = torch.empty(b * h, lq, lk, dtype=torch.int8, device=masks.seed.device)
    if out.numel():
        launch(_dropout_keep_kernel, (b * h, lq), masks.seed, out, lq, lk, masks.dropout_p,
               BLOCK_N=64)
    return out.view(b, h, lq, lk).bool()


def aot_launches():
    """Every specialisation the library launches (for t2i_kernels.aot): each dtype and
    padded head dim; forward and backward, with and without dropout; decoding forward."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for dtype in _TRITON_DTYPES:
        for d in (16, 32, 64, 128):
            def run(dtype=dtype, d=d, lq=256, dropout=0.0):
                q, k, v = (torch.empty(2, 4, n, d, dtype=dtype) for n in (lq, 256, 256))
                masks = _Masks(q, k, None, None, None, dropout)
                out, lse = attention_fwd(q, k, v, masks, 0.1)
                if lq > 16:
                    attention_bwd(out, q, k, v, out, lse, masks, 0.1)
            yield f"{names[dtype]} D={d}", run
            yield f"{names[dtype]} D={d} dropout", lambda run=run: run(dropout=0.1)
            yield f"{names[dtype]} D={d} decode", lambda run=run: run(lq=1)
    yield "dropout mask", lambda: dropout_keep_mask(
        _Masks(torch.empty(1, 1, 4, 16), torch.empty(1, 1, 4, 16), None, None, None, 0.1),
        1, 1, 4, 4)


# ----------------------------------------------------------------------------- autograd


class MaskedAttentionFunction(torch.autograd.Function):
    """Triton forward and backward; masks and dropout seed are saved, not differentiated."""

    @staticmethod
    def forward(ctx, q, k, v, masks, scale):
        out, lse = attention_fwd(q, k, v, masks, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks, ctx.scale = masks, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, out, lse, ctx.masks, ctx.scale)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------- reference


def visible_mask(b, h, lq, lk, *, causal=False, prefix_len=None, key_padding_mask=None,
                 attn_mask=None, device="cpu"):
    """The mask semantics in one place: bool, True = may attend, broadcastable to
    [B, H, Lq, Lk] (a padding mask alone stays [B, 1, 1, Lk]); None when nothing is masked."""
    vis = None

    def both(a, m):
        return m if a is None else a & m

    if prefix_len is not None or causal:
        pos = torch.arange(lq, device=device) + (lk - lq)  # queries aligned to the keys' end
        p = (prefix_len if prefix_len is not None
             else torch.zeros(b, dtype=torch.long, device=device)).view(b, 1, 1, 1)
        limit = torch.maximum(pos.view(1, 1, lq, 1), p - 1)
        vis = torch.arange(lk, device=device).view(1, 1, 1, lk) <= limit
    if key_padding_mask is not None:
        vis = both(vis, key_padding_mask.view(b, 1, 1, lk))
    if attn_mask is not None:
        vis = both(vis, attn_mask)
    return vis


def masked_attention_reference(q, k, v, *, causal=False, prefix_len=None, key_padding_mask=None,
                               attn_mask=None, dropout_keep=None, dropout_p=0.0, scale=None):
    """Scores materialised, masked and soft-maxed in fp32. dropout_keep: bool
    [B, H, Lq, Lk] (which probabilities survive), applied as keep / (1 - dropout_p)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    vis = visible_mask(b, h, lq, lk, causal=causal, prefix_len=prefix_len,
                       key_padding_mask=key_padding_mask, attn_mask=attn_mask, device=q.device)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if vis is not None:
        vis = vis.expand(s.shape)
        s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if vis is not None:
        p = torch.where(vis.any(-1, keepdim=True), p, 0.0)  # an empty row: zeros, not NaN
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    return (p @ v.float()).to(q.dtype)


# ----------------------------------------------------------------------------- torch path

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                         None)


_QUERY_BLOCK = 256  # causal region: rows per rectangle (1.50x over dense SDPA; 128: 1.42x)


def _rectangles(lq: int, lk: int, prefix: int | None):
    """The visible region of a causal / prefix-LM mask as mask-free rectangles:
    (query range, key range, is_causal on a square). None: no causal rule, one rectangle.

    Prefix rows see the prefix; each block of later rows sees every key before its first
    row (a full rectangle) and a causal square on the diagonal. torch's own is_causal skips
    work only at its internal block size, which saved ~10% on a 768-row square.
    """
    if prefix is None:
        return [((0, lq), (0, lk), False)]
    off = lk - lq
    i0 = min(max(prefix - off, 0), lq)  # queries before i0 sit in the prefix
    rects = []
    if i0 > 0 and prefix > 0:
        rects.append(((0, i0), (0, min(prefix, lk)), False))
    for a in range(i0, lq, _QUERY_BLOCK):
        z = min(lq, a + _QUERY_BLOCK)
        if a + off > 0:
            rects.append(((a, z), (0, a + off), False))
        rects.append(((a, z), (a + off, z + off), True))
    return rects


def _sub_mask(mask, q0, q1, k0, k1):
    """A rectangle of a broadcastable mask (dims of size 1 stay whole)."""
    if mask is None:
        return None
    rows = slice(q0, q1) if mask.shape[-2] > 1 else slice(None)
    return mask[..., rows, k0:k1]


class _RectangleAttention(torch.autograd.Function):
    """CPU attention as a sum of mask-free rectangles run by torch's CPU flash kernel.

    Forward merges the rectangles of a query range by their log-sum-exp. Backward calls the
    kernel's own backward on each rectangle with the global output and LSE: FlashAttention's
    backward only needs those, so the pieces add up to the exact gradient.
    `mask`: additive, broadcastable to [B, H, Lq, Lk], or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, rects, mask, scale):
        b, h, lq, _ = q.shape
        out = torch.zeros_like(q)
        lse = torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=q.device)
        groups: dict[tuple[int, int], list] = {}
        for rows, keys, causal in rects:
            if rows[1] > rows[0] and keys[1] > keys[0]:
                groups.setdefault(rows, []).append((keys, causal))
        for (q0, q1), pieces in groups.items():
            acc_o = acc_l = None
            for (k0, k1), causal in pieces:
                sub = _sub_mask(mask, q0, q1, k0, k1)
                o_r, l_r = _FLASH_CPU(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], 0.0,
                                      causal, attn_mask=sub, scale=scale)
                l_r = l_r.float()
                if sub is not None:  # the kernel reports lse 0 for a row it could not see
                    seen = torch.isfinite(sub)
                    if causal:  # the square's own shape: sub's rows may be broadcast
                        seen = seen & torch.ones(q1 - q0, k1 - k0, dtype=torch.bool,
                                                 device=q.device).tril()
                    l_r = torch.where(seen.any(-1).expand_as(l_r), l_r, float("-inf"))
                if acc_o is None:
                    acc_o, acc_l = o_r, l_r
                    continue
                m = torch.maximum(acc_l, l_r)
                m = torch.where(torch.isfinite(m), m, 0.0)
                w_acc, w_r = torch.exp(acc_l - m), torch.exp(l_r - m)
                total = w_acc + w_r
                inv = 1.0 / torch.where(total > 0, total, 1.0)
                acc_o = acc_o * (w_acc * inv)[..., None] + o_r * (w_r * inv)[..., None]
                acc_l = torch.where(total > 0, m + torch.log(total), float("-inf"))
            out[:, :, q0:q1] = acc_o
            lse[:, :, q0:q1] = acc_l
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rects, ctx.mask, ctx.scale = rects, mask, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        empty = ~torch.isfinite(lse)
        lse = torch.where(empty, float("inf"), lse)  # probabilities of an empty row: 0
        do = torch.where(empty[..., None], 0.0, do)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (q0, q1), (k0, k1), causal in ctx.rects:
            if q1 <= q0 or k1 <= k0:
                continue
            g = _FLASH_CPU_BWD(do[:, :, q0:q1].contiguous(), q[:, :, q0:q1], k[:, :, k0:k1],
                               v[:, :, k0:k1], out[:, :, q0:q1].contiguous(),
                               lse[:, :, q0:q1].contiguous(), 0.0, causal,
                               attn_mask=_sub_mask(ctx.mask, q0, q1, k0, k1), scale=ctx.scale)
            dq[:, :, q0:q1] += g[0]
            dk[:, :, k0:k1] += g[1]
            dv[:, :, k0:k1] += g[2]
        return dq, dk, dv, None, None, None


def _sdpa(q, k, v, vis, dropout_p, scale):
    """SDPA with a boolean mask; a row that sees no key gives zeros (and zero gradient)."""
    if vis is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                                scale=scale)
    has_key = vis.any(-1, keepdim=True)
    if bool(has_key.all()):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=vis, dropout_p=dropout_p, scale=scale)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=vis | ~has_key, dropout_p=dropout_p, scale=scale)
    return out * has_key


# On the CPU, bf16 inputs with fewer keys than this are attended in fp32 (and the result cast
# back): torch's CPU flash kernel in bf16 took 2.5-5x the fp32 time, forward and backward, at
# 32-128 keys of head dim 32, and 1.2-1.3x at 256; at 1,024 keys bf16 was faster.
_CPU_BF16_MIN_KEYS = 512


def masked_attention_torch(q, k, v, *, causal=False, prefix_len=None, key_padding_mask=None,
                           attn_mask=None, dropout_p=0.0, scale=None):
    """CPU attention. Without a causal rule: SDPA with the boolean mask (its best CPU path).
    Causal and prefix-LM masks become mask-free rectangles run by torch's CPU flash kernel,
    so key blocks no query can see are never computed, as SDPA with the equivalent dense
    mask must; padding and arbitrary masks then ride along as additive masks. With
    dropout, or without that kernel, SDPA with the dense mask. bf16 on the CPU with
    fewer than `_CPU_BF16_MIN_KEYS` keys: computed in fp32, returned in bf16."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and lk < _CPU_BF16_MIN_KEYS:
        with torch.autocast("cpu", enabled=False):  # which would make SDPA bf16 again
            out = masked_attention_torch(
                q.float(), k.float(), v.float(), causal=causal, prefix_len=prefix_len,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p,
                scale=scale)
        return out.to(q.dtype)
    scale = d ** -0.5 if scale is None else scale
    ordered = prefix_len is not None or causal
    usable = (_FLASH_CPU is not None and dropout_p == 0.0
              and q.dtype in (torch.float32, torch.bfloat16))
    if not ordered or not usable:
        vis = visible_mask(b, h, lq, lk, causal=causal, prefix_len=prefix_len,
                           key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                           device=q.device)
        return _sdpa(q, k, v, vis, dropout_p, scale)
    extra = visible_mask(b, h, lq, lk, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         device=q.device)
    if (extra is None and lq == lk and (prefix_len is None or not bool(prefix_len.any()))):
        # plain causal: SDPA's own is_causal beat the rectangles (50 vs 55 ms at L=1024)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                scale=scale)
    additive = None
    if extra is not None:
        additive = torch.zeros(extra.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~extra, float("-inf"))
    prefix = (prefix_len if prefix_len is not None
              else torch.zeros(b, dtype=torch.long, device=q.device))
    values = prefix.unique()
    if len(values) == 1:
        return _RectangleAttention.apply(q, k, v, _rectangles(lq, lk, int(values[0])),
                                         additive, scale)
    out = torch.empty_like(q)  # batch items grouped by prefix length
    for p in values.tolist():
        rows = (prefix == p).nonzero()[:, 0]
        sub = additive
        if additive is not None and additive.shape[0] > 1:
            sub = additive.index_select(0, rows)
        out = out.index_copy(0, rows, _RectangleAttention.apply(
            q[rows], k[rows], v[rows], _rectangles(lq, lk, p), sub, scale))
    return out


# ----------------------------------------------------------------------------- public API


def _check(q, k, v, prefix_len, key_padding_mask, attn_mask, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"masked_attention: {name} must be a float tensor [B, H, L, Dh]")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != (b, h, lk, d) or v.shape != k.shape:
        raise ValueError(f"masked_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not fit [B, H, L, Dh]")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"masked_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if d > _MAX_HEAD_DIM or d < 1:
        raise ValueError(f"masked_attention: head dim {d} is outside 1..{_MAX_HEAD_DIM}")
    devices = {t.device for t in (q, k, v, key_padding_mask, attn_mask) if t is not None}
    if isinstance(prefix_len, torch.Tensor):
        devices.add(prefix_len.device)
    if len(devices) > 1:
        raise ValueError(f"masked_attention: inputs on several devices: {devices}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (b, lk)):
        raise ValueError(f"masked_attention: key_padding_mask must be bool [B={b}, Lk={lk}], got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if attn_mask is not None and (attn_mask.dtype != torch.bool or attn_mask.dim() != 4
                                  or attn_mask.shape[0] not in (1, b)
                                  or attn_mask.shape[1] not in (1, h)
                                  or attn_mask.shape[2:] != (lq, lk)):
        raise ValueError(f"masked_attention: attn_mask must be bool [B or 1, H or 1, {lq}, {lk}],"
                         f" got {attn_mask.dtype} {tuple(attn_mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"masked_attention: dropout_p must be in [0, 1), got {dropout_p}")


def _prefix_tensor(prefix_len, b, lk, device):
    if prefix_len is None:
        return None
    if isinstance(prefix_len, int):
        prefix_len = torch.full((b,), prefix_len, dtype=torch.long, device=device)
    if prefix_len.shape != (b,) or prefix_len.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"masked_attention: prefix_len must be an int or a long tensor [B={b}]")
    if bool(((prefix_len < 0) | (prefix_len > lk)).any()):
        raise ValueError(f"masked_attention: prefix_len must be within [0, Lk={lk}], got "
                         f"{prefix_len.tolist()}")
    return prefix_len.long()


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                     prefix_len=None, key_padding_mask: torch.Tensor | None = None,
                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     scale: float | None = None) -> torch.Tensor:
    """Attention with the masks the project's models need, combined as documented at the
    top of this module; differentiable in q, k and v.

    q [B, H, Lq, Dh], k, v [B, H, Lk, Dh] (Dh <= 128, any float dtype shared by all three);
    prefix_len int or long [B]; key_padding_mask bool [B, Lk] (True = keep); attn_mask bool
    [B or 1, H or 1, Lq, Lk] (True = attend); scale defaults to Dh ** -0.5.
    -> [B, H, Lq, Dh] in q's dtype. Rows with no visible key are zeros.

    >>> q = k = v = torch.randn(2, 8, 300, 64)
    >>> out = masked_attention(q, k, v, prefix_len=torch.tensor([40, 64]))
    """
    _check(q, k, v, prefix_len, key_padding_mask, attn_mask, dropout_p)
    b, h, lq, d = q.shape
    prefix_len = _prefix_tensor(prefix_len, b, k.shape[2], q.device)
    if causal and prefix_len is None:
        prefix_len = torch.zeros(b, dtype=torch.long, device=q.device)
    scale = d ** -0.5 if scale is None else float(scale)
    backend = choose_backend(q)
    if backend == "reference":
        keep = None
        if dropout_p > 0:
            keep = torch.rand(b, h, q.shape[2], k.shape[2], device=q.device) >= dropout_p
        return masked_attention_reference(q, k, v, prefix_len=prefix_len,
                                          key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                          dropout_keep=keep, dropout_p=dropout_p, scale=scale)
    if backend == "torch":
        return masked_attention_torch(q, k, v, prefix_len=prefix_len,
                                      key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                      dropout_p=dropout_p, scale=scale)
    external = _external_attention(q, k, v, prefix_len, key_padding_mask, attn_mask, dropout_p,
                                   scale)
    if external is not None:
        return external
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    masks = _Masks(q, k, prefix_len, key_padding_mask, attn_mask, dropout_p)
    return MaskedAttentionFunction.apply(q, k, v, masks, scale)


def _external_attention(q, k, v, prefix_len, key_padding_mask, attn_mask, dropout_p, scale):
    """flash-attn, when it is installed and fits (fp16/bf16, no padding or arbitrary mask,
    no prefix beyond plain causal, Lq == Lk for causal): its own kernel. Else None."""
    if q.dtype not in (torch.float16, torch.bfloat16) or key_padding_mask is not None \
            or attn_mask is not None:
        return None
    causal = prefix_len is not None
    if causal and (q.shape[2] != k.shape[2] or bool((prefix_len > 1).any())):
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    return out.transpose(1, 2)
