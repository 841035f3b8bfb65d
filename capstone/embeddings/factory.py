"""Build the embedder a collection's spec asks for."""

from __future__ import annotations

from typing import Literal, get_args

from capstone.embeddings.base import Embedder

__all__ = ["PROVIDERS", "Provider", "create_embedder"]

Provider = Literal["hash", "sentence-transformers", "openai"]
PROVIDERS: tuple[str, ...] = get_args(Provider)


def create_embedder(
    provider: Provider,
    *,
    model: str,
    dimension: int,
    normalize: bool = True,
    request_batch_size: int = 64,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 60.0,
    max_retries: int = 5,
) -> Embedder:
    """An embedder for ``provider``; :class:`EmbeddingDimensionError` if ``model`` lacks ``dimension``.

    ``request_batch_size`` is texts per model call or API request; ``base_url``, ``api_key``,
    ``timeout`` (seconds per request) and ``max_retries`` apply to ``openai`` only.
    """
    if dimension < 1 or request_batch_size < 1:
        raise ValueError(
            f"dimension and request_batch_size must be positive, got {dimension} and {request_batch_size}"
        )
    # Each provider is imported only when asked for: the openai client and torch are slow imports.
    if provider == "hash":
        from capstone.embeddings.hashing import HashEmbedder

        return HashEmbedder(model=model, dimension=dimension, normalize=normalize)
    if provider == "sentence-transformers":
        from capstone.embeddings.local_model import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(
            model=model, dimension=dimension, normalize=normalize, request_batch_size=request_batch_size
        )
    if provider == "openai":
        from capstone.embeddings.openai_api import OpenAIEmbedder

        return OpenAIEmbedder(
            model=model,
            dimension=dimension,
            normalize=normalize,
            request_batch_size=request_batch_size,
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
        )
    raise ValueError(f"unknown embedding provider {provider!r}: embedding.provider is one of {PROVIDERS}")
