"""Tiny random backbones of every source, for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import inca
from inca.backbones import Backbone, Preprocessing

SIZE = 32


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


def save_tiny_hf_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, image_size=SIZE, patch_size=8)
    ViTModel(config).save_pretrained(folder)
    return folder


def make_backbone(source: str, tmp_path: Path) -> Backbone:
    """A tiny random backbone of the given source, seeded."""
    torch.manual_seed(0)
    if source == "timm-vit":
        return inca.create_backbone("timm:vit_tiny_patch16_224", pretrained=False,
                                    input_size=SIZE, patch_size=8, embed_dim=32, depth=4,
                                    num_heads=2)
    if source == "timm-cnn":
        return inca.create_backbone("timm:resnet10t", pretrained=False, input_size=SIZE)
    if source == "hf":
        return inca.create_backbone(f"hf:{save_tiny_hf_vit(tmp_path / 'tiny-hf-vit')}")
    if source == "torchvision":
        return inca.create_backbone("torchvision:mobilenet_v2", pretrained=False,
                                    input_size=SIZE, width_mult=0.25)
    if source == "module":
        return inca.from_module(TinyCNN(), ["stem", "stage1", "stage2"], name="tiny-cnn",
                                preprocessing=Preprocessing(input_size=SIZE))
    raise ValueError(source)


SOURCES = ["timm-vit", "timm-cnn", "hf", "torchvision", "module"]
