"""Tokenizer metrics: PSNR, codebook usage and perplexity, pixel accuracy, mean IoU."""

import torch


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
