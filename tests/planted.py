"""A planted backbone for tests: the label (image brightness) lives in known layers
(``stem``, ``block1``) and is washed out of the later ones, so a bank must pick them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import inca
from inca.backbones import Preprocessing
from inca.data import ArrayDataset

D, PATCH, SIZE, CLASSES = 16, 4, 16, 4


class PlantedNet(nn.Module):
    """The label (image brightness) is linear in ``stem``/``block1`` and gone after ``wash``.

    Brightness moves every stem token along one direction ``v``; ``wash`` projects the
    tokens onto v's orthogonal complement, so what is left depends on the noise alone.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Conv2d(3, D, PATCH, stride=PATCH)
        self.block1 = nn.Conv2d(D, D, 1)
        self.wash = nn.Conv2d(D, D, 1)
        self.block3 = nn.Conv2d(D, D, 1)
        with torch.no_grad():
            for m in (self.stem, self.block1, self.wash, self.block3):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel()**.5)
                m.bias.zero_()
            a = self.block1.weight[:, :, 0, 0] * 0.3
            self.block1.weight[:, :, 0, 0] = torch.eye(D) + a  # linear residual block
            v = (torch.eye(D) + a) @ self.stem.weight.sum((1, 2, 3))  # brightness direction
            v = v / v.norm()
            rot = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
            self.wash.weight[:, :, 0, 0] = rot @ (torch.eye(D) - torch.outer(v, v))

    def forward(self, x):
        return self.block3(self.wash(self.block1(self.stem(x))))


def planted_data(n: int, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    rng.shuffle(y)
    base = (0.3 + 0.13 * y)[:, None, None]
    img = np.clip(base + rng.normal(0, 0.12, (n, SIZE, SIZE)), 0, 1)
    return ArrayDataset((img * 255).astype(np.uint8), y, [f"c{i}" for i in range(CLASSES)],
                        f"planted-{seed}")


def planted_backbone(seed: int = 0):
    return inca.from_module(PlantedNet(seed), ["stem", "block1", "wash", "block3"],
                            name="planted", preprocessing=Preprocessing(
                                input_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3))
