"""Token sampling and re-masking: Triton (interpreter) and torch path against the references.

Draws are compared token for token by passing the same uniform noise to every backend, of
both kinds (one a token: the race; one a row: the inverse CDF); the distribution itself is
checked separately with a chi-square test.
"""

import pytest
import torch

from t2i_kernels import lowest_k_mask, sample_logits, sampling
from t2i_kernels.sampling import (
    filtered_probs_reference,
    lowest_k_mask_fwd,
    lowest_k_mask_reference,
    lowest_k_mask_torch,
    sample_logits_fwd,
    sample_logits_reference,
    sample_logits_torch,
)


def _logits(b, v, seed=0, special=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, generator=g) * 2
    if special and b >= 3 and v >= 4:
        x[1, v // 2:] = float("-inf")  # a masked vocabulary tail
        x[2, : v // 2] = 1.25  # many ties, straddling thresholds
    return x, torch.rand(b, v, generator=g)


# (V, top_k, top_p, temperature, cfg): every V, k in {1, 5, >= V}, p in {0.5, 0.9, 1.0},
# greedy and not, CFG on and off
CASES = [
    (1, None, None, 1.0, False), (1, 5, 0.5, 0.0, True), (7, 1, None, 1.0, False),
    (7, 5, 0.9, 0.7, True), (7, 7, 1.0, 0.0, False), (7, 9, 0.5, 1.0, False),
    (1000, 5, None, 1.0, False), (1000, None, 0.5, 1.0, True), (1000, 5, 0.9, 0.0, False),
    (1000, 1000, 0.9, 1.3, False), (1000, 1, 1.0, 1.0, True), (1000, None, None, 0.0, True),
    (8192, 5, 0.9, 1.0, True), (8192, None, 0.5, 0.8, False), (8192, 8192, None, 1.0, False),
]
IDS = [f"V{v}-k{k}-p{p}-T{t}{'-cfg' if c else ''}" for v, k, p, t, c in CASES]


def _kwargs(v, top_k, top_p, temperature, cfg, b=4, per_row=False):
    x, u = _logits(b, v)
    if per_row:  # one uniform a row, spread over [0, 1) (its first column: 4 draws only)
        u = (torch.arange(b) + u[:, 0]) / b
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    if cfg:
        kw.update(cond_logits=_logits(b, v, seed=1, special=False)[0], cfg_scale=2.5)
    return x, u, kw


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on -inf
@pytest.mark.parametrize("per_row", [False, True], ids=["race", "per-row"])
@pytest.mark.parametrize("v, top_k, top_p, temperature, cfg", CASES, ids=IDS)
def test_triton_draws_equal_the_reference(v, top_k, top_p, temperature, cfg, per_row):
    x, u, kw = _kwargs(v, top_k, top_p, temperature, cfg, per_row=per_row)
    tokens, probs = sample_logits_fwd(x, noise=u, **kw)
    ref_tokens, ref_probs = sample_logits_reference(x, noise=u, **kw)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_row", [False, True], ids=["race", "per-row"])
@pytest.mark.parametrize("v, top_k, top_p, temperature, cfg", CASES, ids=IDS)
def test_torch_path_draws_equal_the_reference(v, top_k, top_p, temperature, cfg, per_row):
    x, u, kw = _kwargs(v, top_k, top_p, temperature, cfg, b=16, per_row=per_row)
    tokens, probs = sample_logits_torch(x, noise=u, **kw)
    ref_tokens, ref_probs = sample_logits_reference(x, noise=u, **kw)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_row", [False, True], ids=["race", "per-row"])
@pytest.mark.parametrize("v, top_k, top_p, temperature, cfg", CASES, ids=IDS)
def test_torch_path_in_row_chunks_draws_the_same(monkeypatch, v, top_k, top_p, temperature,
                                                 cfg, per_row):
    # large inputs go through the CPU path in chunks of rows: 3 rows a chunk here (the
    # last one short), given noise and noise drawn from a generator
    x, u, kw = _kwargs(v, top_k, top_p, temperature, cfg, b=16, per_row=per_row)
    whole = sample_logits_torch(x, noise=u, **kw)
    drawn = sample_logits_torch(x, generator=torch.Generator().manual_seed(5), **kw)
    monkeypatch.setattr(sampling, "_CPU_CHUNK", 3 * v)
    for a, b in [(whole, sample_logits_torch(x, noise=u, **kw)),
                 (drawn, sample_logits_torch(x, generator=torch.Generator().manual_seed(5),
                                             **kw))]:
        assert torch.equal(a[0], b[0])
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert torch.equal(whole[0], sample_logits_reference(x, noise=u, **kw)[0])


@pytest.mark.parametrize("per_row", [False, True], ids=["race", "per-row"])
@pytest.mark.parametrize("top_k", [None, 4])
def test_torch_path_rows_without_a_finite_logit_match_the_reference(top_k, per_row):
    # such rows send the whole call down the careful path: every row must still match
    x, u = _logits(6, 30, special=False)
    u = u[:, 0] if per_row else u
    x[1] = float("-inf")
    x[3, ::3] = float("nan")
    x[4] = float("nan")
    tokens, probs = sample_logits_torch(x, noise=u, top_k=top_k)
    ref_tokens, ref_probs = sample_logits_reference(x, noise=u, top_k=top_k)
    assert torch.equal(tokens, ref_tokens) and tokens[1] == 0 and tokens[4] == 0
    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
    assert probs[1] == 0 and probs[4] == 0 and (probs[[0, 2, 3, 5]] > 0).all()


def test_per_row_noise_walks_the_cdf_in_vocabulary_order():
    # kept tokens 1, 3, 4 (top-k 3) with probabilities 0.5, 0.2, 0.3 in vocabulary order:
    # u below 0.5 draws 1, in [0.5, 0.7) draws 3, from 0.7 on (to just below 1) draws 4
    probs = torch.tensor([0.01, 0.5, 0.005, 0.2, 0.3])
    x = probs.log().expand(7, 5)
    u = torch.tensor([0.0, 0.49, 0.51, 0.69, 0.71, 0.99, 1 - 2**-24])
    want = torch.tensor([1, 1, 3, 3, 4, 4, 4])
    kept = probs[[1, 3, 4]] / probs[[1, 3, 4]].sum()
    for fn in (sample_logits_torch, sample_logits_reference):
        tokens, p = fn(x, top_k=3, noise=u * kept.sum())
        assert torch.equal(tokens, want), fn.__name__
        torch.testing.assert_close(p, probs[want] / probs[[1, 3, 4]].sum())


@pytest.mark.interpreter
def test_triton_per_row_noise_near_one_draws_the_last_kept_token():
    x = torch.tensor([[0.0, 1.0, -1.0, 0.5, float("-inf")]]).expand(3, 5).contiguous()
    u = torch.tensor([0.0, 0.999999, 1 - 2**-24])
    tokens, probs = sample_logits_fwd(x, noise=u, top_k=3)
    assert torch.equal(tokens, torch.tensor([0, 3, 3]))
    assert torch.equal(tokens, sample_logits_reference(x, noise=u, top_k=3)[0])
    assert (probs > 0).all()


@pytest.mark.interpreter
def test_triton_half_precision_logits():
    x, u = _logits(3, 500, special=False)
    tokens, _ = sample_logits_fwd(x.half(), noise=u, top_k=20, top_p=0.8)
    assert torch.equal(tokens, sample_logits_reference(x.half(), noise=u, top_k=20, top_p=0.8)[0])


@pytest.mark.interpreter
def test_triton_philox_draws_are_seeded_and_follow_the_filters():
    x, _ = _logits(12, 300, special=False)
    draw = [sample_logits_fwd(x, top_k=10, generator=torch.Generator().manual_seed(s))[0]
            for s in (7, 7, 8)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    allowed = torch.topk(x, 10, dim=-1).indices
    assert (allowed == draw[0][:, None]).any(-1).all()


@pytest.mark.parametrize("kw", [dict(temperature=0.9, top_k=20, top_p=0.95),
                                dict(top_k=20), dict(temperature=1.3)],
                         ids=["top-k-top-p", "top-k", "plain"])
def test_the_torch_path_samples_the_filtered_distribution(kw):
    """Chi-square over 40,000 draws of one row (fixed seed): the empirical histogram of the
    torch path (the inverse CDF on its own uniforms) matches the reference's filtered
    softmax."""
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 50, generator=g) * 1.5
    expected = filtered_probs_reference(row, **kw)[0]
    n = 40_000
    tokens = sample_logits(row.expand(n, 50), generator=torch.Generator().manual_seed(1), **kw)
    counts = torch.bincount(tokens, minlength=50).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0  # nothing outside the filtered set
    chi2 = ((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum()
    dof = kept.sum().item() - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2.0), chi2 / 2).item()
    assert p_value > 1e-3, f"chi2={chi2:.1f} dof={dof} p={p_value:.2e}"


def test_seeded_draws_are_reproducible_and_probs_are_returned():
    x, _ = _logits(32, 200, special=False)
    a, pa = sample_logits(x, top_k=20, generator=torch.Generator().manual_seed(3),
                          return_probs=True)
    b, pb = sample_logits(x, top_k=20, generator=torch.Generator().manual_seed(3),
                          return_probs=True)
    assert torch.equal(a, b) and torch.equal(pa, pb) and ((pa > 0) & (pa <= 1)).all()


def test_cfg_with_scale_zero_is_the_unconditional_draw():
    x, u = _logits(8, 100, special=False)
    cond, _ = _logits(8, 100, seed=5, special=False)
    assert torch.equal(sample_logits(x, cond_logits=cond, cfg_scale=0.0, noise=u),
                       sample_logits(x, noise=u))
    assert torch.equal(sample_logits(x, cond_logits=cond, cfg_scale=1.0, noise=u),
                       sample_logits(cond, noise=u))


def test_leading_dims_and_backends_agree(monkeypatch):
    x, u = _logits(6, 64, special=False)
    out = {}
    for backend in ("torch", "reference"):
        monkeypatch.setenv("T2I_KERNEL_BACKEND", backend)
        out[backend] = sample_logits(x.view(2, 3, 64), noise=u.view(2, 3, 64), top_k=8,
                                     return_probs=True)
    assert out["torch"][0].shape == (2, 3) and torch.equal(out["torch"][0], out["reference"][0])


def test_nan_logits_are_never_drawn():
    x, u = _logits(4, 30, special=False)
    x[:, ::2] = float("nan")
    tokens = sample_logits(x, noise=u)
    assert (tokens % 2 == 1).all()
    x[:] = float("nan")
    tokens, probs = sample_logits(x, noise=u, return_probs=True)
    assert (tokens == 0).all() and (probs == 0).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(cfg_scale=2.0), "needs both"),
    (dict(cond_logits=torch.zeros(2, 5), cfg_scale=1.0), "cond_logits must match"),
    (dict(noise=torch.zeros(2, 1)), "noise must be"),
    (dict(noise=torch.zeros(4)), "noise must be"),
])
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_logits(torch.zeros(2, 4), **kwargs)
    with pytest.raises(ValueError, match="V >= 1"):
        sample_logits(torch.zeros(2, 0))
    with pytest.raises(TypeError, match="floating-point"):
        sample_logits(torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- lowest_k_mask


def _scores(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(b, n, generator=g)
    if b >= 3 and n >= 4:
        s[1, : n // 2] = 0.25  # ties
        s[2, 1] = float("nan")
    return s


MASK_CASES = [(1, torch.tensor([1])), (7, torch.tensor([0, 3, 7, 2])),
              (256, torch.tensor([64, 128, 200, 256])), (1000, torch.tensor([999, 1, 500, 10]))]


@pytest.mark.interpreter
@pytest.mark.parametrize("n, k", MASK_CASES, ids=[f"L{n}" for n, _ in MASK_CASES])
def test_triton_lowest_k_mask_matches_reference(n, k):
    s = _scores(len(k), n)
    mask = lowest_k_mask_fwd(s, k)
    assert torch.equal(mask, lowest_k_mask_reference(s, k))
    assert torch.equal(mask.sum(1), k.clamp(max=n))


@pytest.mark.parametrize("n, k", MASK_CASES, ids=[f"L{n}" for n, _ in MASK_CASES])
def test_torch_lowest_k_mask_matches_reference(n, k):
    s = _scores(len(k), n)
    assert torch.equal(lowest_k_mask_torch(s, k), lowest_k_mask_reference(s, k))
    for same in (0, 1, n // 2, n, n + 3):  # one int k for every row: its own path
        want = lowest_k_mask_reference(s, torch.full((len(k),), same))
        assert torch.equal(lowest_k_mask_torch(s, same), want)


def test_lowest_k_mask_ties_pick_the_lowest_indices():
    s = torch.tensor([[0.5, 0.1, 0.5, 0.5, 0.9]])
    assert lowest_k_mask(s, 3).tolist() == [[True, True, True, False, False]]
    assert lowest_k_mask(s, 0).sum() == 0 and lowest_k_mask(s, 9).all()


def test_lowest_k_mask_bad_input():
    with pytest.raises(ValueError, match="k must be >= 0"):
        lowest_k_mask(torch.rand(2, 5), -1)
    with pytest.raises(ValueError, match="long tensor"):
        lowest_k_mask(torch.rand(2, 5), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        lowest_k_mask(torch.rand(5), 1)
