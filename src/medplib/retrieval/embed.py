"""Image embeddings for retrieval: the model's own vision tower, patch features mean-pooled and
L2-normalised (image RAG as published: cosine similarity is then a dot product), plus the content hash
that tells a query image from its copies in a library."""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medplib.api import MedPLIB


def image_hash(rgb: np.ndarray) -> str:
    """Hex digest of decoded pixels: (H, W, 3) uint8 -> 32 hex characters. The same pixels give the same
    hash whatever the file name or format (a PNG copy of a PNG matches; a re-compressed JPEG does not)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    return hashlib.blake2b(rgb.tobytes(), digest_size=16, person=str(rgb.shape).encode()[:16]).hexdigest()


def tower_fingerprint(model: MedPLIB) -> str:
    """Hex digest of what decides an embedding: the vision tower's weights and its preprocessing. An index
    refuses queries from a model with another fingerprint (their vectors would not be comparable)."""
    v = model.config.vision
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((v.kind, v.image_size, v.select_layer, v.drop_cls, tuple(v.mean), tuple(v.std))).encode())
    for name, t in sorted(model.model.vision.state_dict().items()):
        h.update(name.encode())
        # reshape(-1): 0-d buffers (BatchNorm's num_batches_tracked in the EfficientNet tower) cannot be viewed as bytes
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ImageEmbedder:
    """Embeds RGB images with a MedPLIB model's vision tower: (H, W, 3) uint8 -> (D,) float32, unit norm,
    D the tower width. Padding added by the processor is pooled too, as the model sees it."""

    def __init__(self, model: MedPLIB, batch_size: int = 16):
        self.model = model
        self.batch_size = max(1, batch_size)
        self.dim = int(model.model.vision.hidden_size)
        self.fingerprint = tower_fingerprint(model)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N images (H, W, 3) uint8, any sizes -> (N, D) float32 rows of unit L2 norm."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        dtype = next(self.model.model.parameters()).dtype
        tower = self.model.model.vision
        was_training = tower.training
        tower.eval()  # batch-norm towers in training mode would make a vector depend on its batch
        try:
            for start in range(0, len(images), self.batch_size):
                chunk = images[start:start + self.batch_size]
                pixels = torch.stack([self.model.processor.prepare_image(img).vision_pixels for img in chunk])
                with torch.inference_mode():
                    feats = self.model.model.encode_vision(pixels.to(self.model.device, dtype))  # (B, N, D)
                    pooled = F.normalize(feats.float().mean(dim=1), dim=-1)
                out[start:start + len(chunk)] = pooled.cpu().numpy()
        finally:
            tower.train(was_training)
        return out
