"""Errors an embedding provider raises; each says what is wrong and what to change."""

from __future__ import annotations

__all__ = [
    "EmbeddingAuthenticationError",
    "EmbeddingDimensionError",
    "EmbeddingInputRejected",
    "EmbeddingResponseError",
    "MissingAPIKeyError",
    "MissingExtraError",
    "ModelNotAvailableError",
]

LOCAL_EXTRA_HINT = "install the local extra: pip install '.[local]'"


class EmbeddingDimensionError(ValueError):
    """A model produces vectors of another length than the collection's configured ``dimension``."""

    def __init__(
        self, provider: str, model: str, *, actual: int, configured: int, at_most: bool = False
    ) -> None:
        self.provider, self.model, self.actual, self.configured = provider, model, actual, configured
        produces = f"at most {actual}" if at_most else f"{actual}"
        super().__init__(
            f"{provider} model {model!r} produces {produces}-dimensional embeddings, but the collection is "
            f"configured for {configured}: set `embedding.dimension: {actual}` in the collection's YAML, "
            f"or choose a model that produces {configured}-dimensional embeddings."
        )


class MissingExtraError(ImportError):
    """An optional dependency of a provider is not installed."""

    def __init__(self, provider: str, missing: str) -> None:
        super().__init__(
            f"the {provider} embedding provider needs {missing}, which is not installed: {LOCAL_EXTRA_HINT}"
        )


class ModelNotAvailableError(OSError):
    """A local model cannot be loaded without a download (runs are offline by design)."""


class MissingAPIKeyError(ValueError):
    """No API key could be found for an API provider."""


class EmbeddingAuthenticationError(PermissionError):
    """The embedding API rejected the key (HTTP 401/403); retrying cannot help."""


class EmbeddingResponseError(RuntimeError):
    """The embedding API answered with something that does not match the request."""


class EmbeddingInputRejected(ValueError):
    """The embedding API refused a request for what it holds (HTTP 400/422), e.g. an input over the
    model's token limit. Retrying the same request cannot help; the caller may find the inputs at
    fault by embedding smaller groups (see :func:`capstone.pipeline.embed_batch`)."""
