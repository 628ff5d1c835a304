"""Token sampling (temperature, top-k, top-p, classifier-free guidance) and MaskGIT's
re-masking selection, without sorting the vocabulary.

Semantics shared by every backend (the reference is the specification):
- CFG: x = uncond + cfg_scale * (cond - uncond), then x / temperature.
- top-k keeps the k largest; at the threshold, ties are kept in index order (lowest first)
  until there are exactly k.
- top-p, applied after top-k on the top-k distribution renormalised, keeps the shortest
  prefix of the tokens in (probability desc, index asc) order whose mass reaches p.
- Sampling, with one of two kinds of uniform noise, gives the same token on every backend
  for the same noise. One u ~ U[0, 1) per vocabulary entry (noise of logits' shape): an
  exponential race, token = argmax_i (x_i - log(-log u_i)) over the kept tokens
  (Gumbel-max). One u per row (noise of logits.shape[:-1]): the inverse CDF, token = the
  first kept token in vocabulary order whose cumulative probability exceeds u (V times
  fewer draws: what MaskGIT decoding on CPU uses). temperature = 0 is greedy: the first
  argmax, whatever the noise.
- probs (return_probs=True): the probability of the drawn token under the distribution it
  was drawn from (for greedy, the filtered softmax at temperature 1): MaskGIT's confidence.
- NaN logits count as -inf. A row with no finite logit gives token 0 with probability 0.
- lowest_k_mask marks the k lowest scores of a row; ties in index order; NaN counts as +inf.
"""

import math

import torch
import triton
import triton.language as tl

from t2i_kernels._dispatch import choose_backend
from t2i_kernels._launch import launch

_NO_KEY = tl.constexpr(-(2**40))  # below every float key: "not kept" in tie bookkeeping

# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _ordered_key(x):
    """float32 -> int64 with the same order (x must not be NaN)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _key_value(key):
    """The float32 whose _ordered_key is `key`."""
    k32 = key.to(tl.int32)
    return tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _tie_keep(key, thr, n_keep, seen):
    """Keys above `thr`, and the first `n_keep` (in index order) equal to it.
    `seen` counts the ties in earlier blocks; returns (mask, updated seen)."""
    tie = (key == thr).to(tl.int32)
    rank = tl.cumsum(tie, 0) - tie + seen
    return (key > thr) | ((tie == 1) & (rank < n_keep)), seen + tl.sum(tie, 0)


@triton.jit
def _guided(p_x, p_c, o, mask, scale, cfg_scale, has_cfg):
    """One block of CFG-combined, temperature-scaled fp32 logits; NaN and padding -> -inf."""
    x = tl.load(p_x + o, mask=mask, other=float("-inf")).to(tl.float32)
    if has_cfg != 0:
        c = tl.load(p_c + o, mask=mask, other=float("-inf")).to(tl.float32)
        x = x + cfg_scale * (c - x)
    x = x * scale
    return tl.where(x == x, x, float("-inf"))


@triton.jit
def _kept(p_x, p_c, o, m, scale, cfg_scale, has_cfg, k_key, k_ties, seen_k, use_topp, p_key,
          p_ties, seen_p):
    """One block's logits and the mask of its tokens kept by top-k (and top-p), with the
    updated tie counters: -> (x, keep, seen_k, seen_p)."""
    x = _guided(p_x, p_c, o, m, scale, cfg_scale, has_cfg)
    key = _ordered_key(x)
    keep, seen_k = _tie_keep(key, k_key, k_ties, seen_k)
    if use_topp != 0:
        keep_p, seen_p = _tie_keep(tl.where(keep, key, _NO_KEY), p_key, p_ties, seen_p)
        keep = keep & keep_p
    return x, keep, seen_k, seen_p


@triton.jit
def _count_above(p_x, p_c, V, scale, cfg_scale, has_cfg, thr, BLOCK_V: tl.constexpr):
    """How many of the row's keys exceed `thr` (keys are integers: >= t is > t - 1)."""
    n = 0
    for v0 in range(0, V, BLOCK_V):
        o = v0 + tl.arange(0, BLOCK_V)
        x = _guided(p_x, p_c, o, o < V, scale, cfg_scale, has_cfg)
        n += tl.sum((_ordered_key(x) > thr).to(tl.int32), 0)
    return n


