"""Where the bank's inputs come from: the activation cache, or the live backbone.

Every source yields ``({layer: tokens (B, N, D)}, labels (B,))`` batches on its device, in
the same order for the same seed (:func:`batch_order`), so the bank trains identically on
either (up to the cache's 16-bit rounding).

Memory is bounded by the batch, not by the data: a source holds no split in memory. The
cached source reads each batch's rows from the memory-mapped shards (in file order within
a batch) straight into one block, in data-loading workers for a GPU, and copies them,
still in the cache's 16 bits, from pinned memory without waiting; the streaming source
runs the backbone on each batch. Validation and test are streamed the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from inca._distributed import context
from inca._precision import Precision
from inca.backbones.base import Backbone
from inca.data.transforms import TransformedDataset, default_num_workers, loader_options
from inca.features import ActivationCache, extract_features

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class StackedFeats(dict):
    """``{layer: (B, N, D)}`` whose tensors are slices of one block ``(L, B, N, D)``.

    Sources that can gather every layer at once return this, so that stacked adapters read
    the block as it is instead of stacking the layers again at every step.
    """

    def __init__(self, block: Any, layers: list[str] | None = None) -> None:
        if layers is None:
            # Rebuilt from its ``(layer, tokens)`` pairs, as torch rebuilds a dict it moves
            # (DistributedDataParallel's ``_recursive_to`` calls ``type(obj)(pairs)``).
            pairs = list(block.items() if isinstance(block, dict) else block)
            layers = [k for k, _ in pairs]
            block = torch.stack([v for _, v in pairs])
        super().__init__(zip(layers, block.unbind(0), strict=True))
        self.block = block
        self.order = list(layers)


def batch_order(n: int, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None, part: str | None = None
                ) -> list[np.ndarray]:
    """The positions of each batch of an epoch: a seeded permutation (or ``0..n-1``) cut
    into batches, each sorted, so that a batch is read in file order (a batch's loss does
    not depend on the order of its samples).

    Under ``torchrun`` (several ranks), ``part`` picks this rank's part: ``"batch"`` splits
    every batch between the ranks (training: together they make the single-process batch;
    a last batch smaller than the number of ranks is left out), ``"share"`` keeps a
    contiguous share of the positions (scoring: gathered in rank order afterwards).
    ``None`` (or one process) keeps everything.
    """
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    ctx = context()
    if part == "share" and ctx.active:
        order = order[ctx.share(n)]
    batches = [np.sort(order[s:s + batch_size]) for s in range(0, len(order), batch_size)]
    if part == "batch" and ctx.active:
        batches = [ctx.split(b) for b in batches if len(b) >= ctx.world]
    return batches


class _EpochSampler(Sampler):
    """Yields the batches set for the current epoch: the loader (and its persistent
    workers) lives as long as the source, while the order changes every epoch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Loader:
    """A DataLoader reading whole batches, created on first use and kept for every epoch."""

    def __init__(self, dataset: Dataset, num_workers: int | None, device: torch.device,
                 per_item: bool, prefetch_factor: int = 4) -> None:
        self.dataset, self.per_item = dataset, per_item
        self.options = loader_options(num_workers, device, prefetch_factor)
        self.sampler = _EpochSampler()
        self._loader: DataLoader | None = None

    def epoch(self, batches: list[list[int]]) -> DataLoader:
        self.sampler.batches = batches
        if self._loader is None:
            # per_item: the dataset reads one sample and the loader collates a batch;
            # otherwise it reads a whole batch (a list of indices) at once.
            kw: dict[str, Any] = {"batch_sampler": self.sampler} if self.per_item else \
                {"sampler": self.sampler, "batch_size": None}
            self._loader = DataLoader(self.dataset, **self.options, **kw)
        return self._loader


class _CacheReader(Dataset):
    """Reads a batch of a cache's samples (a list of row indices): every layer's rows in
    the cache's dtype, as one block ``(L, B, N, D)`` when the layers share a shape."""

    def __init__(self, cache: ActivationCache, layers: list[str],
                 relabel: np.ndarray | None = None) -> None:
        self.cache, self.layers, self.relabel = cache, layers, relabel
        self.stacked = len({cache.token_shape(k) for k in layers}) == 1

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, rows: list[int]) -> tuple[Any, torch.Tensor]:
        idx = np.asarray(rows, dtype=np.int64)
        labels = self.cache.labels[idx]
        labels = torch.from_numpy(labels if self.relabel is None else self.relabel[labels])
        if self.stacked:  # every layer's rows read straight into one block
            n, d = self.cache.token_shape(self.layers[0])
            block = np.empty((len(self.layers), idx.size, n, d),
                             dtype=self.cache.manifest["dtype"])
            for k, part in zip(self.layers, block, strict=True):
                self.cache.get_numpy(k, idx, out=part)
            return torch.from_numpy(block), labels
        return {k: torch.from_numpy(self.cache.get_numpy(k, idx)) for k in self.layers}, labels


