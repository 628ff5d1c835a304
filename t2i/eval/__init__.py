"""Evaluation: reconstruction and segmentation metrics (more in later issues)."""

from t2i.eval.metrics import codebook_stats, mean_iou, pixel_accuracy, psnr

__all__ = ["codebook_stats", "mean_iou", "pixel_accuracy", "psnr"]
