"""A small Vision Transformer whose MLP in the last ``moe_layers`` blocks is any kind from :mod:`lmlab.moe.layers`.

Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words" (arXiv 2010.11929): non-overlapping patch embedding,
learned position embeddings, pre-norm blocks (x + MHSA(LN x); x + MLP(LN x)), final LayerNorm and a linear
head. Shapes: B batch, T = (image_size / patch_size)^2 patches, D width.

Deviations: global average pooling over patches instead of a [CLS] token (the Soft MoE paper's ViTs use a
MAP head, also without [CLS]; average pooling keeps every token a patch, which Soft MoE's slots assume).
MoE in the *last* n blocks follows the Soft MoE paper's "MoE in the second half of the layers" (Sec. 3.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.errors import ConfigError
from lmlab.moe.experts import MoEOutput
from lmlab.moe.layers import MoEConfig, build_mlp


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28  # Fashion-MNIST
    patch_size: int = 4  # 7 x 7 = 49 patches
    channels: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_hidden: int = 256  # 4 * dim, ViT's MLP ratio; each expert has this hidden width too
    moe: MoEConfig | None = None  # the MLP of the last `moe_layers` blocks (None: dense everywhere)
    moe_layers: int = 0
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("image_size", "patch_size", "channels", "num_classes", "dim", "depth", "heads", "mlp_hidden"):
            if getattr(self, name) < 1:  # checked first: a zero patch_size or heads would divide by zero below
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ConfigError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if not 0 <= self.moe_layers <= self.depth:
            raise ConfigError(f"moe_layers must be in [0, depth={self.depth}], got {self.moe_layers}")
        if isinstance(self.moe, dict):  # from JSON
            object.__setattr__(self, "moe", MoEConfig(**self.moe))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ViTOutput:
    logits: Tensor  # (B, num_classes)
    aux_loss: Tensor  # sum of the MoE layers' auxiliary losses (already weighted)
    mlp_outputs: list[MoEOutput] = field(default_factory=list)  # one per block, first to last


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, config: ViTConfig, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config.dim, config.heads, config.dropout)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = mlp

    def forward(self, x: Tensor) -> tuple[Tensor, MoEOutput]:
        x = x + self.attn(self.norm1(x))
        out = self.mlp(self.norm2(x))
        return x + out.y, out


class ViT(nn.Module):
    """``ViT(ViTConfig(moe=MoEConfig(kind="soft"), moe_layers=2))(images (B, C, H, W)) -> ViTOutput``."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, c.num_patches, c.dim) * 0.02)
        first_moe = c.depth - c.moe_layers
        self.blocks = nn.ModuleList(
            Block(c, build_mlp(c.moe if i >= first_moe else None, c.dim, hidden=c.mlp_hidden,
                               num_tokens=c.num_patches))
            for i in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)

    def collapsed_config(self) -> ViTConfig:
        """The config of this model after :func:`lmlab.moe.ewa.collapse_experts` (dense everywhere)."""
        return dataclasses.replace(self.config, moe=None, moe_layers=0)

    def forward(self, images: Tensor) -> ViTOutput:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        aux = x.new_zeros(())
        outs = []
        for block in self.blocks:
            x, out = block(x)
            aux = aux + out.aux_loss
            outs.append(out)
        logits = self.head(self.norm(x).mean(1))  # global average pooling
        return ViTOutput(logits=logits, aux_loss=aux, mlp_outputs=outs)
