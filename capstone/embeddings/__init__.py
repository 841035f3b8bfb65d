"""Chunk texts to vectors behind one interface: ``embedder_for(settings.embedding).embed(texts)``.

Providers: ``hash`` (deterministic and offline, for tests and demos), ``sentence-transformers``
(a local model, offline; the ``[local]`` extra; run by ONNX Runtime or torch, ``embedding.backend``:
see :mod:`capstone.embeddings.onnx_model`) and ``openai`` (the official client; ``base_url``
points it at any OpenAI-compatible server).
"""

from __future__ import annotations

from capstone.embeddings.api_key import resolve_api_key
from capstone.embeddings.base import Embedder
from capstone.embeddings.errors import (
    EmbeddingAuthenticationError,
    EmbeddingDimensionError,
    EmbeddingInputRejected,
    EmbeddingResponseError,
    MissingAPIKeyError,
    MissingExtraError,
    ModelNotAvailableError,
)
from capstone.embeddings.factory import PROVIDERS, Provider, create_embedder, embedder_for

__all__ = [
    "PROVIDERS",
    "Embedder",
    "EmbeddingAuthenticationError",
    "EmbeddingDimensionError",
    "EmbeddingInputRejected",
    "EmbeddingResponseError",
    "MissingAPIKeyError",
    "MissingExtraError",
    "ModelNotAvailableError",
    "Provider",
    "create_embedder",
    "embedder_for",
    "resolve_api_key",
]
