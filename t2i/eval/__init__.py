"""Evaluation: reconstruction, segmentation and distribution metrics."""

from t2i.eval.distribution import feature_stats, frechet_distance, precision_recall
from t2i.eval.metrics import codebook_stats, mean_iou, pixel_accuracy, psnr

__all__ = ["codebook_stats", "feature_stats", "frechet_distance", "mean_iou", "pixel_accuracy",
           "precision_recall", "psnr"]
