"""Evaluation: caption accuracy by the attribute probe, distribution metrics (FD-probe,
precision / recall, FID / IS with user weights), reconstruction and segmentation metrics.
`t2i eval` (t2i.eval.report) puts them together for a run."""

from t2i.eval.attributes import caption_accuracy, caption_scores, scene_table, summarize
from t2i.eval.distribution import feature_stats, frechet_distance, precision_recall
from t2i.eval.metrics import (
                              codebook_stats,
                              mean_iou,
                              pixel_accuracy,
                              psnr,
                              reconstruction_metrics,
                              ssim,
)

__all__ = ["caption_accuracy", "caption_scores", "codebook_stats", "feature_stats",
           "frechet_distance", "mean_iou", "pixel_accuracy", "precision_recall", "psnr",
           "reconstruction_metrics", "scene_table", "ssim", "summarize"]
