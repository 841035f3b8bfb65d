"""The ``hash`` provider: deterministic, offline lexical vectors for tests and fast demos.

Signed feature hashing (the "hashing trick") of lower-cased word stems and stem bigrams: each
feature lands in one of ``dimension`` buckets with a +1 or -1 sign taken from a stable digest, so
texts that share words share buckets and end up close in cosine distance. It knows no synonyms:
"anonymous function" does not find "lambda". Use a real model when meaning matters.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence

import numpy as np

from capstone.embeddings.base import l2_normalize, no_vectors
from capstone.settings import DEFAULT_MODELS

__all__ = ["HashEmbedder"]

_TOKEN = re.compile(r"\w+")
# English function words that carry no topic. Words that are also Python keywords (in, is, for,
# with, and, or, not, as, from, if, ...) are kept on purpose: in code docs they *are* the topic.
_STOP_WORDS_TEXT = """
    a an the i me my we our you your he she they them their it its this that these those
    do does did doing done how what when where which who whom why can could should would will
    shall may might must be been being am are was were has have had having of on at by to about
    than then there so some such very just also any
"""
_STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
# Suffixes stripped so that inflections share a feature: handle/handles/handled/handling -> "handl".
_SUFFIXES = ("ing", "ed", "es", "s")
_MIN_STEM = 3
# Texts with no words get this one feature, so every row has unit length under normalisation
# (an all-zero vector has no cosine distance: pgvector returns NaN for it).
_EMPTY_TEXT_FEATURE = "\x00empty"
# Texts vectorised per np.bincount call: bounds the float64 scratch array to ~12 MB at 384-d.
_BLOCK_TEXTS = 4096
# The caches grow with the vocabulary; starting over past this size bounds a worker's memory.
_MAX_CACHED_FEATURES = 2_000_000


def _stem(token: str) -> str:
    """A crude suffix stripper; stop words map to "" so they can be filtered out."""
    if token in _STOP_WORDS:
        return ""
    for suffix in _SUFFIXES:
        # "ss" is not a plural: process/processes and class/classes must meet at the same stem.
        if token.endswith(suffix) and len(token) - len(suffix) >= _MIN_STEM and not token.endswith("ss"):
            token = token[: -len(suffix)]
            break
    return token[:-1] if token.endswith("e") and len(token) > _MIN_STEM else token


class _StemCache(dict[str, str]):
    """token -> stem, computed once per distinct token (the corpus repeats its words a lot)."""

    def __missing__(self, token: str) -> str:
        if len(self) > _MAX_CACHED_FEATURES:
            self.clear()
        stem = self[token] = _stem(token)
        return stem


class _FeatureCodes(dict[str, int]):
    """feature -> ``bucket * 2 + sign_bit``, from a blake2b digest (Python's hash() is salted per process)."""

    def __init__(self, dimension: int) -> None:
        super().__init__()
        self.dimension = dimension

    def __missing__(self, feature: str) -> int:
        if len(self) > _MAX_CACHED_FEATURES:
            self.clear()
        digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        # Bucket from the low bits, sign from the top bit, so the two are independent.
        code = self[feature] = (digest % self.dimension) * 2 + (digest >> 63)
        return code


class HashEmbedder:
    """Deterministic lexical embeddings: same text, same vector, in any process on any machine."""

    provider = "hash"
    max_input_chars: int | None = None

    def __init__(
        self, *, dimension: int, model: str = DEFAULT_MODELS["hash"][0], normalize: bool = True
    ) -> None:
        self.model = model
        self.dimension = dimension
        self.normalize = normalize
        self._stems = _StemCache()
        self._codes = _FeatureCodes(dimension)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in order; L2-normalised rows when ``normalize``."""
        texts = list(texts)
        if not texts:
            return no_vectors(self.dimension)
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), _BLOCK_TEXTS):
            block = texts[start : start + _BLOCK_TEXTS]
            vectors[start : start + len(block)] = self._embed_block(block)
        return l2_normalize(vectors) if self.normalize else vectors

    def _embed_block(self, texts: list[str]) -> np.ndarray:
        """Sum the signed features of each text into its row with one ``np.bincount``."""
        codes_per_text = [self._feature_codes(text) for text in texts]
        counts = np.fromiter(map(len, codes_per_text), dtype=np.int64, count=len(texts))
        all_codes = itertools.chain.from_iterable(codes_per_text)
        codes = np.fromiter(all_codes, dtype=np.int64, count=int(counts.sum()))
        rows = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
        cells = rows * self.dimension + (codes >> 1)
        signs = 1.0 - 2.0 * (codes & 1)
        flat = np.bincount(cells, weights=signs, minlength=len(texts) * self.dimension)
        return flat.reshape(len(texts), self.dimension)

    def _feature_codes(self, text: str) -> list[int]:
        """Codes of the text's stems and stem bigrams (bigrams reward matching phrases, not just words)."""
        stems = [stem for stem in map(self._stems.__getitem__, _TOKEN.findall(text.lower())) if stem]
        features = stems + list(map(" ".join, itertools.pairwise(stems))) or [_EMPTY_TEXT_FEATURE]
        return list(map(self._codes.__getitem__, features))
