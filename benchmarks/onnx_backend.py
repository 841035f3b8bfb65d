"""The local model's two backends, as a task process pays for them: ONNX Runtime vs torch.

Each measurement is a fresh Python process that builds the provider the way an embedding task
does (``create_embedder`` with ``embedding.backend`` torch or onnx, 2 threads) and embeds the demo
corpus (the Python language reference: 733 chunks) or the four chunks of a small change; it
reports the seconds to a ready embedder (import + model load) and to encode, and the parent times
the process from spawn to exit. The backends take turns (A B B A ...), ``--rounds`` each; medians
are printed. Then the vectors are compared: ONNX Runtime's must be torch's (cosine >= 0.999 per
chunk, the same five nearest chunks for each held-out query of ``search_queries.yaml``), and so
is an int8 variant (ONNX Runtime's dynamic quantisation of the export), reported beside them.

    .venv/bin/python benchmarks/onnx_backend.py [--rounds 3] [--limit N] [--smoke]

Needs the [local] extra. The export is the one ``python -m capstone export-model`` makes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from common import BENCH_DATA, PROJECT_ROOT, machine_summary, parse_with_smoke

from capstone.embeddings.model_files import BUNDLED_MODEL
from capstone.embeddings.onnx_export import exported_onnx
from capstone.local.corpus import reference_documents

WORK = BENCH_DATA / "onnx_backend"
SMALL_CHANGE = 4
BACKENDS = ("torch", "onnx")

# One task's view: build the provider, embed, save the vectors; print seconds as JSON.
TASK = """
import json, sys, time
started = time.perf_counter()
import numpy as np
from capstone.embeddings import create_embedder
from tests.support.settings import embedding_settings
texts, backend, out, onnx_path = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
settings = embedding_settings("sentence-transformers", backend=backend)
if onnx_path:
    from capstone.embeddings.onnx_model import OnnxEmbedder
    embedder = OnnxEmbedder(model=settings.model, dimension=384, request_batch_size=64, device="cpu",
                            threads=2, onnx_path=onnx_path)
else:
    embedder = create_embedder(settings, threads=2)
ready = time.perf_counter()
vectors = embedder.embed(texts)
done = time.perf_counter()
np.save(out, vectors)
print(json.dumps({"ready": ready - started, "encode": done - ready, "kind": type(embedder).__name__}))
"""


def run_task(texts_file: Path, backend: str, out: Path, onnx_path: str = "") -> dict[str, Any]:
    """One fresh task process: its JSON report plus ``wall``, spawn to exit."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", TASK, str(texts_file), backend, str(out), onnx_path],
        cwd=PROJECT_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    return {**json.loads(done.stdout.splitlines()[-1]), "wall": time.perf_counter() - started}


def quantized(fp32: Path) -> Path:
    """The export quantised to int8 weights (dynamic: activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = WORK / f"{fp32.stem}-int8.onnx"
    if not target.is_file():
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8)
    return target


def agreement(reference: np.ndarray, other: np.ndarray, queries_ref: np.ndarray, queries: np.ndarray) -> str:
    """Cosine of each chunk's vectors, and how many queries keep the same five nearest chunks."""
    cosine = np.sum(reference * other, axis=1)
    top_ref = np.argsort(-(queries_ref @ reference.T), axis=1)[:, :5]
    top = np.argsort(-(queries @ other.T), axis=1)[:, :5]
    same = sum(set(a) == set(b) for a, b in zip(top_ref, top, strict=True))
    return (
        f"cosine min {cosine.min():.7f} mean {cosine.mean():.7f}; same top-5 for {same} of {len(top)} queries"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per backend and size")
    parser.add_argument("--limit", type=int, default=None, help="the corpus's first N chunks only")
    args = parse_with_smoke(parser, {"rounds": 1, "limit": 32}, argv)
    print(machine_summary(), flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=WORK))
    chunks = [chunk for document in reference_documents() for chunk in document["chunks"]][: args.limit]
    queries = [
        q["query"]
        for q in yaml.safe_load((Path(__file__).parent / "search_queries.yaml").read_text())["queries"]
    ]
    files = {}
    for name, texts in (("all", chunks), ("small", chunks[:SMALL_CHANGE]), ("queries", queries)):
        files[name] = scratch / f"{name}.json"
        files[name].write_text(json.dumps(texts))
    fp32 = exported_onnx(BUNDLED_MODEL)
    print(f"{len(chunks)} chunks, {len(queries)} queries; export {fp32}", flush=True)

    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for size in ("small", "all"):
        for number in range(args.rounds):
            order = ("torch", "onnx") if number % 2 == 0 else ("onnx", "torch")
            for backend in order:
                out = scratch / f"{backend}-{size}.npy"
                results.setdefault((backend, size), []).append(run_task(files[size], backend, out))
    for (backend, size), runs in results.items():
        cells = {key: statistics.median(run[key] for run in runs) for key in ("ready", "encode", "wall")}
        print(
            f"{backend:5s} {size:5s}: import+load {cells['ready']:.2f}s, encode {cells['encode']:.2f}s, "
            f"process {cells['wall']:.2f}s (median of {len(runs)})",
            flush=True,
        )
    int8 = run_task(files["all"], "onnx", scratch / "int8-all.npy", str(quantized(fp32)))
    for variant in ("onnx", "int8"):
        run_task(
            files["queries"],
            "onnx",
            scratch / f"{variant}-queries.npy",
            "" if variant == "onnx" else str(quantized(fp32)),
        )
    run_task(files["queries"], "torch", scratch / "torch-queries.npy")
    reference = np.load(scratch / "torch-all.npy"), np.load(scratch / "torch-queries.npy")
    for variant in ("onnx", "int8"):
        vectors = np.load(scratch / f"{variant}-all.npy"), np.load(scratch / f"{variant}-queries.npy")
        print(f"{variant} vs torch: {agreement(reference[0], vectors[0], reference[1], vectors[1])}")
    print(f"int8 encode {int8['encode']:.2f}s (not offered: see its agreement above)")

    def ratio(size: str) -> float:
        walls = {
            backend: statistics.median(run["wall"] for run in results[backend, size]) for backend in BACKENDS
        }
        return walls["onnx"] / walls["torch"]

    small, whole = ratio("small"), ratio("all")
    print(f"onnx / torch process, {SMALL_CHANGE}-chunk change: {small:.2f}; whole corpus: {whole:.2f}")


if __name__ == "__main__":
    main()
