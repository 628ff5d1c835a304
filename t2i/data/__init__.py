"""Data: the synthetic scenes, webdataset shards, the batch pipeline and tokenizers."""

from t2i.data.pipeline import DataIssues, ImageTextPipeline, ShardDataset, captions
from t2i.data.shards import ShardWriter, resolve_shards
from t2i.data.synth import ensure_synth, synthesize
from t2i.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "captions",
    "BPETokenizer", "ByteTokenizer", "DataIssues", "ImageTextPipeline", "ShardDataset",
    "ShardWriter", "Tokenizer", "ensure_synth", "load_tokenizer", "resolve_shards",
    "synthesize",
]