@triton.jit
def _kept_mass_above(p_x, p_c, V, scale, cfg_scale, has_cfg, ref, k_key, k_ties, thr,
                     BLOCK_V: tl.constexpr):
    """Sum of exp(x - ref) over the top-k set's keys that exceed `thr`."""
    mass = 0.0
    seen = 0
    for v0 in range(0, V, BLOCK_V):
        o = v0 + tl.arange(0, BLOCK_V)
        x = _guided(p_x, p_c, o, o < V, scale, cfg_scale, has_cfg)
        key = _ordered_key(x)
        keep, seen = _tie_keep(key, k_key, k_ties, seen)
        mass += tl.sum(tl.where(keep & (key > thr), tl.exp(x - ref), 0.0), 0)
    return mass


# The switches are runtime scalars, not constexprs: they are uniform over a launch, so the
# branches cost next to nothing, and one compiled kernel per dtype serves every setting.
@triton.jit(do_not_specialize=["top_k", "greedy", "has_cfg", "use_topk", "use_topp",
                               "has_noise"])
def _sample_logits_fwd_kernel(
    logits_ptr, cond_ptr, noise_ptr, seed_ptr, tokens_ptr, probs_ptr,
    V, stride_x, stride_c, stride_n,
    scale, top_k, top_p, cfg_scale,
    greedy, has_cfg, use_topk, use_topp, has_noise,
    BLOCK_V: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    p_x = logits_ptr + i_b * stride_x
    p_c = cond_ptr + i_b * stride_c
    o_v = tl.arange(0, BLOCK_V)

    # the row maximum: softmax reference and top of every search range
    b_max = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    for v0 in range(0, V, BLOCK_V):
        o = v0 + o_v
        b_max = tl.maximum(b_max, tl.max(_guided(p_x, p_c, o, o < V, scale, cfg_scale, has_cfg), 0))
    top = _ordered_key(b_max)
    ref = tl.where(b_max == float("-inf"), 0.0, b_max)  # exp(x - ref) stays finite

    # top-k: the k-th largest key, by binary search on counts (no sort)
    k_key = top * 0 - 2147483648  # below every key: keep all
    k_ties = top * 0 + V
    if use_topk != 0:
        lo, hi = k_key, top
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            if _count_above(p_x, p_c, V, scale, cfg_scale, has_cfg, mid - 1, BLOCK_V) >= top_k:
                lo = mid
            else:
                hi = mid - 1
        k_key = lo
        n_above = _count_above(p_x, p_c, V, scale, cfg_scale, has_cfg, k_key, BLOCK_V)
        k_ties = (top_k - n_above).to(tl.int64)

    # top-p over the top-k set: the largest key whose kept mass at or above reaches p
    p_key = k_key
    p_ties = top * 0 + V
    if use_topp != 0:
        target = top_p * _kept_mass_above(p_x, p_c, V, scale, cfg_scale, has_cfg, ref, k_key,
                                          k_ties, _NO_KEY, BLOCK_V)
        lo, hi = k_key, top
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            if _kept_mass_above(p_x, p_c, V, scale, cfg_scale, has_cfg, ref, k_key, k_ties,
                                mid - 1, BLOCK_V) >= target:
                lo = mid
            else:
                hi = mid - 1
        p_key = lo
        m_above = _kept_mass_above(p_x, p_c, V, scale, cfg_scale, has_cfg, ref, k_key, k_ties,
                                   p_key, BLOCK_V)
        # ties at the threshold, in index order, until the mass reaches the target
        need = (target - m_above) / tl.exp(_key_value(p_key) - ref)
        p_ties = need.to(tl.int64)
        p_ties = tl.maximum(p_ties + (p_ties.to(tl.float32) < need).to(tl.int64), 1)

    # the race over the kept tokens, and their normaliser for the drawn token's probability
    best = float("-inf")
    best_x = float("-inf")
    best_i = top * 0
    z = 0.0
    seen_k = 0
    seen_p = 0
    seed = tl.load(seed_ptr)
    for v0 in range(0, V, BLOCK_V):
        o = v0 + o_v
        m = o < V
        x, keep, seen_k, seen_p = _kept(p_x, p_c, o, m, scale, cfg_scale, has_cfg, k_key, k_ties,
                                        seen_k, use_topp, p_key, p_ties, seen_p)
        z += tl.sum(tl.where(keep, tl.exp(x - ref), 0.0), 0)
        if (has_noise != 2) | (greedy != 0):  # the race (one uniform a row: the pass below)
            if has_noise == 1:
                u = tl.load(noise_ptr + i_b * stride_n + o, mask=m, other=0.5)
            else:
                u = tl.rand(seed, i_b * V + o)
            race = tl.where(greedy != 0, x, x - tl.log(-tl.log(u)))
            race = tl.where(keep, race, float("-inf"))
            b_best = tl.max(race, 0)
            b_i = tl.argmax(race, 0)
            better = b_best > best  # strict: the first maximum wins, as torch.argmax
            best_x = tl.where(better, tl.max(tl.where(o_v == b_i, x, float("-inf")), 0),
                              best_x)
            best_i = tl.where(better, v0 + b_i, best_i)
            best = tl.where(better, b_best, best)

    # one uniform a row: the first kept token (vocabulary order) whose running mass exceeds
    # u * z; where rounding leaves none (u near 1), the last kept token
    if (has_noise == 2) & (greedy == 0):
        u_row = tl.load(noise_ptr + i_b * stride_n).to(tl.float32)
        target = tl.minimum(u_row, 1 - 2**-24) * z  # as the reference's _U_MAX
        run = 0.0
        first_i = top * 0 + V
        first_x = float("-inf")
        last_i = top * 0 - 1
        last_x = float("-inf")
        seen_k = 0
        seen_p = 0
        for v0 in range(0, V, BLOCK_V):
            o = v0 + o_v
            m = o < V
            x, keep, seen_k, seen_p = _kept(p_x, p_c, o, m, scale, cfg_scale, has_cfg, k_key,
                                            k_ties, seen_k, use_topp, p_key, p_ties, seen_p)
            w = tl.where(keep, tl.exp(x - ref), 0.0)
            c = run + tl.cumsum(w, 0)
            b_first = tl.min(tl.where((c > target) & (w > 0), o, V), 0)
            hit = (first_i == V) & (b_first < V)
            first_x = tl.where(hit, tl.max(tl.where(o == b_first, x, float("-inf")), 0), first_x)
            first_i = tl.where(hit, b_first, first_i)
            b_last = tl.max(tl.where(w > 0, o, -1), 0)
            last_x = tl.where(b_last >= 0, tl.max(tl.where(o == b_last, x, float("-inf")), 0),
                              last_x)
            last_i = tl.maximum(last_i, b_last)
            run = tl.max(tl.where(m, c, run), 0)
        best_i = tl.where(first_i < V, first_i, tl.maximum(last_i, 0))
        best_x = tl.where(first_i < V, first_x, last_x)
    tl.store(tokens_ptr + i_b, best_i)
    tl.store(probs_ptr + i_b, tl.where(z > 0, tl.exp(best_x - ref) / z, 0.0))


@triton.jit
def _lowest_k_mask_fwd_kernel(scores_ptr, k_ptr, out_ptr, L, stride_s, stride_o,
                              BLOCK_L: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    p_s = scores_ptr + i_b * stride_s
    o_l = tl.arange(0, BLOCK_L)
    k = tl.minimum(tl.maximum(tl.load(k_ptr + i_b).to(tl.int64), 0), L)
    # the smallest key with at least k keys at or below it: the k-th lowest score
    lo = k * 0 - 2147483648
    hi = k * 0 + 2147483647
    while lo < hi:
        mid = lo + (hi - lo) // 2
        n = 0
        for l0 in range(0, L, BLOCK_L):
            o = l0 + o_l
            s = tl.load(p_s + o, mask=o < L, other=float("inf")).to(tl.float32)
            s = tl.where(s == s, s, float("inf"))
            n += tl.sum(((_ordered_key(s) <= mid) & (o < L)).to(tl.int32), 0)
        if n >= k:
            hi = mid
        else:
            lo = mid + 1
    n_below = 0
    for l0 in range(0, L, BLOCK_L):
        o = l0 + o_l
        s = tl.load(p_s + o, mask=o < L, other=float("inf")).to(tl.float32)
        s = tl.where(s == s, s, float("inf"))
        n_below += tl.sum(((_ordered_key(s) < lo) & (o < L)).to(tl.int32), 0)
    # keys below the threshold, then ties at it in index order until there are k
    seen = 0
    for l0 in range(0, L, BLOCK_L):
        o = l0 + o_l
        s = tl.load(p_s + o, mask=o < L, other=float("inf")).to(tl.float32)
        s = tl.where(s == s, s, float("inf"))
        key = tl.where(o < L, _ordered_key(s), 2147483647 + 1)
        tie = (key == lo).to(tl.int32)
        rank = tl.cumsum(tie, 0) - tie + seen
        picked = (key < lo) | ((tie == 1) & (rank < k - n_below))
        seen += tl.sum(tie, 0)
        tl.store(out_ptr + i_b * stride_o + o, picked.to(tl.int8), mask=o < L)


# ----------------------------------------------------------------------------- launchers

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_V = 2048  # elements per block: 4 per thread at 16 warps (8 warps spill on sm_90)


def _block(n: int) -> int:
    return min(_BLOCK_V, max(16, triton.next_power_of_2(n)))


def sample_logits_fwd(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, cond_logits: torch.Tensor | None = None,
                      cfg_scale: float | None = None, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, need_probs: bool = True):
    """Triton sampling of logits [B, V] (rows may be strided; V contiguous).
    noise: uniform [B, V] (the race) or [B] (the inverse CDF), else Philox noise for the
    race seeded from `generator` (or torch's default generator on the logits' device).
    -> (tokens long [B], probs fp32 [B])."""
    if logits.dtype not in _TRITON_DTYPES:
        raise TypeError(f"sample_logits_fwd: logits must be one of {_TRITON_DTYPES}, "
                        f"got {logits.dtype}")
    b, v = logits.shape
    greedy = temperature == 0
    use_topk = top_k is not None and top_k < v and (need_probs or not greedy)
    use_topp = top_p is not None and top_p < 1.0 and (need_probs or not greedy)
    has_cfg = cond_logits is not None
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    probs = torch.empty(b, dtype=torch.float32, device=logits.device)
    if noise is None:
        seed = torch.randint(0, 2**31 - 1, (1,), generator=generator,
                             device=generator.device if generator is not None else logits.device)
        seed = seed.to(logits.device, non_blocking=True)
    else:
        seed = tokens  # read, never used
    if b == 0:
        return tokens, probs
    cond = cond_logits if has_cfg else logits
    noise_arg = noise if noise is not None else probs
    launch(
        _sample_logits_fwd_kernel, (b,),
        logits, cond, noise_arg, seed, tokens, probs,
        v, logits.stride(0), cond.stride(0), noise.stride(0) if noise is not None else 0,
        1.0 if greedy else 1.0 / temperature, top_k if use_topk else v,
        top_p if use_topp else 1.0, cfg_scale if has_cfg else 0.0,
        int(greedy), int(has_cfg), int(use_topk), int(use_topp),
        0 if noise is None else 1 if noise.dim() == 2 else 2,
        BLOCK_V=_block(v), num_warps=16,
        maxnreg=128)  # the 16-warp ceiling; ptxas alone budgeted 64 and spilled on sm_90
    return tokens, probs


def lowest_k_mask_fwd(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Triton: scores [B, L], k long [B] -> bool [B, L]."""
    if scores.dtype not in _TRITON_DTYPES:
        raise TypeError(f"lowest_k_mask_fwd: scores must be one of {_TRITON_DTYPES}, "
                        f"got {scores.dtype}")
    b, n = scores.shape
    out = torch.empty(b, n, dtype=torch.int8, device=scores.device)
    if b > 0 and n > 0:
        launch(_lowest_k_mask_fwd_kernel, (b,), scores, k, out, n, scores.stride(0),
               out.stride(0), BLOCK_L=_block(n), num_warps=4)
    return out.view(torch.bool)


def aot_launches():
    """Every specialisation the library launches (for t2i_kernels.aot): the switches are
    runtime values, so one sampling kernel per logits dtype, and one mask kernel."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for dtype in _TRITON_DTYPES:
        yield (f"sample {names[dtype]}",
               lambda dtype=dtype: sample_logits_fwd(torch.empty(32, 8192, dtype=dtype),
                                                     top_k=64, top_p=0.9))
        yield (f"lowest_k {names[dtype]}",
               lambda dtype=dtype: lowest_k_mask_fwd(torch.empty(32, 1024, dtype=dtype),
                                                     torch.empty(32, dtype=torch.long)))


# ----------------------------------------------------------------------------- references


def _nan_to(x: torch.Tensor, value: float) -> torch.Tensor:
    """Replace NaN only, in one pass (nan_to_num with +-inf kept as they are)."""
    inf = float("inf")
    return torch.nan_to_num(x, nan=value, posinf=inf, neginf=-inf)


def _guided_logits(logits, temperature, cond_logits, cfg_scale, clean: bool = True):
    """fp32 CFG-combined, temperature-scaled logits, NaN -> -inf (T = 0 and 1: unscaled).
    clean=False leaves NaN in place (the caller checks)."""
    x = logits.float()
    if cond_logits is not None:
        x = x + cfg_scale * (cond_logits.float() - x)
    if temperature not in (0, 1):
        x = x / temperature
    return _nan_to(x, float("-inf")) if clean and torch.isnan(x).any() else x


def filtered_probs_reference(logits, *, temperature=1.0, top_k=None, top_p=None,
                             cond_logits=None, cfg_scale=None):
    """The distribution tokens are drawn from, by sorting: [B, V] -> probs fp32 [B, V]."""
    x = _guided_logits(logits, temperature, cond_logits, cfg_scale)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices  # ties: index order
    xs = x.gather(-1, order)
    keep = torch.ones_like(xs, dtype=torch.bool)
    if top_k is not None:
        keep[:, top_k:] = False
    if top_p is not None:
        p = torch.softmax(torch.where(keep, xs, float("-inf")), dim=-1)
        keep &= (p.cumsum(-1) - p) < top_p  # the mass before a token is still short of p
    probs_sorted = torch.softmax(torch.where(keep, xs, float("-inf")), dim=-1)
    probs = torch.zeros_like(x).scatter_(-1, order, probs_sorted)
    return _nan_to(probs, 0.0)  # rows with no finite logit


_U_MAX = 1 - 2**-24  # the largest float32 below 1: u * total stays below a normal total


def _inverse_cdf(probs, u, zero_rows: bool = True):
    """The first column whose cumulative probability exceeds u * the row's total: probs
    [B, C] >= 0, u [B] uniform in [0, 1) -> long [B, 1]. A row of zeros gives column 0
    (zero_rows=False: the caller knows there is none)."""
    c = probs.cumsum(-1)  # non-decreasing: the count of columns <= the target, by bisection
    j = torch.searchsorted(c, u.float().clamp(max=_U_MAX)[:, None] * c[:, -1:], right=True)
    return torch.where(j < c.shape[-1], j, 0) if zero_rows else j


def sample_logits_reference(logits, *, temperature=1.0, top_k=None, top_p=None,
                            cond_logits=None, cfg_scale=None, noise=None, generator=None):
    """Sort-based filtering, then the race on `noise` [B, V], the inverse CDF on `noise`
    [B], or torch.multinomial. logits [B, V] -> (tokens long [B], probs fp32 [B])."""
    greedy = temperature == 0
    probs = filtered_probs_reference(logits, temperature=1.0 if greedy else temperature,
                                     top_k=top_k, top_p=top_p, cond_logits=cond_logits,
                                     cfg_scale=cfg_scale)
    if greedy:
        x = _guided_logits(logits, 1.0, cond_logits, cfg_scale)
        tokens = torch.where(probs > 0, x, float("-inf")).argmax(-1)
    elif noise is not None and noise.dim() == 1:  # one uniform a row
        tokens = _inverse_cdf(probs, noise)[:, 0]
    elif noise is not None:  # exponential race: argmax p / E with E = -log u
        tokens = (probs / -torch.log(noise.float())).argmax(-1)
    else:
        empty = probs.sum(-1, keepdim=True) == 0
        tokens = torch.multinomial(torch.where(empty, 1.0, probs), 1, generator=generator)[:, 0]
        tokens = torch.where(empty[:, 0], 0, tokens)
    return tokens, probs.gather(-1, tokens[:, None])[:, 0]


def lowest_k_mask_reference(scores, k):
    """By definition: an entry's rank is the number of entries below it plus the equal ones
    before it (NaN as +inf); the mask is rank < k. [B, L], k long [B] -> bool [B, L].
    O(L^2) memory: for tests and benchmarks."""
    s = _nan_to(scores.float(), float("inf"))
    n = s.shape[-1]
    lower = s[:, None, :] < s[:, :, None]  # [B, i, j]: j below i
    earlier = torch.ones(n, n, dtype=torch.bool, device=s.device).tril(-1)
    rank = (lower | ((s[:, None, :] == s[:, :, None]) & earlier)).sum(-1)
    return rank < k[:, None]


# ----------------------------------------------------------------------------- torch path


# logits a chunk of rows on the CPU (4 MiB of fp32): temporaries of 32 MiB and more are
# fresh mappings from the allocator every call, page-faulted in again (8M logits: 38 ms
# unchunked, 9 ms in chunks of 2**18 to 2**21, 11 ms of 2**17)
_CPU_CHUNK = 1 << 20


def sample_logits_torch(logits, *, temperature=1.0, top_k=None, top_p=None, cond_logits=None,
                        cfg_scale=None, noise=None, generator=None):
    """CPU sampling: top-k by torch.topk of k only; top-p inside the k candidates (a full
    stable sort only when there is no top-k); then the exponential race on `noise` [B, V],
    or the inverse CDF on `noise` [B] or on one uniform a row drawn from `generator` (V
    times fewer draws than the race). logits [B, V] -> (tokens long [B], probs fp32 [B]).
    On the CPU, rows go through in chunks of ~`_CPU_CHUNK` logits: every step is row-wise,
    so the draws are the same, and the temporaries stay small (MaskGIT's first step at
    batch 32 over 1,024 codes: 8M logits, 38 -> 9 ms on 2 cores)."""
    b, v = logits.shape
    rows = max(1, _CPU_CHUNK // v)
    if logits.device.type != "cpu" or b <= rows:
        return _sample_rows(logits, temperature, top_k, top_p, cond_logits, cfg_scale, noise,
                            generator)
    if noise is None and temperature != 0:  # the one uniform a row, drawn as unchunked
        noise = torch.rand(b, generator=generator, device=logits.device)
    out = [_sample_rows(logits[i:i + rows], temperature, top_k, top_p,
                        None if cond_logits is None else cond_logits[i:i + rows], cfg_scale,
                        None if noise is None else noise[i:i + rows], None)
           for i in range(0, b, rows)]
    return torch.cat([t for t, _ in out]), torch.cat([p for _, p in out])


def _sample_rows(logits, temperature, top_k, top_p, cond_logits, cfg_scale, noise, generator):
    """`sample_logits_torch` on one chunk of rows."""
    greedy = temperature == 0
    by_row = not greedy and (noise is None or noise.dim() == 1)  # the inverse CDF
    x = _guided_logits(logits, temperature, cond_logits, cfg_scale, clean=False)
    # one reduction tells the common case (every row's maximum finite: no NaN, no +inf, no
    # empty row) from the rest, which takes the careful path below
    plain = math.isfinite(x.amax(-1).sum().item())  # (or an overflow: careful path too)
    if not plain:
        x = _nan_to(x, float("-inf"))
    b, v = x.shape
    lse = None  # log-normaliser of the distribution top-p acts on; None: the candidates'
    if top_k is not None and top_k < v:
        values, cand = torch.topk(x, top_k, dim=-1, sorted=False)
        threshold = values.amin(-1, keepdim=True)
        if not bool(((x >= threshold).sum(-1) == top_k).all()):
            # equal values straddle the threshold: keep the lowest indices among them
            above, tie = x > threshold, x == threshold
            need = top_k - above.sum(-1, keepdim=True)
            keep = above | (tie & (tie.cumsum(-1) - tie.long() < need))
            cand = keep.nonzero()[:, 1].view(b, top_k)
    elif top_p is not None and top_p < 1.0:
        # the nucleus of a peaked distribution is small: grow a top set until the mass
        # strictly above its last value reaches p (then ties there cannot matter)
        lse = torch.logsumexp(x, -1, keepdim=True)
        n = min(v, 256)
        while True:
            values, cand = torch.topk(x, n, dim=-1, sorted=False)
            last = values.amin(-1, keepdim=True)
            mass = torch.where(values > last, torch.exp(values - lse), 0.0).sum(-1)
            if n == v or bool((mass >= top_p).all()):
                break
            n = min(v, 4 * n)
    else:
        cand = None
    top_p_on = top_p is not None and top_p < 1.0
    if cand is not None:  # candidates in index order; for top-p or the race, in (value
        cand = cand.sort(-1).values  # desc, index asc) order
        if top_p_on or not by_row:
            cand = cand.gather(-1, torch.sort(x.gather(-1, cand), dim=-1, descending=True,
                                              stable=True).indices)
    xc = x if cand is None else x.gather(-1, cand)  # [B, C]
    if top_p_on:
        p = torch.exp(xc - (torch.logsumexp(xc, -1, keepdim=True) if lse is None else lse))
        xc = torch.where((p.cumsum(-1) - p) < top_p, xc, float("-inf"))
    probs = torch.softmax(xc, -1)  # NaN only in rows with no finite logit (or a +inf one)
    if by_row:
        u = torch.rand(b, generator=generator, device=x.device) if noise is None else noise
        if not plain:
            probs = _nan_to(probs, 0.0)
        if top_p_on and cand is not None:  # value-ordered candidates: the CDF runs in
            order = cand.argsort(-1)  # vocabulary order
            j = order.gather(-1, _inverse_cdf(probs.gather(-1, order), u, not plain))
        else:
            j = _inverse_cdf(probs, u, not plain)
        tokens = j[:, 0] if cand is None else cand.gather(-1, j)[:, 0]
        return tokens, probs.gather(-1, j)[:, 0]
    if greedy or not plain:
        if greedy:
            race = xc
        else:
            race = xc - torch.log(-torch.log(_race_noise(xc, cand, noise)))
        race = _nan_to(race, float("-inf"))
        j = race.argmax(-1, keepdim=True)
        kept = race > float("-inf")
    else:
        # the race on probabilities, as the reference: argmax p / -log u, i.e. the argmin
        # of p / log u (<= 0): one logarithm a token instead of two, and no second pass
        # for the probabilities
        race = probs / torch.log(_race_noise(xc, cand, noise))
        j = race.argmin(-1, keepdim=True)
        kept = None
    if cand is not None:  # the first winner in vocabulary order, as the other backends
        tied = (race == race.gather(-1, j)) & (probs > 0 if kept is None else kept)
        j = torch.where(tied, cand, v).argmin(-1, keepdim=True)
        tokens = cand.gather(-1, j)[:, 0]
    else:
        tokens = j[:, 0]
    return tokens, _nan_to(probs.gather(-1, j)[:, 0], 0.0)


def _race_noise(xc, cand, noise):
    """The race's uniform noise [B, V] at the candidates `cand` (None: the whole row)."""
    return noise.float() if cand is None else noise.float().gather(-1, cand)


def lowest_k_mask_torch(scores, k):
    """CPU: one stable sort per row (L is a token map: a sort beat topk with tie
    bookkeeping on every measured size); k an int: its first k entries, else (k long [B])
    the inverse permutation's ranks."""
    s = _nan_to(scores.float(), float("inf"))
    order = torch.sort(s, dim=-1, stable=True).indices
    if isinstance(k, int):
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order[:, :k], True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return rank < k[:, None]


# ----------------------------------------------------------------------------- public API


def _check_sampling(logits, temperature, top_k, top_p, cond_logits, cfg_scale, noise):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("sample_logits: logits must be a floating-point tensor")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"sample_logits: logits must be [..., V] with V >= 1, got "
                         f"{tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"sample_logits: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"sample_logits: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample_logits: top_p must be in (0, 1], got {top_p}")
    if (cond_logits is None) != (cfg_scale is None):
        raise ValueError("sample_logits: classifier-free guidance needs both cond_logits and "
                         "cfg_scale")
    if cond_logits is not None and (cond_logits.shape != logits.shape
                                    or cond_logits.device != logits.device):
        raise ValueError(f"sample_logits: cond_logits must match logits' shape and device, "
                         f"got {tuple(cond_logits.shape)} on {cond_logits.device}")
    if noise is not None and (noise.shape not in (logits.shape, logits.shape[:-1])
                              or noise.device != logits.device):
        raise ValueError(f"sample_logits: noise must be on logits' device, of logits' shape "
                         f"{tuple(logits.shape)} (one uniform a token) or "
                         f"{tuple(logits.shape[:-1])} (one a row), got {tuple(noise.shape)} "
                         f"on {noise.device}")


def sample_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, cond_logits: torch.Tensor | None = None,
                  cfg_scale: float | None = None, generator: torch.Generator | None = None,
                  return_probs: bool = False, noise: torch.Tensor | None = None):
    """Draw one token per row of logits [..., V], in one pass per filter, with no sort.

    With cond_logits and cfg_scale, logits (the unconditional ones) are first combined as
    uncond + cfg_scale * (cond - uncond). temperature = 0 is greedy. top_k and top_p may be
    combined (top-p then acts on the top-k distribution). `generator` makes draws
    reproducible on one backend; `noise` (uniform [0, 1)) fixes them across backends: of
    logits' shape, one a token for the exponential race; of logits.shape[:-1], one a row for
    the inverse CDF (V times fewer draws to make; the torch path draws that way from
    `generator` too). Returns tokens long [...], and with return_probs=True also the drawn tokens'
    probabilities fp32 [...] (MaskGIT's confidence). No host synchronisation on GPU.

    >>> tokens = sample_logits(torch.randn(4, 1024), temperature=0.8, top_k=64, top_p=0.9)
    """
    _check_sampling(logits, temperature, top_k, top_p, cond_logits, cfg_scale, noise)
    lead, v = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, v)
    cond = cond_logits.reshape(-1, v) if cond_logits is not None else None
    nz = None if noise is None else \
        noise.reshape(-1, v) if noise.shape == logits.shape else noise.reshape(-1)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, cond_logits=cond,
                  cfg_scale=cfg_scale, noise=nz, generator=generator)
    backend = choose_backend(logits)
    if backend == "triton":
        tokens, probs = sample_logits_fwd(flat, need_probs=return_probs, **kwargs)
    elif backend == "torch":
        tokens, probs = sample_logits_torch(flat, **kwargs)
    else:
        tokens, probs = sample_logits_reference(flat, **kwargs)
    tokens = tokens.view(lead)
    return (tokens, probs.view(lead)) if return_probs else tokens


