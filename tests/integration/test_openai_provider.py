"""The openai provider through the real ``openai`` client, against a local fake of the API."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from capstone.embeddings import (
    EmbeddingAuthenticationError,
    EmbeddingDimensionError,
    create_embedder,
    resolve_api_key,
)
from capstone.embeddings.base import Embedder
from tests.support.fake_openai import FakeOpenAIServer, running_fake_openai_server
from tests.support.settings import embedding_settings

MODEL = "text-embedding-3-small"
DIMENSION = 64


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with running_fake_openai_server() as server:
        yield server


def _embedder(
    server: FakeOpenAIServer, *, api_key: str | None = None, max_retries: int = 5, **embedding: Any
) -> Embedder:
    """The openai embedder against the fake; ``embedding`` replaces settings fields, even past the
    spec's bounds (what the client does with them is under test)."""
    settings = embedding_settings(
        "openai", model=MODEL, dimension=DIMENSION, base_url=server.base_url, request_timeout_seconds=5.0
    )
    return create_embedder(
        replace(settings, **embedding), api_key=api_key or server.api_key, max_retries=max_retries
    )


def _texts(count: int) -> list[str]:
    return [f"chunk {i} about topic {i % 7} and word{i}" for i in range(count)]


def test_batches_of_request_batch_size_keep_the_input_order(fake_openai: FakeOpenAIServer) -> None:
    texts = _texts(150)

    vectors = _embedder(fake_openai, request_batch_size=64, max_concurrent_requests=1).embed(texts)

    requests = fake_openai.embedding_requests()
    assert len(requests) == math.ceil(150 / 64)
    assert [len(r.inputs) for r in requests] == [64, 64, 22]
    assert [text for r in requests for text in r.inputs] == texts
    # The fake answers rows in reverse order: equal vectors prove the client reordered by index.
    np.testing.assert_allclose(vectors, fake_openai.vectors(texts, DIMENSION), atol=1e-6)
    assert vectors.dtype == np.float32 and vectors.shape == (150, DIMENSION)


def test_sends_float_encoding_and_dimensions_for_text_embedding_3(fake_openai: FakeOpenAIServer) -> None:
    _embedder(fake_openai).embed(["one text"])

    (request,) = fake_openai.embedding_requests()
    assert (request.model, request.dimensions, request.encoding_format) == (MODEL, DIMENSION, "float")


def test_other_models_get_no_dimensions_and_a_wrong_size_is_reported() -> None:
    with running_fake_openai_server(native_dimension=32) as server:
        embedder = _embedder(server, model="local-bge", dimension=48)
        with pytest.raises(EmbeddingDimensionError, match=r"produces 32-dimensional .* configured for 48"):
            embedder.embed(["one text"])
        (request,) = server.embedding_requests()
        assert request.dimensions is None


def test_request_batch_size_is_capped_at_the_api_limit(fake_openai: FakeOpenAIServer) -> None:
    _embedder(fake_openai, request_batch_size=5000).embed(_texts(2100))

    # requests go out concurrently: they may arrive in any order
    assert sorted(len(r.inputs) for r in fake_openai.embedding_requests()) == [52, 2048]


def test_a_batch_over_the_request_token_budget_is_split(fake_openai: FakeOpenAIServer) -> None:
    long_texts = [f"{i} " + "word " * 50_000 for i in range(3)]  # 250k characters each

    _embedder(fake_openai).embed(long_texts)

    assert sorted(len(r.inputs) for r in fake_openai.embedding_requests()) == [1, 2]


def test_empty_texts_do_not_fail_the_batch(fake_openai: FakeOpenAIServer) -> None:
    vectors = _embedder(fake_openai).embed(["", "some words"])

    assert np.isfinite(vectors).all() and vectors.shape == (2, DIMENSION)


def test_429_with_retry_after_is_waited_out_then_succeeds(fake_openai: FakeOpenAIServer) -> None:
    fake_openai.fail_next(1, "429", retry_after=1)
    started = time.monotonic()

    vectors = _embedder(fake_openai).embed(_texts(3))

    assert time.monotonic() - started >= 1.0  # the client honoured Retry-After: 1
    assert [(r.status, r.retry_count) for r in fake_openai.embedding_requests()] == [(429, 0), (200, 1)]
    np.testing.assert_allclose(vectors, fake_openai.vectors(_texts(3), DIMENSION), atol=1e-6)


def test_500_is_retried_then_succeeds(fake_openai: FakeOpenAIServer) -> None:
    fake_openai.fail_next(2, "500")

    _embedder(fake_openai).embed(_texts(3))

    assert [r.status for r in fake_openai.embedding_requests()] == [500, 500, 200]


def test_a_hang_past_the_timeout_is_retried_then_succeeds(fake_openai: FakeOpenAIServer) -> None:
    fake_openai.fail_next(1, "hang")
    started = time.monotonic()

    vectors = _embedder(fake_openai, request_timeout_seconds=0.5).embed(_texts(3))

    assert time.monotonic() - started < 5  # gave up on the hung call after ~0.5 s, not 30 s
    assert [r.status for r in fake_openai.embedding_requests()] == [0, 200]
    assert vectors.shape == (3, DIMENSION)


