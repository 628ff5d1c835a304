"""Tokenizer metrics: PSNR, SSIM, codebook usage and perplexity, pixel accuracy, mean IoU."""

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images [B, C, H, W] in [-1, 1] against references, on the
    [0, 1] scale after clamping. A perfect image scores +inf.

    >>> psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.2))   # tensor([20.])
    """
    if images.shape != references.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(images.shape)} vs "
                         f"{tuple(references.shape)}")
    a = (images.float().clamp(-1, 1) + 1) / 2
    b = (references.float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def ssim(images: torch.Tensor, references: torch.Tensor, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image structural similarity (Wang et al. 2004) of images [B, C, H, W] in [-1, 1]
    against references, on the [0, 1] scale: an 11x11 Gaussian window (sigma 1.5) over the
    positions where it fits whole, K1 = 0.01, K2 = 0.03, averaged over channels and
    positions. Images smaller than the window use a window of their side. 1 is identical.

    >>> ssim(x, x)   # tensor([1., 1., ...])
    """
    if images.shape != references.shape or images.dim() != 4:
        raise ValueError(f"ssim: expected two [B, C, H, W] of one shape, got "
                         f"{tuple(images.shape)} and {tuple(references.shape)}")
    a = (images.double().clamp(-1, 1) + 1) / 2
    b = (references.double().clamp(-1, 1) + 1) / 2
    window = min(window, *a.shape[-2:])
    x = torch.arange(window, dtype=torch.float64, device=a.device) - (window - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    channels = a.shape[1]

    def blur(t):  # separable, valid: [B, C, H-w+1, W-w+1]
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(channels, 1, 1, window), groups=channels)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(channels, 1, window, 1), groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
         / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return s.flatten(1).mean(1).float()


def codebook_stats(indices: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Usage (fraction of codes used at least once), perplexity (exp entropy of the code
    histogram) and dead codes (count never used) of a set of token indices."""
    counts = torch.bincount(indices.flatten().long(), minlength=num_codes).double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
    used = int((counts > 0).sum())
    return {"usage": used / num_codes, "perplexity": float(entropy.exp()),
            "dead_codes": num_codes - used}


def pixel_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of pixels whose class is right; target < 0 marks pixels to ignore."""
    valid = target >= 0
    return float((pred[valid] == target[valid]).double().mean())


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over classes present in target or pred of intersection / union."""
    valid = target >= 0
    p, t = pred[valid], target[valid]
    ious = []
    for c in range(num_classes):
        union = ((p == c) | (t == c)).sum()
        if union > 0:
            ious.append(float(((p == c) & (t == c)).sum()) / float(union))
    return sum(ious) / max(1, len(ious))


@torch.no_grad()
def reconstruction_metrics(tokenizer, batches, num_codes: int,
                           reconstructions: list | None = None) -> dict[str, float]:
    """An image tokenizer (encode -> ids, decode -> images) over batches of {"image"}:
    mean PSNR (each image's capped at 100 dB) and SSIM of the round trip, and the codebook
    statistics of the ids. `reconstructions`: a list that receives each batch's round trip,
    for callers that score the images further."""
    psnrs, ssims, ids = [], [], []
    for batch in batches:
        codes = tokenizer.encode(batch["image"])
        recon = tokenizer.decode(codes).clamp(-1, 1)
        if reconstructions is not None:
            reconstructions.append(recon)
        psnrs.append(psnr(recon, batch["image"]))
        ssims.append(ssim(recon, batch["image"]))
        ids.append(codes.flatten())
    if not ids:
        raise ValueError("reconstruction_metrics: no batches")
    return {"psnr": float(torch.cat(psnrs).clamp(max=100).mean()),
            "ssim": float(torch.cat(ssims).mean()),
            **codebook_stats(torch.cat(ids), num_codes)}