def lowest_k_mask(scores: torch.Tensor, k) -> torch.Tensor:
    """True at the k lowest scores of each row (MaskGIT / Muse: re-mask the least confident).

    scores [B, L] float; k: int, or long [B] (clamped to [0, L]). Ties are broken in index
    order; NaN counts as +inf. -> bool [B, L] with exactly min(k, L) True per row.

    >>> mask = lowest_k_mask(torch.rand(2, 256), torch.tensor([64, 10]))
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError("lowest_k_mask: scores must be a float tensor [B, L]")
    backend = choose_backend(scores)
    if isinstance(k, int):
        if k < 0:
            raise ValueError(f"lowest_k_mask: k must be >= 0, got {k}")
        if backend == "torch":  # one k for every row: no per-row ranks
            return lowest_k_mask_torch(scores, k)
        k = torch.full((scores.shape[0],), k, dtype=torch.long, device=scores.device)
    if k.shape != (scores.shape[0],) or k.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lowest_k_mask: k must be an int or a long tensor [B={scores.shape[0]}],"
                         f" got {k.dtype} {tuple(k.shape)}")
    if k.device != scores.device:
        raise ValueError(f"lowest_k_mask: k is on {k.device}, scores on {scores.device}")
    k = k.long()
    if backend == "triton":
        return lowest_k_mask_fwd(scores, k)
    if backend == "torch":
        return lowest_k_mask_torch(scores, k)
    return lowest_k_mask_reference(scores, k)
