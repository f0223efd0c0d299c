"""One-pass multi-layer extraction and the resumable, memory-mapped activation cache."""

from inca.features.cache import ActivationCache, read_manifest
from inca.features.extract import extract_features, extract_to_cache, token_shapes
from inca.features.tokens import reduce_tokens

__all__ = [
    "ActivationCache",
    "extract_features",
    "extract_to_cache",
    "read_manifest",
    "reduce_tokens",
    "token_shapes",
]
