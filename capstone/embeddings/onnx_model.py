"""The local model on ONNX Runtime: sentence-transformers' vectors without importing torch.

A task that embeds four changed chunks with torch pays ~4 s to import it and ~0.3 s to load the
model before 0.1 s of work; with ONNX Runtime the import is ~0.1 s and the load ~0.2 s. This module
redoes what sentence-transformers does for a model that mean-pools a Transformer (the bundled
all-MiniLM-L6-v2 does): the model's own ``tokenizer.json`` truncating at ``max_seq_length``, the
exported Transformer, mean pooling over the attention mask, L2 normalisation. Texts are encoded in
order of length, as sentence-transformers does, so a forward pass pads little. Its vectors are
torch's to a cosine of 0.9999998 (``tests/integration/test_onnx_model.py``).

The model's ONNX export is made once per host by :mod:`capstone.embeddings.onnx_export` (``python
-m capstone export-model``, which ``make`` runs; a task finding none exports it where torch is
installed). ``embedding.backend`` chooses: see :func:`resolve_backend`. Needs ``onnxruntime`` and
``tokenizers`` (the ``[local]`` extra; ``[onnx]`` alone for workers that never run torch).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from capstone.embeddings.base import no_vectors
from capstone.embeddings.errors import EmbeddingDimensionError, MissingExtraError, ModelNotAvailableError
from capstone.embeddings.model_files import CHARS_PER_TOKEN, ModelLayout, model_path, onnx_file, read_layout
from capstone.settings import EmbeddingSettings

__all__ = ["OnnxEmbedder", "resolve_backend"]

log = logging.getLogger(__name__)

# Loaded sessions per process: (file, threads, execution provider) -> session, tokenizer.
_SESSIONS: dict[tuple[str, int, str], tuple[Any, Any]] = {}
_SESSIONS_LOCK = threading.Lock()


def resolve_backend(embedding: EmbeddingSettings) -> Literal["torch", "onnx"]:
    """What runs the local model: ``embedding.backend`` when it names one; for ``auto``, ONNX
    Runtime where it is installed, the model's pipeline is one it can run, and the device is the CPU
    (``auto`` on a host with an NVIDIA GPU or on macOS, where torch would find CUDA or MPS, stays on
    torch; install ``onnxruntime-gpu`` and set ``backend: onnx`` to run ONNX on CUDA)."""
    if embedding.backend != "auto":
        return embedding.backend
    if embedding.device not in ("auto", "cpu") or not _onnxruntime_installed():
        return "torch"
    if embedding.device == "auto" and (sys.platform == "darwin" or Path("/dev/nvidia0").exists()):
        return "torch"
    layout = read_layout(model_path(embedding.model))
    if not layout.supported:
        log.info("model %r runs on torch: ONNX Runtime cannot run it (%s)", embedding.model, layout.why_not)
        return "torch"
    return "onnx"


def _onnxruntime_installed() -> bool:
    """Whether ``import onnxruntime`` would work, without importing it."""
    if "onnxruntime" in sys.modules:  # imported, or blocked with None
        return sys.modules["onnxruntime"] is not None
    return importlib.util.find_spec("onnxruntime") is not None


class OnnxEmbedder:
    """Embeds with a local sentence-transformers model on ONNX Runtime; ``dimension`` must match."""

    provider = "sentence-transformers"

    def __init__(
        self,
        *,
        model: str,
        dimension: int,
        normalize: bool = True,
        request_batch_size: int,
        device: str,
        threads: int | None = None,
        onnx_path: Path | None = None,
    ) -> None:
        """``onnx_path``: a file to run instead of the model's export on this host (not cached)."""
        self.model = model
        self.dimension = dimension
        self.request_batch_size = request_batch_size
        layout = read_layout(model_path(model))
        if not layout.supported:
            raise ModelNotAvailableError(
                f"embedding.backend is onnx, but ONNX Runtime cannot run model {model!r}: {layout.why_not}. "
                "Set embedding.backend to torch (or auto)"
            )
        self.normalize = normalize or layout.normalizes
        execution = _execution_provider(device)
        self.device = "cuda" if execution.startswith("CUDA") else "cpu"
        if onnx_path is None:
            self._session, self._tokenizer = _load(model, layout, threads or 0, execution)
        else:
            self._session, self._tokenizer = _session(onnx_path, threads or 0, execution), _tokenizer(layout)
        width = self._session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != dimension:
            raise EmbeddingDimensionError(self.provider, model, actual=width, configured=dimension)
        self._inputs = {node.name for node in self._session.get_inputs()}
        self.max_input_chars: int | None = layout.max_seq_length * CHARS_PER_TOKEN

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in order, ``request_batch_size`` texts of similar length per forward pass."""
        if len(texts) == 0:  # not `not texts`: a numpy array of strings has no truth value
            return no_vectors(self.dimension)
        encodings = self._tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
        vectors = np.empty((len(encodings), self.dimension), dtype=np.float32)
        for start in range(0, len(order), self.request_batch_size):
            rows = order[start : start + self.request_batch_size]
            vectors[rows] = self._forward([encodings[i].ids for i in rows])
        return vectors

    def _forward(self, token_ids: list[list[int]]) -> np.ndarray:
        """Mean-pooled (and normalised) vectors of texts already tokenised, padded to the longest."""
        ids = np.zeros((len(token_ids), max(len(row) for row in token_ids)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(token_ids):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)  # one sentence per input: segment 0
        hidden = self._session.run(None, feed)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self.normalize:
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled.astype(np.float32, copy=False)


def _execution_provider(device: str) -> str:
    """ONNX Runtime's execution provider for ``embedding.device``."""
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingExtraError("sentence-transformers", "onnxruntime (embedding.backend: onnx)") from err
    if device in ("auto", "cpu"):
        return "CPUExecutionProvider"
    if device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return "CUDAExecutionProvider"
    raise ModelNotAvailableError(
        f"embedding.device is {device!r}, which this host's ONNX Runtime cannot run on (it has "
        f"{', '.join(onnxruntime.get_available_providers())}): install onnxruntime-gpu for cuda, or set "
        "embedding.backend to torch"
    )


def _load(model: str, layout: ModelLayout, threads: int, execution: str) -> tuple[Any, Any]:
    """The ONNX Runtime session and tokenizer of ``model``, cached per process; the export is made
    first where this host has none."""
    path = onnx_file(model, layout)
    with _SESSIONS_LOCK:
        key = (str(path), threads, execution)
        if key not in _SESSIONS:
            if not path.is_file():
                from capstone.embeddings.onnx_export import export_onnx

                export_onnx(model, path)
            started = time.perf_counter()
            _SESSIONS[key] = (_session(path, threads, execution), _tokenizer(layout))
            took = time.perf_counter() - started
            log.info("loaded %r on ONNX Runtime (%s, %s) in %.1fs", model, execution, path.name, took)
        return _SESSIONS[key]


def _session(path: Path, threads: int, execution: str) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
    return onnxruntime.InferenceSession(str(path), options, providers=[execution])


def _tokenizer(layout: ModelLayout) -> Any:
    """The model's fast tokenizer, truncating at ``max_seq_length`` and not padding (``embed`` pads
    each forward pass to its longest text)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(layout.directory / "tokenizer.json"))
    # tokenizer.json of all-MiniLM-L6-v2 says truncate and pad to 128; sentence-transformers
    # truncates at max_seq_length (256) and pads per batch.
    tokenizer.enable_truncation(max_length=layout.max_seq_length)
    tokenizer.no_padding()
    return tokenizer
