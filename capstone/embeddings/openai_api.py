"""The ``openai`` provider: the official client, against OpenAI or any OpenAI-compatible server.

One call to :meth:`OpenAIEmbedder.embed` cuts its texts into requests of at most
``request_batch_size`` inputs (2048 at most) and ``max_tokens_per_request`` estimated tokens, and
keeps up to ``max_concurrent_requests`` of them in flight at once (the official async client);
the vectors come back in the order of the texts whatever order the requests finish in.

Retries are the client's own: it retries timeouts, connection errors, 408, 409, 429 and 5xx up to
``max_retries`` times, waiting what the server's ``Retry-After``/``retry-after-ms`` says (up to
a minute) or else 0.5 s doubling to 8 s with jitter (openai/_base_client.py,
``_should_retry`` and ``_calculate_retry_timeout``). A 429's ``Retry-After`` holds every request
of the call, not only the refused one (:class:`_RateLimitGate`): the concurrent requests would
otherwise run into the same limit. A 401 is not retried: it raises
:class:`EmbeddingAuthenticationError` at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
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

__all__ = ["MAX_INPUTS_PER_REQUEST", "OpenAIEmbedder", "estimated_tokens", "input_limit", "request_batches"]

log = logging.getLogger(__name__)

# The API takes at most 2048 inputs per request ...
MAX_INPUTS_PER_REQUEST = 2048
# ... and at most 300,000 tokens summed over them (the spec's max_tokens_per_request stays under it).
# Tokens are estimated without a tokenizer (none may be downloaded): BPE tokens of English prose
# average ~4 UTF-8 bytes, code ~3, so bytes / 3 errs high for both.
_BYTES_PER_TOKEN = 3
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


def estimated_tokens(text: str) -> int:
    """An upper estimate of the tokens ``text`` costs (UTF-8 bytes / 3, at least 1)."""
    return max(1, math.ceil(len(text.encode("utf-8", "surrogatepass")) / _BYTES_PER_TOKEN))


def request_batches(
    texts: Sequence[str], max_texts: int, max_tokens: int
) -> Iterator[tuple[int, Sequence[str]]]:
    """(offset, texts) runs of at most ``max_texts`` texts and ``max_tokens`` estimated tokens; a
    text over the budget on its own goes alone (the server then judges it)."""
    start, tokens = 0, 0
    for end, text in enumerate(texts):
        cost = estimated_tokens(text)
        if end > start and (end - start == max_texts or tokens + cost > max_tokens):
            yield start, texts[start:end]
            start, tokens = end, 0
        tokens += cost
    if start < len(texts):
        yield start, texts[start:]


def _check_api_key(api_key: str | None) -> None:
    # The client's own rule: an explicit key, else $OPENAI_API_KEY.
    if not (api_key or os.environ.get("OPENAI_API_KEY")):
        raise MissingAPIKeyError(
            "no API key for the openai embedding provider: set embedding.connection_id to an Airflow "
            "connection whose password is the key, or export the variable named by embedding.api_key_env "
            "(OPENAI_API_KEY by default). A server that needs no key still wants a placeholder."
        )


class _RateLimitGate:
    """Holds every request of one ``embed`` call while a 429's ``Retry-After`` runs.

    Hooked into the HTTP client, so it sees the client's own retries too: a response hook closes
    the gate for the time the server asked, and a request hook makes each request wait for it.
    """

    def __init__(self) -> None:
        self._open_at = 0.0

    async def before_request(self, request: Any) -> None:
        delay = self._open_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def after_response(self, response: Any) -> None:
        if response.status_code != 429:
            return
        delay = _retry_after_seconds(response.headers)
        if delay is not None and 0 < delay <= _MAX_RETRY_AFTER:
            self._open_at = max(self._open_at, time.monotonic() + delay)
            log.info("rate limited (429): every request of this call waits %.1fs, as the server asked", delay)


# The client gives up on a Retry-After longer than this; so does the gate.
_MAX_RETRY_AFTER = 60.0


def _retry_after_seconds(headers: Any) -> float | None:
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is not None:
            try:
                return float(value) / divisor
            except ValueError:
                continue
    return None


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
    """Embeds through ``POST /embeddings``: requests of at most ``request_batch_size`` texts and
    ``max_tokens_per_request`` estimated tokens, ``max_concurrent_requests`` of them at once."""

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
        max_concurrent_requests: int,
        max_tokens_per_request: int,
    ) -> None:
        _check_declared_dimension(model, dimension)
        _check_api_key(api_key)
        self.model = model
        self.dimension = dimension
        self.normalize = normalize
        self.request_batch_size = min(request_batch_size, MAX_INPUTS_PER_REQUEST)
        self.max_concurrent_requests = max_concurrent_requests
        self.max_tokens_per_request = max_tokens_per_request
        self.max_input_chars: int | None = input_limit(model)
        self._base_url = base_url
        self._client_options: dict[str, Any] = {
            "base_url": base_url,
            "api_key": api_key,
            "timeout": timeout,
            "max_retries": max_retries,
        }

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in order; rows L2-normalised when ``normalize``."""
        if len(texts) == 0:  # not `not texts`: a numpy array of strings has no truth value
            return no_vectors(self.dimension)
        started = time.perf_counter()
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        requests = list(request_batches(texts, self.request_batch_size, self.max_tokens_per_request))
        _run(self._embed_all(requests, vectors))
        elapsed = time.perf_counter() - started
        log.info(
            "openai %s: %d texts in %d requests (up to %d at once), %.1fs (%.0f texts/s)",
            self.model,
            len(texts),
            len(requests),
            self.max_concurrent_requests,
            elapsed,
            len(texts) / max(elapsed, 1e-9),
        )
        return l2_normalize(vectors) if self.normalize else vectors

    async def _embed_all(self, requests: list[tuple[int, Sequence[str]]], vectors: np.ndarray) -> None:
        """Send ``requests`` with at most ``max_concurrent_requests`` in flight; the first failure
        cancels the others and is raised as it is (the pipeline tells refused inputs by their type)."""
        import openai

        gate = _RateLimitGate()
        slots = asyncio.Semaphore(self.max_concurrent_requests)
        hooks: dict[str, list[Any]] = {"request": [gate.before_request], "response": [gate.after_response]}
        async with openai.AsyncOpenAI(
            **self._client_options, http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks)
        ) as client:

            async def one(start: int, batch: Sequence[str]) -> None:
                async with slots:
                    vectors[start : start + len(batch)] = await self._embed_batch(client, batch)

            pending = [asyncio.ensure_future(one(start, batch)) for start, batch in requests]
            try:
                await asyncio.gather(*pending)
            except BaseException:
                for future in pending:
                    future.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                raise

    async def _embed_batch(self, client: Any, batch: Sequence[str]) -> np.ndarray:
        """One request; the rows come back in the order of ``batch`` whatever order the server used."""
        response = await self._create(client, batch)
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

    async def _create(self, client: Any, batch: Sequence[str]) -> Any:
        import openai

        options: dict[str, Any] = {"dimensions": self.dimension} if _accepts_dimensions(self.model) else {}
        try:
            return await client.embeddings.create(
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


def _run(coroutine: Any) -> Any:
    """Run ``coroutine`` to its end from synchronous code, also where an event loop is running
    (then in a thread of its own: a task's code may be called from async code)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
