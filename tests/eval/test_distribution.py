import numpy as np
import pytest
import torch

from t2i.eval.distribution import frechet_distance, precision_recall

scipy_linalg = pytest.importorskip("scipy.linalg")


def _scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy_linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


@pytest.mark.parametrize("n, m, d", [(200, 300, 4), (500, 400, 16), (64, 80, 32)],
                         ids=["N200-M300-D4", "N500-M400-D16", "N64-M80-D32"])
def test_frechet_distance_matches_scipy(n, m, d):
    g = torch.Generator().manual_seed(n + d)
    real = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)
    fake = torch.randn(m, d, generator=g) * 1.5 + 0.3
    expected = _scipy_fd(real.double().numpy(), fake.double().numpy())
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    x = torch.randn(300, 8)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)


def test_precision_and_recall_see_mode_dropping_and_outliers():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 2, generator=g)
    same = torch.randn(400, 2, generator=g)
    pr = precision_recall(real, same)
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9
    collapsed = torch.randn(400, 2, generator=g) * 0.05  # one mode: precise, no recall
    pr = precision_recall(real, collapsed)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.3
    far = torch.randn(400, 2, generator=g) + 10.0  # elsewhere: neither
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}


@pytest.mark.parametrize("real, fake, message", [
    (torch.randn(10, 4), torch.randn(10, 5), "feature sizes differ"),
    (torch.randn(1, 4), torch.randn(10, 4), "at least 2 vectors"),
    (torch.randn(0, 4), torch.randn(10, 4), "at least 2 vectors"),
    (torch.randn(10, 4, 1), torch.randn(10, 4), r"must be \[N, D\]"),
])
def test_bad_inputs_give_clear_errors(real, fake, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(real, fake)
