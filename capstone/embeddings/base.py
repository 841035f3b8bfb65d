"""The one interface every embedding provider implements, and the vector helpers they share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Embedder", "l2_normalize", "no_vectors"]


@runtime_checkable
class Embedder(Protocol):
    """Turns chunk texts into vectors: ``embed(texts)`` -> float32 array of shape ``(n, dimension)``."""

    provider: str
    model: str
    dimension: int
    # Longest text accepted, so the pipeline can set oversize chunks aside; None when unbounded.
    max_input_chars: int | None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in order; row ``i`` is the vector of ``texts[i]``."""
        ...


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit length in place; an all-zero row stays zero (never NaN)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors


def no_vectors(dimension: int) -> np.ndarray:
    """The result of embedding no texts."""
    return np.empty((0, dimension), dtype=np.float32)
