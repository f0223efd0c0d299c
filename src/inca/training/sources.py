"""Where the bank's inputs come from: the activation cache, or the live backbone.

Both sources yield ``({layer: tokens (B, N, D)}, labels (B,))`` batches in the same order
for the same seed, so the bank trains identically on either (up to the cache's fp16
rounding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from inca._precision import Precision
from inca.backbones.base import Backbone
from inca.features import ActivationCache, extract_features

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class StackedFeats(dict):
    """``{layer: (B, N, D)}`` whose tensors are slices of one block ``(L, B, N, D)``.

    Sources that can gather every layer at once return this, so that stacked adapters read
    the block as it is instead of stacking the layers again at every step.
    """

    def __init__(self, block: torch.Tensor, layers: list[str]) -> None:
        super().__init__(zip(layers, block.unbind(0), strict=True))
        self.block = block
        self.order = list(layers)


def _order(n: int, shuffle: bool, generator: torch.Generator | None) -> np.ndarray:
    if shuffle:
        return torch.randperm(n, generator=generator).numpy()
    return np.arange(n)


class CachedSource:
    """Batches of tokens read from an activation cache (no backbone cost).

    When the selected samples' tokens fit in ``preload_bytes`` they are read once into
    memory (on ``device``, in the cache's dtype) and batches are gathered there; otherwise
    every batch is read from the memory-mapped shards.

    Args:
        cache: a complete cache.
        indices: which of its samples form this source (e.g. the train split).
        layers: layers to read.
        device: where batches go.
        preload_bytes: largest token volume held in memory (default 4 GiB), in fp32 when
            it fits, else in the cache's dtype.
    """

    def __init__(self, cache: ActivationCache, indices: Sequence[int], layers: list[str],
                 device: torch.device | str = "cpu", preload_bytes: int = 4 << 30) -> None:
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.layers = layers
        self.device = torch.device(device)
        self.labels = torch.from_numpy(cache.labels[self.indices]).long()
        count = sum(np.prod(cache.token_shape(k)) for k in layers) * len(self)
        self._tokens: dict[str, torch.Tensor] | None = None
        self._block: torch.Tensor | None = None  # (L, M, N, D) when every layer has one shape
        # Converting fp16 to fp32 costs as much as a bank's forward on CPU: do it once, at
        # load, when fp32 fits; else hold the cache's dtype and convert each batch.
        dtype = None
        if count * 4 <= preload_bytes:
            dtype = torch.float32
        elif count * np.dtype(cache.manifest["dtype"]).itemsize <= preload_bytes:
            dtype = getattr(torch, cache.manifest["dtype"])
        if dtype is not None:
            self._tokens = {k: torch.from_numpy(cache.get_numpy(k, self.indices))
                            .to(self.device, dtype) for k in layers}
            if len({cache.token_shape(k) for k in layers}) == 1:
                self._block = torch.stack([self._tokens.pop(k) for k in layers])

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        order = _order(len(self), shuffle, generator)
        for start in range(0, len(order), batch_size):
            pos = order[start:start + batch_size]
            if self._block is not None:  # every layer gathered into one block
                p = torch.from_numpy(pos).to(self.device)
                block = self._block.new_empty((len(self.layers), len(pos),
                                               *self._block.shape[2:]))
                for i in range(len(self.layers)):  # row gathers: far faster than block[:, p]
                    torch.index_select(self._block[i], 0, p, out=block[i])
                feats: dict[str, torch.Tensor] = StackedFeats(block.float(), self.layers)
            elif self._tokens is not None:
                p = torch.from_numpy(pos).to(self.device)
                feats = {k: v[p].float() for k, v in self._tokens.items()}
            else:
                idx = self.indices[pos]
                feats = {k: self.cache.get(k, idx, device=self.device) for k in self.layers}
            yield feats, self.labels[pos].to(self.device)


class StreamingSource:
    """Batches of tokens computed live by the backbone, one pass for every layer.

    Args:
        backbone: the frozen backbone.
        dataset: yields ``(image, label)``.
        indices: which samples form this source.
        layers: layers to extract.
        transform: image -> tensor (with augmentation for training if wanted).
        token_grid: pool patch tokens as the cache would.
        num_workers: DataLoader workers decoding images.
        precision: autocast of the backbone pass.
    """

    def __init__(self, backbone: Backbone, dataset: Any, indices: Sequence[int],
                 layers: list[str], transform: Any, token_grid: int | None = None,
                 num_workers: int = 0, precision: Precision | None = None) -> None:
        from inca.data import TransformedDataset

        self.backbone = backbone
        self.data = TransformedDataset(dataset, transform)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.layers = layers
        self.token_grid = token_grid
        self.num_workers = num_workers
        self.precision = precision or Precision("32", backbone.device)
        targets = np.asarray(dataset.targets)
        self.labels = torch.from_numpy(targets[self.indices]).long()

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        order = self.indices[_order(len(self), shuffle, generator)]
        loader = DataLoader(Subset(self.data, order.tolist()), batch_size=batch_size,
                            shuffle=False, num_workers=self.num_workers)
        for images, y in loader:
            with self.precision.autocast():
                feats = extract_features(self.backbone, images, self.layers, self.token_grid)
            # Out of inference mode: adapters need ordinary tensors to build their graphs.
            yield {k: v.clone() for k, v in feats.items()}, y.long().to(self.backbone.device)


class MemorySource:
    """Batches from tokens held in memory (e.g. a validation split extracted once)."""

    def __init__(self, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.feats = feats
        self.labels = labels
        self.layers = list(feats)

    @classmethod
    def collect(cls, source: Any, batch_size: int) -> MemorySource:
        """Materialise another source (no shuffling)."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in source.layers}
        labels = []
        for feats, y in source.batches(batch_size):
            for k, v in feats.items():
                parts[k].append(v)
            labels.append(y)
        return cls({k: torch.cat(v) for k, v in parts.items()}, torch.cat(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        order = torch.from_numpy(_order(len(self), shuffle, generator))
        for start in range(0, len(order), batch_size):
            pos = order[start:start + batch_size]
            yield {k: v[pos] for k, v in self.feats.items()}, self.labels[pos]
