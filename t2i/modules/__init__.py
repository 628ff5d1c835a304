"""Shared building blocks of every model family."""

from t2i.modules.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer

__all__ = ["QuantizerConfig", "QuantizerOutput", "VectorQuantizer"]
