"""Export a local sentence-transformers model to ONNX, once per host, verified against torch.

The Transformer of the model (its ``last_hidden_state``, dynamic batch and sequence axes, opset
17) is exported with torch's TorchScript-based exporter, offline, from the files the model ships.
Before the file is put in place, a few texts are embedded both ways: the export is refused unless
every vector is within a cosine of 0.9999 of sentence-transformers' own. The file is written next
to its final name and renamed, under a lock, so tasks starting together on one host export once
and never read half a file.

Needs torch, transformers and onnx (the ``[local]`` extra). ``python -m capstone export-model``
runs it ahead of time (``make`` does, and a worker image should); a task finding no export runs it
on first use (~5 s).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from capstone.embeddings.errors import MissingExtraError, ModelNotAvailableError
from capstone.embeddings.model_files import MODEL_CACHE_ENV, model_path, onnx_file, read_layout

__all__ = ["export_onnx", "exported_onnx"]

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
_CHECK_TEXTS = (
    "Postgres keeps the vectors; pgvector's HNSW index finds the nearest ones.",
    "a",
    "Airflow schedules the DAG when its upstream asset is updated. " * 40,  # past max_seq_length
)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def exported_onnx(model: str) -> Path:
    """The ONNX export of ``model`` on this host, made now if there is none yet."""
    layout = read_layout(model_path(model))
    if not layout.supported:
        raise ModelNotAvailableError(f"ONNX Runtime cannot run model {model!r}: {layout.why_not}")
    path = onnx_file(model, layout)
    if not path.is_file():
        export_onnx(model, path)
    return path


def export_onnx(model: str, target: Path) -> Path:
    """Export ``model`` to ``target`` unless another process did while this one waited its turn."""
    try:
        import torch  # noqa: F401
    except ImportError as err:
        raise ModelNotAvailableError(
            f"there is no ONNX export of {model!r} at {target}, and this host has no torch to make one: "
            "run `python -m capstone export-model` where the [local] extra is installed and copy the file "
            f"there (or set ${MODEL_CACHE_ENV} to a directory holding it), or install the [local] extra "
            "on this host"
        ) from err
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        started = time.perf_counter()
        log.info("exporting %r to ONNX at %s (once per host; later tasks reuse it)", model, target)
        scratch = Path(tempfile.mkstemp(dir=target.parent, suffix=".onnx.partial")[1])
        try:
            transformer = _load_transformer(model)
            with warnings.catch_warnings():  # the tracer's notes on code paths it fixes: expected
                warnings.simplefilter("ignore")
                _export(transformer, scratch)
            _verify(model, scratch)
            scratch.chmod(0o644)  # readable by every worker user on the host, as the cache is
            os.replace(scratch, target)
        finally:
            scratch.unlink(missing_ok=True)
        log.info("exported %r to ONNX in %.1fs", model, time.perf_counter() - started)
    return target


def _load_transformer(model: str) -> object:
    os.environ["HF_HUB_OFFLINE"] = "1"  # read before transformers' first import: never download
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # a progress bar is noise in a task log
    try:
        from transformers import AutoModel
    except ImportError as err:
        raise MissingExtraError(
            "sentence-transformers", "torch and transformers to export the model to ONNX"
        ) from err
    # The eager attention exports as plain MatMul/Softmax nodes that ONNX Runtime fuses itself.
    return AutoModel.from_pretrained(
        model_path(model), local_files_only=True, attn_implementation="eager"
    ).eval()


def _export(transformer: object, path: Path) -> None:
    import torch

    class LastHiddenState(torch.nn.Module):
        """The Transformer's token vectors as a plain tensor (the exporter refuses ModelOutput)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    axes = {name: {0: "batch", 1: "sequence"} for name in (*_INPUTS, "last_hidden_state")}
    with torch.no_grad():
        torch.onnx.export(
            LastHiddenState(transformer).eval(),  # type: ignore[arg-type]
            (ids, mask, torch.zeros_like(ids)),
            str(path),
            dynamo=False,  # the dynamo exporter needs onnxscript and fails on this model offline
            opset_version=17,
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
        )


def _verify(model: str, path: Path) -> None:
    """Refuse an export whose vectors are not sentence-transformers' own."""
    from capstone.embeddings.local_model import load_sentence_transformer
    from capstone.embeddings.onnx_model import OnnxEmbedder

    reference = load_sentence_transformer(model).encode(
        list(_CHECK_TEXTS), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    candidate = OnnxEmbedder(
        model=model, dimension=reference.shape[1], request_batch_size=8, device="cpu", onnx_path=path
    )
    exported = candidate.embed(_CHECK_TEXTS)
    cosine = float(np.min(np.sum(reference * exported, axis=1)))
    if cosine < MIN_COSINE:
        raise ModelNotAvailableError(
            f"the ONNX export of {model!r} does not reproduce sentence-transformers' vectors (cosine "
            f"{cosine:.6f} < {MIN_COSINE}): set embedding.backend to torch for this model"
        )
