"""The local model on ONNX Runtime: torch's vectors, no torch in the process, an export made once.

The demo corpus and the held-out queries of ``benchmarks/search_queries.yaml`` are embedded by both
backends: ONNX Runtime must give every chunk torch's vector (cosine >= 0.999) and every query the
same five nearest chunks, which is why ``embedding.backend`` stays out of the embedding fingerprint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from capstone.embeddings import Embedder, ModelNotAvailableError, create_embedder
from capstone.embeddings.model_files import MODEL_CACHE_ENV, model_path, onnx_file, read_layout
from capstone.embeddings.onnx_export import exported_onnx
from capstone.embeddings.onnx_model import resolve_backend
from capstone.local.corpus import reference_documents
from capstone.settings import embedding_fingerprint
from tests.support.settings import embedding_settings

pytestmark = [
    pytest.mark.local_model,
    pytest.mark.skipif(
        importlib.util.find_spec("sentence_transformers") is None
        or importlib.util.find_spec("onnxruntime") is None,
        reason="needs the [local] extra: pip install '.[local]'",
    ),
]

MODEL = "all-MiniLM-L6-v2"
ROOT = Path(__file__).resolve().parents[2]
CHUNKS = 240  # of the demo corpus's ~730: enough neighbours to tell a ranking apart, in seconds


def _backend(name: str) -> Embedder:
    return create_embedder(embedding_settings("sentence-transformers", backend=name), threads=2)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    chunks = [chunk for document in reference_documents() for chunk in document["chunks"]]
    queries = yaml.safe_load((ROOT / "benchmarks" / "search_queries.yaml").read_text())["queries"]
    return chunks[:: max(1, len(chunks) // CHUNKS)][:CHUNKS], [query["query"] for query in queries]


def test_onnx_gives_torchs_vectors_and_the_same_neighbours(corpus: tuple[list[str], list[str]]) -> None:
    chunks, queries = corpus
    torch_chunks, torch_queries = (_backend("torch").embed(texts) for texts in (chunks, queries))
    onnx_chunks, onnx_queries = (_backend("onnx").embed(texts) for texts in (chunks, queries))

    assert np.sum(torch_chunks * onnx_chunks, axis=1).min() >= 0.999
    assert np.sum(torch_queries * onnx_queries, axis=1).min() >= 0.999
    torch_top = np.argsort(-(torch_queries @ torch_chunks.T), axis=1)[:, :5]
    onnx_top = np.argsort(-(onnx_queries @ onnx_chunks.T), axis=1)[:, :5]
    assert [set(row) for row in onnx_top] == [set(row) for row in torch_top]


def test_the_backend_is_not_part_of_the_fingerprint() -> None:
    fingerprints = {
        embedding_fingerprint(embedding_settings("sentence-transformers", backend=name), "vector")
        for name in ("auto", "torch", "onnx")
    }
    assert len(fingerprints) == 1


def test_auto_runs_the_bundled_model_on_onnx_on_the_cpu() -> None:
    if Path("/dev/nvidia0").exists() or sys.platform == "darwin":
        pytest.skip("auto keeps torch where it may find a GPU")
    assert resolve_backend(embedding_settings("sentence-transformers")) == "onnx"
    assert resolve_backend(embedding_settings("sentence-transformers", device="cuda")) == "torch"
    assert resolve_backend(embedding_settings("sentence-transformers", backend="torch")) == "torch"


def test_a_task_on_onnx_never_imports_torch() -> None:
    exported_onnx(MODEL)  # as make does: the export is there before the task starts
    script = textwrap.dedent(
        """
        import json, sys
        from capstone.embeddings import create_embedder
        from tests.support.settings import embedding_settings
        embedder = create_embedder(embedding_settings("sentence-transformers"))
        vectors = embedder.embed(["a changed chunk", "another one"])
        heavy = sorted({"torch", "transformers", "sentence_transformers"} & set(sys.modules))
        print(json.dumps({"kind": type(embedder).__name__, "shape": list(vectors.shape), "heavy": heavy}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )

    assert json.loads(done.stdout.splitlines()[-1]) == {
        "kind": "OnnxEmbedder",
        "shape": [2, 384],
        "heavy": [],
    }


def test_the_export_is_made_once_per_cache_and_then_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path))

    made = exported_onnx(MODEL)
    stamp = made.stat().st_mtime_ns
    again = exported_onnx(MODEL)

    assert made.parent == tmp_path and made.name.startswith(f"{MODEL}-") and made.suffix == ".onnx"
    assert again == made and made.stat().st_mtime_ns == stamp
    assert made.stat().st_mode & 0o044 == 0o044  # other worker users on the host read it too
    assert not list(tmp_path.glob("*.partial"))


def test_without_torch_a_missing_export_says_how_to_make_one(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # a worker with the [onnx] extra only
        from capstone.embeddings import create_embedder
        from tests.support.settings import embedding_settings
        create_embedder(embedding_settings("sentence-transformers", backend="onnx"))
        """
    )
    env = {**os.environ, MODEL_CACHE_ENV: str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)

    assert done.returncode != 0
    assert "ModelNotAvailableError" in done.stderr and "python -m capstone export-model" in done.stderr
    assert str(tmp_path) in done.stderr


def test_a_model_onnx_cannot_run_stays_on_torch_and_onnx_is_refused_by_name(tmp_path: Path) -> None:
    shutil.copytree(model_path(MODEL), tmp_path / "cls-pooled")
    pooling = tmp_path / "cls-pooled" / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    pooling.write_text(
        json.dumps({**config, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True})
    )
    model = str(tmp_path / "cls-pooled")

    assert not read_layout(model).supported
    assert resolve_backend(embedding_settings("sentence-transformers", model=model, dimension=384)) == "torch"
    with pytest.raises(
        ModelNotAvailableError, match=r"backend is onnx.*pools by pooling_mode_cls_token.*torch"
    ):
        create_embedder(
            embedding_settings("sentence-transformers", model=model, dimension=384, backend="onnx")
        )


def test_a_directory_that_ships_its_own_export_uses_it(tmp_path: Path) -> None:
    shutil.copytree(model_path(MODEL), tmp_path / "shipped")
    (tmp_path / "shipped" / "onnx").mkdir()
    shutil.copy(exported_onnx(MODEL), tmp_path / "shipped" / "onnx" / "model.onnx")
    model = str(tmp_path / "shipped")

    assert onnx_file(model, read_layout(model)) == tmp_path / "shipped" / "onnx" / "model.onnx"
    embedder = create_embedder(embedding_settings("sentence-transformers", model=model, dimension=384))
    assert embedder.embed(["ships its own"]).shape == (1, 384)
