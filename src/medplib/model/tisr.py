"""TISR for report generation (a plug-in, `MedPLIBConfig.tisr`): the image as a few pseudo-words in the LLM's
word-embedding space (textual inversion), refined by an image-text contrastive loss against the report's
text embedding (self-supervised refinement).

Textual inversion (`TextualInversion`): K learned queries attention-pool the vision patch features
(B, N, Dv) into K vectors, a Linear maps each into the LLM's width, and each becomes a soft choice over the
vocabulary: softmax(q . unit(E)^T) E, with E the LLM's input word-embedding matrix (V, H). Why a soft
attention over E rather than a free projection with a norm penalty: a convex combination of word rows lies
inside the span, and within the norm range, of real word embeddings by construction, whatever the
training does, so no penalty weight has to be tuned and nothing can drift into a region of the input
space the LLM never saw. At initialisation the attention is near uniform, so a pseudo-word starts at the
mean word, and the queries' scale learns how sharp the choice is.
E is read detached: the vocabulary defines the space and TISR only reads it; the word rows keep
training through the LLM's own loss when a recipe trains them.

The pseudo-words share the `<image>` id and fill the last K slots of the query image's span
(`MedPLIBConfig.num_query_tokens`), so the vocabulary, the processor's rules and every model without
TISR stay as they are, and generation inserts them exactly as training does.

Refinement (`contrastive_loss`): symmetric InfoNCE over the batch between each image's mean pseudo-word
and its report's text embedding, the mean of the LLM's own input embeddings of the answer tokens
(no extra text encoder). Both sides are in the word-embedding space, so they are
compared by cosine directly, with no projection head: the loss moves the pseudo-words towards the words
of their own report and away from the other reports of the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medplib.config import TISRConfig
from medplib.model.losses import IGNORE_INDEX


class TextualInversion(nn.Module):
    """Vision features -> K pseudo-word embeddings in the LLM's word-embedding space.

    forward(vision_feats (B, N, Dv), vocab (V, H) the input word embeddings) -> (B, K, H)."""

    def __init__(self, cfg: TISRConfig, vision_dim: int, hidden: int, blocked: tuple[int, ...] = ()):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim)
        # Near zero: each query starts as mean pooling over the patches.
        self.queries = nn.Parameter(torch.randn(cfg.tokens, vision_dim) * 0.02)
        self.to_word = nn.Linear(vision_dim, hidden)
        # Rows that are never words (placeholders the model overwrites): a pseudo-word never draws on them.
        self.blocked = tuple(blocked)

    def forward(self, vision_feats: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        x = self.norm(vision_feats.to(self.queries.dtype))  # (B, N, Dv)
        att = torch.softmax(torch.einsum("kd,bnd->bkn", self.queries, x) / math.sqrt(x.shape[-1]), dim=-1)
        q = self.to_word(att @ x)  # (B, K, H)
        vocab = vocab.detach()
        # Keys are the word directions (unit rows), values the rows themselves: how sharp the choice is then
        # depends on the queries alone, not on the embedding scale (0.02-std random rows in a from-scratch
        # LLM, where raw dot products would leave the attention uniform and its gradient vanishing).
        logits = (q.float() @ F.normalize(vocab.float(), dim=-1).T)  # (B, K, V)
        if self.blocked:
            logits[..., list(self.blocked)] = float("-inf")
        return torch.softmax(logits, dim=-1).to(vocab.dtype) @ vocab  # (B, K, H)


def answer_words(input_ids: torch.Tensor, labels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Which tokens are the report: the labelled answer tokens, the end-of-answer token left out.
    input_ids, labels (B, T) -> (B, T) bool."""
    return (labels != IGNORE_INDEX) & (input_ids != eos_id)


def contrastive_loss(pseudo_words: torch.Tensor, token_emb: torch.Tensor, input_ids: torch.Tensor,
                     words: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between each row's pooled pseudo-words and its report's text embedding, over the
    rows that have a report (`words` holds at least one token).

    pseudo_words (B, K, H); token_emb (B, T, H) the LLM's input embeddings of the sequence (the text side is
    their mean over `words`, detached: the target the pseudo-words move towards, not a thing to move);
    input_ids, words (B, T). Rows whose reports are the same token sequence are each other's positives,
    not negatives (phantoms repeat normal reports). Fewer than two rows with a report: there is no pair to
    contrast, and the loss is a zero that keeps the graph (every TISR gradient exactly 0, never NaN or
    missing), so batch 1 and inference are safe; a batch of identical reports gives 0 as well.
    Returns a scalar."""
    rows = torch.nonzero(words.any(dim=1), as_tuple=True)[0]
    if rows.numel() < 2:
        return pseudo_words.sum() * 0.0
    w = words[rows]
    text = (token_emb[rows].detach().float() * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True)  # (n, H)
    img = F.normalize(pseudo_words[rows].float().mean(dim=1), dim=-1)  # (n, H)
    logits = img @ F.normalize(text, dim=-1).T / temperature  # (n, n)
    keys = [tuple(ids[m].tolist()) for ids, m in zip(input_ids[rows], w)]
    same = torch.tensor([[a == b for b in keys] for a in keys], device=logits.device)  # (n, n), diagonal True
    pos = logits.masked_fill(~same, float("-inf"))
    # -log(the positives' share of the probability), image -> text and text -> image.
    i2t = torch.logsumexp(logits, dim=1) - torch.logsumexp(pos, dim=1)
    t2i = torch.logsumexp(logits, dim=0) - torch.logsumexp(pos, dim=0)
    return (i2t.mean() + t2i.mean()) / 2
