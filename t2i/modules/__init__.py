"""Shared building blocks of every model family."""

from t2i.modules.attention import (
    Attention,
    KVCache,
    LearnedPositions,
    RotaryEmbedding,
    TransformerBlock,
    grid_positions,
)
from t2i.modules.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer

__all__ = ["Attention", "KVCache", "LearnedPositions", "QuantizerConfig", "QuantizerOutput",
           "RotaryEmbedding", "TransformerBlock", "VectorQuantizer", "grid_positions"]
