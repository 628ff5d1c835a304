"""Losses shared by the tokenizers: GAN hinge losses, VQGAN's adaptive weight, a feature
(perceptual) loss, the logit-Laplace likelihood of the DALL-E dVAE."""

import math

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): mean relu(1 - real) + relu(1 + fake), / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance (Esser et al. 2021, eq. 7): ||grad rec|| / (||grad gan|| + 1e-4) at the
    decoder's last layer, detached. Both losses must still have their graphs."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = g_rec.float().norm() / (g_gan.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def weighted_mean(loss_map: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of a [B, C, H, W] loss map, each pixel weighted by weight [B, 1, h, w] (resized to
    the map's resolution; normalised so that a weight of ones gives the plain mean)."""
    if weight is None:
        return loss_map.mean()
    if weight.shape[-2:] != loss_map.shape[-2:]:
        weight = F.adaptive_avg_pool2d(weight, loss_map.shape[-2:])
    weight = weight.to(loss_map.dtype)
    return (loss_map * weight).sum() / (weight.sum() * loss_map.shape[1]).clamp_min(1e-8)


def feature_loss(real: list[torch.Tensor], fake: list[torch.Tensor],
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 distance between feature maps of real (no gradient) and fake images."""
    losses = [weighted_mean((r.detach() - f).abs(), weight) for r, f in zip(real, fake,
                                                                               strict=True)]
    return torch.stack(losses).mean()


LOGIT_LAPLACE_EPS = 0.1  # DALL-E's epsilon: pixels are squeezed into [eps, 1 - eps]


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-pixel negative log-likelihood of images x in [-1, 1] under the logit-Laplace
    distribution of Ramesh et al. 2021 (appendix A.3), pixel values mapped to (eps, 1-eps)."""
    eps = LOGIT_LAPLACE_EPS
    y = ((x + 1) / 2 * (1 - 2 * eps) + eps).clamp(1e-6, 1 - 1e-6)
    logit = torch.log(y) - torch.log1p(-y)
    b = log_b.exp()
    return (log_b + math.log(2.0) + torch.log(y) + torch.log1p(-y)
            + (logit - mu).abs() / b)


def logit_laplace_mean(mu: torch.Tensor) -> torch.Tensor:
    """The image [-1, 1] a logit-Laplace decoder output stands for (its median)."""
    eps = LOGIT_LAPLACE_EPS
    return ((torch.sigmoid(mu) - eps) / (1 - 2 * eps)).clamp(0, 1) * 2 - 1