def test_a_wrong_key_fails_at_once_with_a_clear_error(fake_openai: FakeOpenAIServer) -> None:
    with pytest.raises(EmbeddingAuthenticationError, match=r"refused the API key.*HTTP 401") as raised:
        _embedder(fake_openai, api_key="sk-wrong-key").embed(_texts(3))

    assert "sk-wrong-key" not in str(raised.value)
    assert [r.status for r in fake_openai.embedding_requests()] == [401]  # not retried


def test_completes_through_30_percent_random_failures(fake_openai: FakeOpenAIServer) -> None:
    # Seeded: the same calls fail on every run. retry-after 0.05 s keeps the test quick.
    fake_openai.fail_randomly(0.3, kind="500", retry_after=0.05)
    texts = _texts(100)

    vectors = _embedder(fake_openai, request_batch_size=2).embed(texts)

    statuses = [r.status for r in fake_openai.embedding_requests()]
    assert statuses.count(200) == 50 and statuses.count(500) >= 10
    np.testing.assert_allclose(vectors, fake_openai.vectors(texts, DIMENSION), atol=1e-6)


def test_the_key_from_an_airflow_connection_is_accepted(
    fake_openai: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_FAKE_OPENAI", f'{{"conn_type": "generic", "password": "{fake_openai.api_key}"}}'
    )

    embedder = _embedder(fake_openai, api_key=resolve_api_key("fake_openai"))

    assert embedder.embed(["hello"]).shape == (1, DIMENSION)


def test_the_fake_answers_base64_which_the_client_asks_for_by_default(fake_openai: FakeOpenAIServer) -> None:
    import openai

    client = openai.OpenAI(base_url=fake_openai.base_url, api_key=fake_openai.api_key)
    response = client.embeddings.create(model=MODEL, input=["alpha beta", "gamma"], dimensions=DIMENSION)

    (request,) = fake_openai.embedding_requests()
    assert request.encoding_format == "base64"
    decoded = np.array([item.embedding for item in sorted(response.data, key=lambda item: item.index)])
    np.testing.assert_allclose(decoded, fake_openai.vectors(["alpha beta", "gamma"], DIMENSION), atol=1e-6)


def test_requests_go_out_up_to_max_concurrent_requests_at_once(fake_openai: FakeOpenAIServer) -> None:
    # What the client does, seen at the server (calls in flight), not how long it took: timings on a
    # shared machine drift, and belong in benchmarks/.
    fake_openai.latency = 0.1  # a real API's round trip: calls overlap if the client lets them
    texts = _texts(2000)
    peaks = {}
    for concurrent in (1, 4):
        fake_openai.peak_in_flight = 0
        vectors = _embedder(fake_openai, request_batch_size=25, max_concurrent_requests=concurrent).embed(
            texts
        )
        peaks[concurrent] = fake_openai.peak_in_flight
        np.testing.assert_allclose(vectors, fake_openai.vectors(texts, DIMENSION), atol=1e-6)

    requests = fake_openai.embedding_requests()
    assert len(requests) == 2 * 80 and {r.status for r in requests} == {200}
    assert peaks == {1: 1, 4: 4}, peaks


def test_requests_stay_within_the_token_budget_and_every_text_comes_back_in_place(
    fake_openai: FakeOpenAIServer,
) -> None:
    fake_openai.max_request_tokens = 5_000  # the server refuses a request of more (HTTP 400)
    texts = [" ".join(f"w{i}x{j}" for j in range(40 + i % 60)) for i in range(2000)]  # 40-99 words

    vectors = _embedder(
        fake_openai, request_batch_size=2048, max_tokens_per_request=5_000, max_concurrent_requests=4
    ).embed(texts)

    requests = fake_openai.embedding_requests()
    assert {r.status for r in requests} == {200}
    assert max(r.tokens for r in requests) <= 5_000
    assert sorted(text for r in requests for text in r.inputs) == sorted(texts)  # each text once
    np.testing.assert_allclose(vectors, fake_openai.vectors(texts, DIMENSION), atol=1e-6)


def test_a_429_retry_after_holds_every_concurrent_request(fake_openai: FakeOpenAIServer) -> None:
    fake_openai.latency = 0.05
    fake_openai.fail_next(1, "429", retry_after=1)
    texts = _texts(400)

    vectors = _embedder(fake_openai, request_batch_size=10, max_concurrent_requests=4).embed(texts)

    requests = fake_openai.embedding_requests()
    (limited,) = [r for r in requests if r.status == 429]
    answered = limited.arrived + fake_openai.latency
    # Requests already on their way may still arrive; then nothing until the Retry-After is over.
    held = [r.arrived - answered for r in requests if answered + 0.1 < r.arrived < answered + 0.9]
    assert held == [], f"requests sent while the API asked to wait 1s: {held}"
    assert max(r.arrived for r in requests) >= answered + 0.9
    np.testing.assert_allclose(vectors, fake_openai.vectors(texts, DIMENSION), atol=1e-6)
