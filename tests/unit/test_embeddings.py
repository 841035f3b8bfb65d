"""The embedding interface: the hash provider, the errors users see, and where API keys come from."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from capstone.embeddings import (
    Embedder,
    EmbeddingDimensionError,
    MissingAPIKeyError,
    MissingExtraError,
    create_embedder,
    resolve_api_key,
)
from capstone.embeddings import local_model as local_model_module
from capstone.settings import EmbeddingSettings, Provider
from tests.support.settings import embedding_settings

CHUNKS = [
    "Handling exceptions with try/except: an except clause catches the errors raised in the try block.",
    "The for statement iterates over the items of a sequence such as a list or a string.",
    "Installing packages: pip downloads a distribution and unpacks it into site-packages.",
    "How do I write a class? Define methods inside a class statement; do not forget self.",
]


def _hash(dimension: int = 384, normalize: bool = True) -> Embedder:
    return create_embedder(replace(embedding_settings(), dimension=dimension, normalize=normalize))


def test_hash_vectors_are_float32_unit_rows_of_the_configured_dimension() -> None:
    vectors = _hash(dimension=128).embed(CHUNKS)

    assert vectors.dtype == np.float32 and vectors.shape == (len(CHUNKS), 128)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)


def test_hash_is_deterministic_across_embedders_and_calls() -> None:
    first = _hash().embed(CHUNKS)

    np.testing.assert_array_equal(first, _hash().embed(CHUNKS))
    np.testing.assert_array_equal(first[2:], _hash().embed(CHUNKS[2:]))  # a row does not depend on its batch


def test_hash_is_the_same_in_processes_with_different_string_hash_seeds() -> None:
    script = (
        "from capstone.embeddings import create_embedder;"
        "from tests.support.settings import embedding_settings;"
        "embedder = create_embedder(embedding_settings(dimension=64));"
        "print(embedder.embed(['with statement']).tobytes().hex())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }

    assert len(outputs) == 1
    assert outputs.pop().strip() == _hash(dimension=64).embed(["with statement"]).tobytes().hex()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("how do I handle exceptions", 0),
        ("loop over a list", 1),
        ("install a package with pip", 2),
    ],
)
def test_hash_ranks_chunks_sharing_the_query_words_first(query: str, expected: int) -> None:
    embedder = _hash()

    scores = embedder.embed(CHUNKS) @ embedder.embed([query])[0]

    assert int(np.argmax(scores)) == expected
    assert scores[expected] > 0.1 + np.delete(scores, expected).max()


def test_hash_empty_and_wordless_texts_get_a_finite_unit_vector() -> None:
    vectors = _hash().embed(["", "  ?! -- ", "words"])

    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(vectors[0], vectors[1])


def test_hash_without_normalize_returns_signed_counts() -> None:
    vector = _hash(dimension=4096, normalize=False).embed(["yield yield yield"])[0]

    # "yield" three times and the bigram "yield yield" twice, in two buckets of 4096.
    assert sorted(np.abs(vector[vector != 0]).tolist()) == [2.0, 3.0]


def test_no_texts_give_an_empty_matrix() -> None:
    assert _hash(dimension=16).embed([]).shape == (0, 16)


def test_hash_embeds_100k_short_chunks_in_a_few_seconds() -> None:
    words = " ".join(CHUNKS).split()
    chunks = [" ".join(words[i % 40 : i % 40 + 12]) + f" item{i}" for i in range(100_000)]
    started = time.process_time()  # CPU time: other processes on a busy machine do not count

    vectors = _hash().embed(chunks)

    assert vectors.shape == (100_000, 384)
    assert time.process_time() - started < 10  # ~2 s on this project's 2-core machine


def test_hash_embedder_satisfies_the_protocol() -> None:
    embedder = _hash()

    assert isinstance(embedder, Embedder)
    assert (embedder.provider, embedder.model, embedder.dimension, embedder.max_input_chars) == (
        "hash",
        "hash-v1",
        384,
        None,
    )


def _openai(model: str, dimension: int) -> EmbeddingSettings:
    return embedding_settings("openai", model=model, dimension=dimension)


def test_a_dimension_the_model_cannot_produce_names_both_numbers_and_the_fix() -> None:
    with pytest.raises(EmbeddingDimensionError) as raised:
        create_embedder(_openai("text-embedding-ada-002", 384), api_key="sk-unused")

    message = str(raised.value)
    assert "1536" in message and "384" in message
    assert "embedding.dimension: 1536" in message
    assert isinstance(raised.value, ValueError)


def test_text_embedding_3_accepts_shorter_dimensions_but_not_longer() -> None:
    assert create_embedder(_openai("text-embedding-3-small", 256), api_key="k").dimension == 256
    too_long = replace(_openai("text-embedding-3-small", 1536), dimension=3072)  # past the spec's bound
    with pytest.raises(EmbeddingDimensionError, match="at most 1536-dimensional"):
        create_embedder(too_long, api_key="k")


def test_openai_max_input_chars_is_known_for_openai_models_only() -> None:
    openai_model = create_embedder(_openai("text-embedding-3-small", 1536), api_key="k")
    other_model = create_embedder(
        embedding_settings("openai", model="bge-small", dimension=384, base_url="http://x/v1"), api_key="k"
    )

    assert openai_model.max_input_chars == 8191 * 3
    assert other_model.max_input_chars is None


def test_openai_without_any_key_says_where_to_put_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_ADMIN_KEY", raising=False)

    with pytest.raises(MissingAPIKeyError, match=r"embedding\.connection_id.*OPENAI_API_KEY"):
        create_embedder(_openai("text-embedding-3-small", 1536))


@pytest.mark.parametrize(
    ("backend", "missing"), [("torch", "sentence_transformers"), ("onnx", "onnxruntime")]
)
def test_missing_local_extra_says_how_to_install_it(
    backend: str, missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.setattr(local_model_module, "_MODELS", {})

    with pytest.raises(MissingExtraError, match=r"pip install '\.\[local\]'"):
        create_embedder(embedding_settings("sentence-transformers", backend=backend))


def test_without_onnxruntime_auto_runs_the_model_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from capstone.embeddings.onnx_model import resolve_backend

    monkeypatch.setitem(sys.modules, "onnxruntime", None)

    assert resolve_backend(embedding_settings("sentence-transformers")) == "torch"


def test_an_unknown_provider_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"hash.*sentence-transformers.*openai"):
        create_embedder(replace(embedding_settings(), provider=cast(Provider, "cohere")))


def test_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_EMBEDDING_KEY", "sk-from-env")

    assert resolve_api_key(None, "MY_EMBEDDING_KEY") == "sk-from-env"


def test_no_connection_and_no_variable_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_EMBEDDING_KEY", raising=False)

    assert resolve_api_key(None, "MY_EMBEDDING_KEY") is None


@pytest.mark.parametrize(
    "connection",
    [
        '{"conn_type": "generic", "password": "sk-from/connection"}',
        "generic://:sk-from%2Fconnection@api.example.com",
    ],
    ids=["json", "uri"],
)
def test_api_key_comes_from_the_airflow_connection_password_first(
    connection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_EMBEDDING_API", connection)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")

    assert resolve_api_key("embedding_api") == "sk-from/connection"


def test_an_undefined_connection_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_EMBEDDING_API", raising=False)

    with pytest.raises(
        MissingAPIKeyError, match=r"'no_such_embedding_api'.*AIRFLOW_CONN_NO_SUCH_EMBEDDING_API"
    ):
        resolve_api_key("no_such_embedding_api")


def test_a_connection_without_password_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_KEYLESS", '{"conn_type": "generic", "host": "api.example.com"}')

    with pytest.raises(MissingAPIKeyError, match=r"'keyless'.*no password"):
        resolve_api_key("keyless")


def test_requests_are_cut_by_count_and_by_estimated_tokens() -> None:
    from capstone.embeddings.openai_api import estimated_tokens, request_batches

    texts = ["x" * 30] * 10  # 10 estimated tokens each
    assert estimated_tokens("x" * 30) == 10 and estimated_tokens("") == 1
    assert [len(batch) for _, batch in request_batches(texts, 4, 1_000)] == [4, 4, 2]
    assert [len(batch) for _, batch in request_batches(texts, 100, 35)] == [3, 3, 3, 1]
    offsets = [offset for offset, _ in request_batches(texts, 100, 35)]
    assert offsets == [0, 3, 6, 9]
    # a text over the budget on its own still goes, alone
    assert [len(batch) for _, batch in request_batches(["y" * 300, "z"], 100, 35)] == [1, 1]


def test_multibyte_text_costs_more_estimated_tokens_than_its_characters_suggest() -> None:
    from capstone.embeddings.openai_api import estimated_tokens

    assert estimated_tokens("日本語のテキスト") == 8  # 24 UTF-8 bytes


def test_an_embedding_task_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from capstone.embeddings import local_model

    monkeypatch.setattr(local_model, "available_cores", lambda: 8)
    assert local_model.threads_per_task(None, 2) == 4
    assert local_model.threads_per_task(None, 16) == 1
    assert local_model.threads_per_task(3, 2) == 3  # embedding.threads, when the spec sets it
