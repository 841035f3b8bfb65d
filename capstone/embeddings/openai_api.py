"""The ``openai`` provider: the official client, against OpenAI or any OpenAI-compatible server.

Retries are the client's own: it retries timeouts, connection errors, 408, 409, 429 and 5xx up to
``max_retries`` times, waiting what the server's ``Retry-After``/``retry-after-ms`` says (up to
two minutes) or else 0.5 s doubling to 8 s with jitter (openai/_base_client.py,
``_should_retry`` and ``_calculate_retry_timeout``). A 401 is not retried: it raises
:class:`EmbeddingAuthenticationError` at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from capstone.embeddings.base import l2_normalize, no_vectors
from capstone.embeddings.errors import (
    EmbeddingAuthenticationError,
    EmbeddingDimensionError,
    EmbeddingInputRejected,
    EmbeddingResponseError,
    MissingAPIKeyError,
)

__all__ = ["MAX_INPUTS_PER_REQUEST", "OpenAIEmbedder", "input_limit"]

log = logging.getLogger(__name__)

# The API takes at most 2048 inputs per request ...
MAX_INPUTS_PER_REQUEST = 2048
# ... and at most 300,000 tokens summed over them. Budgeting 2 characters per token keeps even
# code-heavy batches under it; a batch over budget is split, not rejected.
_MAX_CHARS_PER_REQUEST = 600_000
# OpenAI's embedding models take 8191 tokens per input. At 3 characters per token (English prose
# averages ~4, code ~3) a chunk longer than this would likely be rejected, failing its whole request.
_MAX_INPUT_CHARS_OPENAI = 8191 * 3
# Native output sizes of OpenAI's models: checked before the first request, not after a failed run.
_NATIVE_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


def _accepts_dimensions(model: str) -> bool:
    """Only text-embedding-3 models can shorten their output (the ``dimensions`` parameter)."""
    return model.startswith("text-embedding-3")


def _check_declared_dimension(model: str, dimension: int) -> None:
    native = _NATIVE_DIMENSIONS.get(model)
    if native is None:
        return  # another server's model: checked on the first response instead
    if dimension > native or (dimension != native and not _accepts_dimensions(model)):
        raise EmbeddingDimensionError(
            "openai", model, actual=native, configured=dimension, at_most=_accepts_dimensions(model)
        )


def _request_batches(texts: Sequence[str], max_texts: int) -> Iterator[tuple[int, Sequence[str]]]:
    """(offset, texts) runs of at most ``max_texts`` texts and ``_MAX_CHARS_PER_REQUEST`` characters."""
    start, chars = 0, 0
    for end, text in enumerate(texts):
        if end > start and (end - start == max_texts or chars + len(text) > _MAX_CHARS_PER_REQUEST):
            yield start, texts[start:end]
            start, chars = end, 0
        chars += len(text)
    if start < len(texts):
        yield start, texts[start:]


def _make_client(*, base_url: str | None, api_key: str | None, timeout: float, max_retries: int) -> Any:
    import openai

    try:
        return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
    except openai.OpenAIError as err:  # raised when neither api_key nor $OPENAI_API_KEY is set
        raise MissingAPIKeyError(
            "no API key for the openai embedding provider: set embedding.connection_id to an Airflow "
            "connection whose password is the key, or export the variable named by embedding.api_key_env "
            "(OPENAI_API_KEY by default). A server that needs no key still wants a placeholder."
        ) from err


def _error_message(err: Any) -> str:
    """The API's own message (``error.message`` of the body), else the client's text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return str(err)


def input_limit(model: str) -> int | None:
    """Longest text (characters) OpenAI's own ``model`` accepts; None for models we know nothing of."""
    return _MAX_INPUT_CHARS_OPENAI if model in _NATIVE_DIMENSIONS else None


class OpenAIEmbedder:
    """Embeds through ``POST /embeddings``, in requests of at most ``request_batch_size`` texts."""

    provider = "openai"

    def __init__(
        self,
        *,
        model: str,
        dimension: int,
        normalize: bool = True,
        request_batch_size: int,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float,
        max_retries: int = 5,
    ) -> None:
        _check_declared_dimension(model, dimension)
        self.model = model
        self.dimension = dimension
        self.normalize = normalize
        self.request_batch_size = min(request_batch_size, MAX_INPUTS_PER_REQUEST)
        self.max_input_chars: int | None = input_limit(model)
        self._base_url = base_url
        self._client = _make_client(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in order, one request per batch; rows L2-normalised when ``normalize``."""
        if len(texts) == 0:  # not `not texts`: a numpy array of strings has no truth value
            return no_vectors(self.dimension)
        started = time.perf_counter()
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        requests = 0
        for start, batch in _request_batches(texts, self.request_batch_size):
            batch_started = time.perf_counter()
            vectors[start : start + len(batch)] = self._embed_batch(batch)
            requests += 1
            took = time.perf_counter() - batch_started
            log.debug("openai %s: request %d, %d texts, %.2fs", self.model, requests, len(batch), took)
        elapsed = time.perf_counter() - started
        summary = (self.model, len(texts), requests, elapsed, len(texts) / max(elapsed, 1e-9))
        log.info("openai %s: %d texts in %d requests, %.1fs (%.0f texts/s)", *summary)
        return l2_normalize(vectors) if self.normalize else vectors

    def _embed_batch(self, batch: Sequence[str]) -> np.ndarray:
        """One request; the rows come back in the order of ``batch`` whatever order the server used."""
        response = self._create(batch)
        rows = sorted(response.data, key=lambda item: item.index)
        if [item.index for item in rows] != list(range(len(batch))):
            raise EmbeddingResponseError(
                f"openai {self.model}: asked for {len(batch)} embeddings, got indexes "
                f"{[item.index for item in rows][:10]}... from {self._base_url or 'the OpenAI API'}"
            )
        matrix = np.asarray([item.embedding for item in rows], dtype=np.float32)
        actual = matrix.shape[1]
        if actual != self.dimension:
            raise EmbeddingDimensionError(self.provider, self.model, actual=actual, configured=self.dimension)
        return matrix

    def _create(self, batch: Sequence[str]) -> Any:
        import openai

        options: dict[str, Any] = {"dimensions": self.dimension} if _accepts_dimensions(self.model) else {}
        try:
            return self._client.embeddings.create(
                model=self.model,
                # The API rejects empty strings; a lone space embeds as "nothing" without failing the batch.
                input=[text or " " for text in batch],
                encoding_format="float",
                **options,
            )
        except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
            raise EmbeddingInputRejected(
                f"{self._base_url or 'the OpenAI API'} rejected a request of {len(batch)} inputs for model "
                f"{self.model!r} (HTTP {err.status_code}): {_error_message(err)}"
            ) from err
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise EmbeddingAuthenticationError(
                f"{self._base_url or 'the OpenAI API'} refused the API key for model {self.model!r} "
                f"(HTTP {err.status_code}): check the password of the Airflow connection named by "
                "embedding.connection_id, or the variable named by embedding.api_key_env"
            ) from err
