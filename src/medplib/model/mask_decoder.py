"""The mask decoder: SAM's two-way transformer decoder, with the prompt-encoder parts the LLM path needs.

The `[SEG]` projection becomes the sparse prompt; the dense prompt is SAM's learned "no mask" embedding and
the image positional embedding comes from SAM's random-Fourier `pe_layer`. Parameter names mirror
segment-anything (`transformer.layers.N.self_attn.q_proj`, `iou_token`, `mask_tokens`, `output_upscaling`,
`output_hypernetworks_mlps`, `iou_prediction_head`, `pe_layer.positional_encoding_gaussian_matrix`,
`no_mask_embed.weight`) so published weights load by a plain key map (`medplib.model.sam_checkpoint`).

Only SAM's single-mask output (mask token 0) is produced, as MedPLIB uses `multimask_output=False`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medplib.config import MaskDecoderConfig
from medplib.model.common import LayerNorm2d, MLPBlock

# SAM has 3 multimask tokens + 1 single-mask token. All four attend in the transformer (so dropping the unused
# three would change mask 0); only token 0 gets a hypernetwork and an IoU output here.
NUM_MASK_TOKENS = 4


class Attention(nn.Module):
    """Multi-head attention whose internal width is `dim // downsample_rate` (2 for SAM's cross attention)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the attention width ({internal})")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (B, Nq, dim), k and v: (B, Nk, dim) -> (B, Nq, dim)."""
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        b, _, nq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, -1))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image cross attention, token MLP, image-to-token cross attention."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """queries: (B, N, dim) tokens, keys: (B, hw, dim) image; the pe tensors broadcast to them."""
        # The first layer's queries *are* the token embeddings, so SAM replaces rather than adds.
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's decoder transformer: tokens and image embeddings attend to each other, then a final token-to-image pass."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0)) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """image_embedding: (B, C, h, w), image_pe: (1 or B, C, h, w), point_embedding: (B, N, C)
        -> (tokens (B, N, C), image (B, hw, C))."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (SAM's decoder `MLP`; names `layers.N`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of normalised coordinates (SAM's prompt-encoder `pe_layer`)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        # A buffer, not a parameter: SAM never trains it, and checkpoints carry it.
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def forward(self, size: tuple[int, int]) -> Tensor:
        """size: (h, w) -> (2 * num_pos_feats, h, w), encoding the centre of each grid cell."""
        h, w = size
        gauss = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=gauss.device, dtype=gauss.dtype) + 0.5) / h
        xs = (torch.arange(w, device=gauss.device, dtype=gauss.dtype) + 0.5) / w
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        proj = 2 * math.pi * ((2 * coords - 1) @ gauss)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1).permute(2, 0, 1)


class MaskDecoder(nn.Module):
    """Image embeddings + one sparse prompt set per row -> one low-resolution mask and its predicted IoU."""

    def __init__(self, cfg: MaskDecoderConfig) -> None:
        super().__init__()
        dim = cfg.transformer_dim
        self.cfg = cfg
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.no_mask_embed = nn.Embedding(1, dim)
        self.transformer = TwoWayTransformer(cfg.depth, dim, cfg.num_heads, cfg.mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(dim, dim, dim // 8, 3)])
        self.iou_prediction_head = MLP(dim, cfg.iou_head_hidden_dim, 1, cfg.iou_head_depth)

    def image_pe(self, size: tuple[int, int]) -> Tensor:
        """Positional embedding of an (h, w) embedding grid: (1, C, h, w)."""
        return self.pe_layer(size).unsqueeze(0)

    def forward(self, image_embeddings: Tensor, sparse_prompts: Tensor) -> tuple[Tensor, Tensor]:
        """image_embeddings: (B, C, h, w), sparse_prompts: (B, N, C); row i of both is one mask query
        (repeat an image's embedding once per prompt). Returns low_res_logits (B, 1, 4h, 4w), iou_pred (B, 1)."""
        b, c, h, w = image_embeddings.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompts], dim=1)
        src = image_embeddings + self.no_mask_embed.weight.reshape(1, c, 1, 1)

        hs, src = self.transformer(src, self.image_pe((h, w)), tokens)
        iou_token_out, mask_token_out = hs[:, 0], hs[:, 1]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper = self.output_hypernetworks_mlps[0](mask_token_out)  # (B, C/8)
        masks = torch.einsum("bc,bchw->bhw", hyper, upscaled).unsqueeze(1)
        return masks, self.iou_prediction_head(iou_token_out)


def postprocess_masks(
    low_res_logits: Tensor, input_size: int, valid_hw: tuple[int, int], original_hw: tuple[int, int]
) -> Tensor:
    """Low-res logits of the padded square input -> logits at the original image size.

    low_res_logits: (B, 1, h4, w4) for the `input_size` square input, whose top-left `valid_hw` region holds the
    resized image (the rest is padding). Returns (B, 1, H, W) with (H, W) = `original_hw`. The crop happens at
    input resolution, so padding never leaks in and non-square images keep their aspect ratio.
    """
    masks = F.interpolate(low_res_logits, size=(input_size, input_size), mode="bilinear", align_corners=False)
    masks = masks[..., : valid_hw[0], : valid_hw[1]]
    return F.interpolate(masks, size=tuple(original_hw), mode="bilinear", align_corners=False)