class CachedSource:
    """Batches of tokens read from an activation cache (no backbone cost).

    Args:
        cache: a complete cache.
        indices: which of its samples form this source (e.g. the train split).
        layers: layers to read.
        device: where batches go.
        dtype: the tokens' dtype on the device (converted there, after the copy): float32,
            or the 16-bit compute dtype under mixed precision.
        num_workers: data-loading workers reading the shards; 0 reads in this process.
            Default: none on a CPU device, where the bank's compute uses every core and a
            worker's batches cost one more copy (into shared memory): a bank on 2 cores
            trained 1.3x faster reading in-process (``benchmarks/fit.py``'s setting, 3
            epochs: 13.2 s against 17.3 s with a worker). Elsewhere 2, or fewer cores:
            each keeps two batches ready in pinned memory (a batch of ViT-B/16 tokens is
            3.9 MB per image); reading memory-mapped rows needs few workers, and more
            would pin more host memory. On a CPU, workers still pay off when the cache is
            read from a slow disk rather than from memory.
        relabel: a new label for each of the cache's classes (``relabel[old] = new``), to
            train another task on the same cache.
    """

    def __init__(self, cache: ActivationCache, indices: Sequence[int], layers: list[str],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 num_workers: int | None = None, relabel: Sequence[int] | None = None) -> None:
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64)
        self.layers = layers
        self.device = torch.device(device)
        self.dtype = dtype
        if num_workers is None:
            num_workers = 0 if self.device.type == "cpu" else min(2, default_num_workers())
        relabel = None if relabel is None else np.asarray(relabel, dtype=np.int64)
        self._loader = _Loader(_CacheReader(cache, layers, relabel), num_workers, self.device,
                               per_item=False, prefetch_factor=2)

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None,
                part: str | None = None) -> Iterator[Batch]:
        order = batch_order(len(self), batch_size, shuffle, generator, part)
        rows = [self.indices[pos].tolist() for pos in order]  # sorted: file order
        for tokens, y in self._loader.epoch(rows):
            y = y.to(self.device, non_blocking=True).long()
            if isinstance(tokens, dict):
                feats: dict[str, torch.Tensor] = {
                    k: v.to(self.device, non_blocking=True).to(self.dtype)
                    for k, v in tokens.items()}
            else:  # one block (L, B, N, D): adapters of every layer read it as it is
                block = tokens.to(self.device, non_blocking=True).to(self.dtype)
                feats = StackedFeats(block, self.layers)
            yield feats, y


class StreamingSource:
    """Batches of tokens computed live by the backbone, one pass for every layer.

    Args:
        backbone: the frozen backbone.
        dataset: yields ``(image, label)``.
        indices: which samples form this source.
        layers: layers to extract.
        transform: image -> ``uint8`` tensor (with augmentation for training if wanted).
        token_grid: pool patch tokens as the cache would.
        num_workers: data-loading workers decoding images (default: the cores but one, at
            most 8).
        precision: autocast of the backbone pass.
    """

    def __init__(self, backbone: Backbone, dataset: Any, indices: Sequence[int],
                 layers: list[str], transform: Any, token_grid: int | None = None,
                 num_workers: int | None = None, precision: Precision | None = None) -> None:
        self.backbone = backbone
        self.indices = np.asarray(indices, dtype=np.int64)
        self.layers = layers
        self.token_grid = token_grid
        self.precision = precision or Precision("32", backbone.device)
        self._loader = _Loader(TransformedDataset(dataset, transform), num_workers,
                               backbone.device,
                               per_item=True)

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None,
                part: str | None = None) -> Iterator[Batch]:
        order = batch_order(len(self), batch_size, shuffle, generator, part)
        device = self.backbone.device
        for images, y in self._loader.epoch([self.indices[pos].tolist() for pos in order]):
            with self.precision.autocast():
                feats = extract_features(self.backbone, images, self.layers, self.token_grid)
            # In the compute dtype, as the cached source hands them over: a ViT's residual
            # stream stays float32 under autocast, which would double the block and make
            # every adapter family cast it again.
            dtype = self.precision.compute_dtype
            if len({v.shape for v in feats.values()}) == 1:
                first = next(iter(feats.values()))
                block = first.new_empty((len(feats), *first.shape), dtype=dtype)
                for row, v in zip(block, feats.values(), strict=True):
                    row.copy_(v)  # stacked and cast in one write
                feats = StackedFeats(block, self.layers)
            else:
                feats = {k: v.to(dtype) for k, v in feats.items()}
            yield feats, y.to(device, non_blocking=True).long()


class MemorySource:
    """Batches from tokens held in memory (small data, tests)."""

    def __init__(self, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.feats = feats
        self.labels = labels
        self.layers = list(feats)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None,
                part: str | None = None) -> Iterator[Batch]:
        for pos in batch_order(len(self), batch_size, shuffle, generator, part):
            p = torch.from_numpy(pos).to(self.labels.device)
            yield {k: v[p] for k, v in self.feats.items()}, self.labels[p]
