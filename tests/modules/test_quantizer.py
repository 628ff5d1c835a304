import pytest
import torch

from t2i.modules import QuantizerConfig, VectorQuantizer


def _clusters(n=4096, k=16, d=8, spread=0.05, seed=0):
    """n points around k well-separated centres -> (points [n, d], centres [k, d])."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, d, generator=g), centres


def _error(vq, x):
    vq.eval()
    out = vq(x)
    return (out.quantized - x).pow(2).sum(-1).mean().item(), out


def test_shapes_and_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(num_codes=32, dim=8, kmeans_init=False))
    z = torch.randn(2, 5, 7, 8, requires_grad=True)
    codebook = vq.codebook.clone()  # training updates it after the lookup
    out = vq(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 5, 7)
    # z + (code - z).detach() is the code up to one rounding
    torch.testing.assert_close(out.quantized, codebook[out.indices], rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(z)
    (out.quantized * grad).sum().backward()
    # the commitment loss was not part of this sum: z gets exactly the incoming gradient
    assert torch.equal(z.grad, grad)


def test_channel_first_inputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(QuantizerConfig(num_codes=16, dim=4, channel_first=True,
                                         kmeans_init=False))
    z = torch.randn(3, 4, 5, 6)
    vq.eval()
    out = vq(z)
    assert out.quantized.shape == (3, 4, 5, 6) and out.indices.shape == (3, 5, 6)
    torch.testing.assert_close(out.quantized, vq.embed(out.indices), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dim=4"):
        vq(torch.randn(3, 5, 5, 6))


def test_kmeans_init_finds_the_clusters():
    x, _ = _clusters(k=8)
    vq = VectorQuantizer(QuantizerConfig(num_codes=16, dim=8, dead_threshold=0))
    before, _ = _error(vq, x)
    vq.train()
    vq(x)  # first training batch: k-means init
    after, out = _error(vq, x)
    assert bool(vq.initialized) and after < 0.02 * before
    assert out.usage.item() == 1.0  # no centre is left without vectors


def test_ema_codebook_follows_the_data():
    x, _ = _clusters()
    vq = VectorQuantizer(QuantizerConfig(num_codes=16, dim=8, kmeans_init=False, decay=0.8,
                                         dead_threshold=0))
    before, _ = _error(vq, x)
    vq.train()
    for batch in x.split(512):
        vq(batch)
    after, _ = _error(vq, x)
    assert after < 0.5 * before


def test_learned_codebook_is_trained_by_its_loss():
    x, centres = _clusters()
    vq = VectorQuantizer(QuantizerConfig(num_codes=16, dim=8, ema=False, kmeans_init=False,
                                         dead_threshold=0))
    with torch.no_grad():  # each code starts near its own cluster, but off it
        vq.codebook.copy_(centres + 0.7 * torch.randn(16, 8))
    opt = torch.optim.Adam(vq.parameters(), lr=0.05)
    before, _ = _error(vq, x)
    vq.train()
    for _ in range(3):
        for batch in x.split(512):
            out = vq(batch)
            opt.zero_grad()
            out.loss.backward()
            assert vq.codebook.grad.abs().sum() > 0
            opt.step()
    after, _ = _error(vq, x)
    assert after < 0.1 * before


def test_dead_codes_restart_from_recent_inputs():
    x, _ = _clusters(k=4)
    vq = VectorQuantizer(QuantizerConfig(num_codes=16, dim=8, kmeans_init=False,
                                         dead_threshold=0.5, decay=0.5))
    with torch.no_grad():
        vq.codebook.copy_(torch.full((16, 8), 100.0))  # far from everything
        vq.codebook[0] = x[0]
    vq.train()
    for batch in x.split(512)[:3]:
        vq(batch)
    # every code now sits at (or, after EMA, near) an input vector, none is left at 100
    assert (vq.codebook.abs() < 50).all()
    _, out = _error(vq, x)
    assert out.usage.item() >= 0.25


def test_eval_mode_changes_nothing():
    vq = VectorQuantizer(QuantizerConfig(num_codes=16, dim=8))
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(torch.randn(100, 8))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())


def test_cosine_codes_stay_on_the_sphere():
    x, _ = _clusters()
    vq = VectorQuantizer(QuantizerConfig(num_codes=16, dim=8, metric="cosine"))
    vq.train()
    out = vq(x[:512])
    assert torch.allclose(vq.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(512), atol=1e-5)


def test_state_dict_round_trip_keeps_the_codebook_and_init_flag():
    vq = VectorQuantizer(QuantizerConfig(num_codes=16, dim=8))
    vq.train()
    vq(torch.randn(256, 8))
    other = VectorQuantizer(QuantizerConfig(num_codes=16, dim=8))
    other.load_state_dict(vq.state_dict())
    assert bool(other.initialized) and torch.equal(other.codebook, vq.codebook)


def test_bad_metric():
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(QuantizerConfig(metric="dot"))
