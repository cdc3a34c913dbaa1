"""Pioneer's attention library: pure PyTorch attention, transformer stacks, generation and checkpoints."""

from .attention import KVCache, MultiHeadAttention, ScaledDotProductAttention, causal_mask
from .cache import AttentionCache, CacheStorage, MemoryLRUStorage, cache_key, decode_tensors, encode_tensors
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .embeddings import EmbeddingLoadError, load_pretrained_vectors
from .generate import confidence, generate, sample_next, stream_generate
from .layers import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    PositionalEncoding,
    TokenEmbedding,
    TransformerDecoder,
    TransformerEncoder,
)
from .model import PRESETS, AttentionModel, ModelConfig

__all__ = [
    "AttentionCache", "AttentionModel", "CacheStorage", "CheckpointError", "DecoderLayer", "EmbeddingLoadError",
    "EncoderLayer", "FeedForward", "KVCache", "MemoryLRUStorage", "ModelConfig", "MultiHeadAttention", "PRESETS",
    "PositionalEncoding", "ScaledDotProductAttention", "TokenEmbedding", "TransformerDecoder",
    "TransformerEncoder", "cache_key", "causal_mask", "confidence", "decode_tensors", "encode_tensors",
    "generate", "load_pretrained", "load_pretrained_vectors", "sample_next", "save_pretrained", "stream_generate",
]
