import pytest
import torch

from t2i.modules import (
    Attention,
    KVCache,
    LearnedPositions,
    RotaryEmbedding,
    TransformerBlock,
    grid_positions,
)


def _x(b=2, n=12, dim=32, seed=0):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(32, 4, rotary=True).eval()


def test_causal_outputs_do_not_see_the_future(attn):
    x = _x()
    y = attn(x, causal=True)
    x2 = x.clone()
    x2[:, 7:] += 1.0
    y2 = attn(x2, causal=True)
    assert torch.allclose(y[:, :7], y2[:, :7], atol=1e-6) and not torch.allclose(y[:, 7:],
                                                                                   y2[:, 7:])


def test_prefix_attends_bidirectionally_and_ignores_the_rest(attn):
    x = _x()
    y = attn(x, prefix_len=5)
    x2 = x.clone()
    x2[:, 3] += 1.0  # a prefix token: earlier prefix positions see it
    assert not torch.allclose(attn(x2, prefix_len=5)[:, :3], y[:, :3])
    x3 = x.clone()
    x3[:, 9] += 1.0  # an image token: no prefix position sees it
    assert torch.allclose(attn(x3, prefix_len=5)[:, :5], y[:, :5], atol=1e-6)


def test_kv_cache_decoding_equals_the_full_causal_pass(attn):
    x = _x(n=10)
    full = attn(x, causal=True)
    cache = KVCache(2, 4, 16, 8)
    steps = [attn(x[:, :4], causal=True, cache=cache)]  # a prompt, then one token at a time
    steps += [attn(x[:, t:t + 1], causal=True, cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        KVCache(1, 1, 2, 4).append(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum().item()

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(15)


def test_cross_attention_ignores_padded_context():
    torch.manual_seed(0)
    cross = Attention(32, 4, context_dim=24).eval()
    x, context = _x(n=6), torch.randn(2, 9, 24)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    y = cross(x, context, key_padding_mask=mask)
    context[:, 6:] = 100.0
    assert torch.allclose(cross(x, context, key_padding_mask=mask), y, atol=1e-6)
    with pytest.raises(ValueError, match="needs a context"):
        cross(x)


def test_transformer_block_trains():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, rotary=True, context_dim=24, dropout=0.1)
    x, context = _x(), torch.randn(2, 5, 24)
    target = torch.randn(2, 12, 32)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (block(x, context=context, prefix_len=4) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)


def test_learned_positions():
    pos = LearnedPositions(16, 32)
    x = torch.zeros(1, 4, 32)
    assert torch.equal(pos(x, offset=2), pos.embedding[2:6][None])
    with pytest.raises(ValueError, match="exceed"):
        pos(torch.zeros(1, 20, 32))


def test_grid_positions_start_from_the_grids_geometry():
    pos = grid_positions(8, 32).view(8, 8, 32)  # [y, x, channels]
    # the first half of the channels depends on x alone, the second on y alone
    assert torch.allclose(pos[:, :, :16], pos[:1, :, :16].expand(8, 8, 16))
    assert torch.allclose(pos[:, :, 16:], pos[:, :1, 16:].expand(8, 8, 16))
    # along a row and down a column, the positions 1 and 2 away are more alike than any
    # farther one (the higher frequencies repeat, so it is not monotonic all the way)
    for line in (pos[3], pos[:, 5]):
        sims = torch.nn.functional.cosine_similarity(line[:1], line, dim=-1)
        assert sims[1] > sims[2] > sims[3:].max(), sims
    learned = LearnedPositions(16, 32, grid=4)
    assert torch.equal(learned.embedding.detach(), grid_positions(4, 32))
    with pytest.raises(ValueError, match="grid"):
        LearnedPositions(15, 32, grid=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_positions(4, 30)


def test_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, 4)
