"""SSIM against a direct computation, and the FID / IS path with a randomly initialised
Inception-v3 stand-in (no pretrained weights exist on these machines)."""

import math

import pytest
import torch

from t2i.eval.distribution import frechet_distance
from t2i.eval.inception import InceptionV3, fid, inception_outputs, inception_score, load_inception
from t2i.eval.metrics import ssim


def _ssim_direct(a, b, window=11, sigma=1.5):
    """Wang et al.'s formula, one window position at a time (float64, [0, 1] images)."""
    a, b = (a.double() + 1) / 2, (b.double() + 1) / 2
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-x * x / (2 * sigma ** 2))
    w = torch.outer(g, g) / g.sum() ** 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - window + 1):
            for j in range(a.shape[2] - window + 1):
                pa, pb = a[c, i:i + window, j:j + window], b[c, i:i + window, j:j + window]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
                cov = (w * pa * pb).sum() - ma * mb
                values.append(((2 * ma * mb + c1) * (2 * cov + c2))
                              / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(torch.stack(values).mean())


def test_ssim_matches_the_formula_and_orders_by_damage():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 14, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    got = ssim(a, b)
    for k in range(2):
        assert got[k].item() == pytest.approx(_ssim_direct(a[k], b[k]), abs=1e-5)
    assert torch.allclose(ssim(a, a), torch.ones(2))
    worse = (a + 0.6 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert (ssim(a, worse) < got).all()
    assert ssim(a[:, :, :6, :6], b[:, :, :6, :6]).shape == (2,)  # smaller than the window
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, b[:, :, :8])


def test_the_network_has_inception_v3s_exact_parameter_count():
    # torchvision's inception_v3 (aux classifier included) has 27,161,264 parameters; its
    # auxiliary classifier 3,326,696, and the FID graph's fc has 1008 outputs, not 1000
    net = InceptionV3(num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696
    net = InceptionV3()
    assert net.fc.out_features == 1008


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A RANDOMLY INITIALISED Inception-v3 at 1/8 of the width, saved as a state dict: it
    exercises loading, resizing and the arithmetic of FID and IS, and means nothing as a
    score. (The full width costs a minute per few dozen images on 2 cores.)"""
    torch.manual_seed(0)
    net = InceptionV3(width=1 / 8)
    for m in net.modules():  # non-trivial running statistics so eval-mode BN does something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    state = net.state_dict()
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 96)  # torchvision files carry these
    torch.save(state, path)
    return str(path)


def test_fid_and_is_through_a_random_stand_in(stand_in):
    with pytest.warns(UserWarning, match="not the FID graph"):
        net = load_inception(stand_in)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    fake = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    feats, logits = inception_outputs(net, torch.cat([real, fake]), batch_size=4)
    assert feats.shape == (12, 256) and logits.shape == (12, 1008)
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLU outputs
    # every input is resized to 299 first: a picture at twice the size scores alike
    big, _ = inception_outputs(net, torch.nn.functional.interpolate(real, scale_factor=2,
                                                                     mode="nearest"))
    assert torch.allclose(big, feats[:6], rtol=0.2, atol=1e-3)
    assert fid(net, real, real) == pytest.approx(0.0, abs=1e-6)
    value = fid(net, fake, real)
    assert value > 0 and value == pytest.approx(frechet_distance(feats[:6], feats[6:]))
    mean, std = inception_score(logits, splits=2)
    assert 1.0 - 1e-9 <= mean <= 1008 and std >= 0


def test_inception_score_is_one_for_one_class_and_the_class_count_for_uniform_confident():
    same = torch.zeros(20, 10)
    same[:, 3] = 50
    assert inception_score(same, splits=2)[0] == pytest.approx(1.0, abs=1e-6)
    spread = torch.full((20, 10), -50.0)
    spread[torch.arange(20), torch.arange(20) % 10] = 50
    mean, std = inception_score(spread, splits=2)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(mean)
    with pytest.raises(ValueError, match="splits"):
        inception_score(spread[:3], splits=10)


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_inception(str(tmp_path / "nope.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an Inception-v3"):
        load_inception(str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="images"):
        inception_outputs(InceptionV3(), torch.zeros(0, 3, 8, 8))
