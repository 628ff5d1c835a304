"""Distribution metrics on feature vectors: Fréchet distance, precision and recall.

The features come from a network: the project's attribute probe (FD-probe), or
Inception-v3's pool features when the user has its weights (FID). Both functions take
[N, D] feature matrices of the real and the generated set.
"""

import torch


def _check(real: torch.Tensor, fake: torch.Tensor, minimum: int) -> None:
    for name, x in (("real", real), ("generated", fake)):
        if x.ndim != 2:
            raise ValueError(f"{name} features must be [N, D], got shape {tuple(x.shape)}")
        if x.shape[0] < minimum:
            raise ValueError(f"{name} features: need at least {minimum} vectors, got "
                             f"{x.shape[0]}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, generated "
                         f"{fake.shape[1]}")


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64, covariance with N - 1."""
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between Gaussians fitted to
    real [N, D] and generated [M, D] features (Heusel et al. 2017).

    tr((S_r S_f)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric matrix S_r^(1/2) S_f S_r^(1/2), which has the same spectrum and, unlike a
    general matrix square root, no complex round-off to discard.

    >>> frechet_distance(torch.randn(500, 8), torch.randn(500, 8) + 1)   # ~8
    """
    _check(real, fake, 2)
    mu_r, s_r = feature_stats(real)
    mu_f, s_f = feature_stats(fake)
    w, v = torch.linalg.eigh(s_r)
    root_r = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root_r @ s_f @ root_r).clamp_min(0).sqrt().sum()
    value = (mu_r - mu_f).pow(2).sum() + s_r.trace() + s_f.trace() - 2 * inner
    return float(value.clamp_min(0))


def _radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the fraction
    of generated vectors inside the real manifold (a ball around some real vector with
    radius its k-th neighbour distance), recall the fraction of real vectors inside the
    generated manifold."""
    _check(real, fake, k + 1)
    real, fake = real.double(), fake.double()
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = torch.cdist(fake, real)  # [M, N]
    precision = (d <= r_real[None, :]).any(1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(1).double().mean()
    return {"precision": float(precision), "recall": float(recall)}
