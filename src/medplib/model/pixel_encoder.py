"""The pixel encoder: SAM's ViT image encoder, optionally with SAM-Med2D adapters.

Parameter names mirror segment-anything / SAM-Med2D (`patch_embed.proj`, `pos_embed`,
`blocks.N.attn.qkv`, `blocks.N.Adapter.*`, `neck.0..3`, ...) so that published SAM, SAM-Med2D and
MedSAM weights load by a plain key map (`medplib.model.sam_checkpoint`).

Tokens travel through the blocks channels-last, (B, H, W, C), as in SAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medplib.config import PixelEncoderConfig
from medplib.model.common import LayerNorm2d, MLPBlock

# SAM builds its encoder norms with eps=1e-6; SAM-Med2D's adapter norm keeps the LayerNorm default.
_VIT_NORM_EPS = 1e-6


class Adapter(nn.Module):
    """SAM-Med2D's adapter: a channel-attention scale, then a down/up spatial branch, a skip, a LayerNorm."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )
        self.norm = nn.LayerNorm(dim)
        # SAM-Med2D's initialisation: the adapter is trained from scratch on top of frozen SAM weights.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        h, w = x.shape[1:3]
        x = x.permute(0, 3, 1, 2)
        scale = self.channel(x.mean(dim=(2, 3)))[:, :, None, None]
        # On an odd grid the stride-2 round trip gives one row/column more; SAM-Med2D only ran even grids.
        spatial = self.spatial(x * scale)[:, :, :h, :w]
        return self.norm((x + spatial).permute(0, 2, 3, 1))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: one strided conv (SAM's name `patch_embed.proj`)."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, S, S) -> (B, S/p, S/p, C), channels-last."""
        return self.proj(x).permute(0, 2, 3, 1)


def _rel_pos_for(size: int, rel_pos: Tensor) -> Tensor:
    """Relative position embeddings for every (query, key) pair along one axis.

    rel_pos: (L, head_dim), L = 2 * trained_size - 1 -> (size, size, head_dim). A table trained for another
    size is resized linearly, as SAM does.
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T.unsqueeze(0), size=length, mode="linear", align_corners=False)[0].T
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative position embeddings (MViTv2)."""

    def __init__(self, dim: int, num_heads: int, use_rel_pos: bool, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, HW, head_dim)
        bias = None
        if self.use_rel_pos:
            r_q = q.reshape(b, self.num_heads, h, w, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, _rel_pos_for(h, self.rel_pos_h))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, _rel_pos_for(w, self.rel_pos_w))
            # (B, heads, H, W, kH, kW) flattened to the (B, heads, HW, HW) additive attention bias.
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> windows (B * nW, ws, ws, C) and the zero-padded size (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Windows (B * nW, ws, ws, C) -> (B, H, W, C), dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


class Block(nn.Module):
    """ViT block: (windowed or global) attention, then MLP with the optional adapter in parallel (SAM-Med2D)."""

    def __init__(self, cfg: PixelEncoderConfig, window_size: int) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=_VIT_NORM_EPS)
        attn_size = (window_size, window_size) if window_size else (cfg.grid, cfg.grid)
        self.attn = Attention(dim, cfg.num_heads, cfg.use_rel_pos, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=_VIT_NORM_EPS)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio))
        self.Adapter = Adapter(dim, cfg.adapter_ratio) if cfg.adapter else None  # SAM-Med2D's attribute name

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size:
            hw = (x.shape[1], x.shape[2])
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        x_norm = self.norm2(x)
        out = x + self.mlp(x_norm)
        if self.Adapter is not None:
            out = out + self.Adapter(x_norm)
        return out


class PixelEncoder(nn.Module):
    """SAM ViT image encoder: pixels -> dense image embeddings for the mask decoder."""

    def __init__(self, cfg: PixelEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, dim = cfg.patch_size, cfg.embed_dim
        self.patch_embed = PatchEmbed(p, dim)
        # SAM zero-initialises pos_embed (it is always loaded); a small random init lets it train from scratch.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels: (B, 3, S, S) normalised, S = cfg.image_size -> embeddings (B, out_chans, S/p, S/p).

        Other sizes that are a multiple of the patch size also work: pos_embed is resized bicubically and the
        relative position tables linearly, as SAM does.
        """
        x = self.patch_embed(pixels)
        pos = self.pos_embed
        if pos.shape[1:3] != x.shape[1:3]:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        x = x + pos
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))
