"""One-pass multi-layer extraction, live or into a resumable activation cache."""

from __future__ import annotations

import datetime as _dt
import shutil
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from inca._choices import DEFAULT_PRECISION, EXTRACT_BATCH_SIZE, EXTRACT_DTYPE, EXTRACT_LAYERS
from inca._distributed import Dist, context
from inca._files import FolderLock, atomic_write_json, human_bytes, remove_stale_tmp
from inca._precision import Precision
from inca._progress import progress_bar
from inca._version import __version__
from inca.backbones.base import Backbone
from inca.data.transforms import loader_options, to_model_input
from inca.errors import CacheError, CacheMismatchError, InCAError, StorageError
from inca.features.cache import (
    FORMAT_VERSION,
    IDENTITY_KEYS,
    MANIFEST,
    ActivationCache,
    CacheWriter,
    describe_mismatch,
    read_manifest,
    recorded_shards,
)
from inca.features.tokens import reduce_tokens

_NP_DTYPES = {"float16": np.float16, "float32": np.float32}


def extract_features(
    backbone: Backbone,
    images: torch.Tensor,
    layers: str | Sequence[str] | None = None,
    token_grid: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokens of several layers from one pass, reduced as a cache would store them.

    Args:
        backbone: the frozen backbone.
        images: ``uint8`` pixels ``(B, 3, H, W)`` (normalized on the backbone's device), or
            preprocessed float images.
        layers: layers to return (see :meth:`Backbone.resolve_layers`).
        token_grid: pool patch tokens to this grid side (``None`` keeps all tokens).

    Returns:
        ``{layer: (B, N, D)}`` in forward order.
    """
    images = to_model_input(images, backbone.preprocessing, backbone.device, backbone.dtype)
    feats = backbone.extract(images, layers)
    return {k: reduce_tokens(v, backbone.num_prefix_tokens, token_grid) for k, v in feats.items()}


def token_shapes(backbone: Backbone, layers: str | Sequence[str] | None = None,
                 token_grid: int | None = None) -> dict[str, tuple[int, int]]:
    """``{layer: (N, D)}`` of the tokens :func:`extract_features` returns, from one pass
    of a blank image at the backbone's input size."""
    s = backbone.preprocessing.input_size
    feats = extract_features(backbone, torch.zeros(1, 3, s, s), layers, token_grid)
    return {k: (int(v.shape[1]), int(v.shape[2])) for k, v in feats.items()}


def _wanted_manifest(
    backbone: Backbone,
    dataset: Any,
    layers: list[str],
    token_grid: int | None,
    dtype: str,
    shard_size: int,
) -> dict[str, Any]:
    shapes = {k: list(v) for k, v in token_shapes(backbone, layers, token_grid).items()}
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone.name,
        "fingerprint": backbone.fingerprint(),
        "preprocessing": backbone.preprocessing.to_dict(),
        "dataset": dataset.fingerprint(),
        "layers": layers,
        "token_grid": token_grid,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_samples": len(dataset),
        # Description, not identity:
        "dataset_name": getattr(dataset, "name", type(dataset).__name__),
        "classes": list(dataset.classes),
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "token_shapes": shapes,
        "bytes_per_sample": int(sum(np.prod(v) for v in shapes.values())
                                * np.dtype(_NP_DTYPES[dtype]).itemsize),
        "inca_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shards": [],
        "complete": False,
    }


def extract_to_cache(
    backbone: Backbone,
    dataset: Any,
    out: str | Path,
    *,
    layers: str | Sequence[str] | None = EXTRACT_LAYERS,
    batch_size: int = EXTRACT_BATCH_SIZE,
    token_grid: int | None = None,
    dtype: str = EXTRACT_DTYPE,
    shard_size: int = 256,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    precision: str | Precision | None = DEFAULT_PRECISION,
    desc: str | None = None,
) -> ActivationCache:
    """Extract every sample of ``dataset`` through ``backbone`` into a cache folder.

    Re-running the same call resumes an interrupted extraction at the first shard not yet
    recorded, and returns a complete cache at once. A folder holding a cache of another
    backbone, preprocessing, data set, layer list or reduction is refused unless
    ``overwrite=True``.

    Args:
        backbone: the frozen backbone.
        dataset: the images: an :class:`inca.data.ImageDataset`, or anything
            :func:`inca.data.as_image_dataset` takes (torchvision and Hugging Face data sets,
            lists of ``(image, label)``).
        out: the cache folder.
        layers: layers to store (all by default).
        batch_size: images per backbone pass.
        token_grid: pool patch tokens to ``token_grid x token_grid`` to bound the cache size.
        dtype: ``"float16"`` (default, half the disk) or ``"float32"``.
        shard_size: samples per shard; an interruption loses at most one shard.
        num_workers: data-loading workers decoding images (default: the cores but one, at
            most 8).
        overwrite: replace a cache made differently instead of refusing.
        progress: show a progress bar (plain lines when stderr is not a terminal).
        precision: autocast of the backbone pass (``"auto"``: bf16-mixed on a GPU, 32 on
            the CPU); the tokens are stored in ``dtype`` either way.
        desc: what the progress bar says is extracted (default: ``"extract <folder>"``).

    Returns:
        The complete :class:`ActivationCache`.

    Example:
        >>> import inca
        >>> from inca.data import load_dataset
        >>> bb = inca.create_backbone("dinov2_vits14")  # doctest: +SKIP
        >>> ds = load_dataset("fashion-mnist", limit=300)  # doctest: +SKIP
        >>> cache = extract_to_cache(bb, ds, "cache/fmnist", layers="all")  # doctest: +SKIP
    """
    if dtype not in _NP_DTYPES:
        raise CacheError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    if shard_size <= 0 or batch_size <= 0:
        raise CacheError("shard_size and batch_size must be positive")
    root = Path(out)
    names = backbone.resolve_layers(layers)
    from inca.data import as_image_dataset

    dataset = as_image_dataset(dataset)  # torchvision, Hugging Face, lists of pairs too
    wanted = _wanted_manifest(backbone, dataset, names, token_grid, dtype, shard_size)
    ctx = context()  # one process, or one rank of torchrun's N
    ctx.agree(wanted["fingerprint"], "backbone weights", "give every rank the same pretrained "
              "weights or --checkpoint (random weights differ per process)")
    with ExitStack() as held:
        state: tuple[str, Any] = ("extract", None)
        if ctx.is_main:  # rank 0 holds the folder's lock for the whole extraction
            try:
                held.enter_context(FolderLock(root, "activation cache"))
                check_disk_space(root, wanted)  # before the folder is touched
                state = _prepare(root, wanted, overwrite)
            except InCAError as e:
                state = ("error", e)
        state = ctx.broadcast_object(state)
        if state[0] == "error":
            kind = CacheMismatchError if isinstance(state[1], CacheMismatchError) else CacheError
            raise state[1] if ctx.is_main else kind(f"rank 0 refused: {state[1]}")
        if state[0] == "complete":
            return ActivationCache(root)
        writer = CacheWriter(root, read_manifest(root))
        ok = False
        try:
            _extract_shards(backbone, dataset, writer, names, ctx, batch_size=batch_size,
                            token_grid=token_grid, dtype=dtype, shard_size=shard_size,
                            num_workers=num_workers, progress=progress and ctx.is_main,
                            precision=precision, desc=desc or f"extract {root.name}")
            ok = True
        finally:
            # every rank waits for the others here; one that failed stops them all
            every = ctx.all_ok(ok)
        if not every:
            raise CacheError(f"another rank failed while extracting into {root}; run the "
                             "same command again to resume")
        if ctx.is_main:
            writer.finish()
        ctx.barrier()
    return ActivationCache(root)


LARGE_CACHE_BYTES = 10 * 2**30  # a cache above this size is announced with a warning


def check_disk_space(root: Path, wanted: dict[str, Any]) -> int:
    """Refuse an extraction whose cache cannot fit on the disk; warn when it is large.

    The size is the manifest's ``bytes_per_sample`` times the samples still to extract
    (none when a complete cache serves the request; those not yet recorded when an
    interrupted one is resumed).

    Returns:
        The bytes still to write.

    Raises:
        StorageError: they exceed the free space of the disk holding ``root``.
    """
    found = read_manifest(root) if root.is_dir() else None
    done = 0
    if found is not None and not describe_mismatch(found, wanted):
        done = sum(s["count"] for s in recorded_shards(root, found))
    elif found is not None and found.get("complete") and _serves(found, wanted):
        return 0
    per, n = int(wanted["bytes_per_sample"]), int(wanted["num_samples"]) - done
    need = per * max(n, 0)
    where = next(p for p in (root, *root.absolute().parents) if p.exists())
    free = shutil.disk_usage(where).free
    what = (f"the cache would take {human_bytes(need)} ({per / 1024:.1f} KiB per image x "
            f"{n} images, {len(wanted['layers'])} layer(s))")
    fix = ("pool the patch tokens (--token-grid, e.g. 4), store fewer layers (--layers), or "
           "write the cache to another folder")
    if need > 0.95 * free:  # a little room for the manifest and the rest of the system
        raise StorageError(f"{what}, but {where} has only {human_bytes(free)} free. Fix: {fix}")
    if need > LARGE_CACHE_BYTES:
        warnings.warn(f"{what} at {root} ({human_bytes(free)} free). To make it smaller: {fix}",
                      stacklevel=2)
    return need


def _prepare(root: Path, wanted: dict[str, Any], overwrite: bool) -> tuple[str, Any]:
    """Rank 0, holding the lock: ``("complete", None)`` when a cache serves the request,
    else ``("extract", None)`` once the folder holds a manifest to resume or start."""
    if root.exists():
        remove_stale_tmp(root)  # left by a killed writer: ours to clean, we hold the lock
    found = read_manifest(root)
    if found is not None and found.get("complete") and _serves(found, wanted):
        return ("complete", None)  # a complete cache of these layers (or more)
    if found is not None:
        mismatch = describe_mismatch(found, wanted)
        if mismatch and not overwrite:
            raise CacheMismatchError(
                f"{root} holds a cache made differently:\n  " + "\n  ".join(mismatch)
                + "\nchoose another output folder, or pass overwrite=True (--overwrite)"
            )
        if mismatch:
            shutil.rmtree(root)
            found = None
        elif found.get("complete"):
            return ("complete", None)
    elif _holds_files(root) and not overwrite:
        raise CacheMismatchError(f"{root} exists, is not empty and holds no cache; choose "
                                 "another folder")
    if found is None:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / MANIFEST, wanted)
    return ("extract", None)


def _extract_shards(backbone: Backbone, dataset: Any, writer: CacheWriter, names: list[str],
                    ctx: Dist, *, batch_size: int, token_grid: int | None, dtype: str,
                    shard_size: int, num_workers: int | None, progress: bool,
                    precision: str | Precision | None, desc: str) -> None:
    """Extract this rank's shards not yet recorded (shard k is rank k mod N's)."""
    from inca.data import TransformedDataset, build_transform

    n = len(dataset)
    shard_bounds = [(k, k * shard_size, min((k + 1) * shard_size, n))
                    for k in range((n + shard_size - 1) // shard_size)]
    done = writer.done_shards()
    mine = [b for b in shard_bounds if b[0] % ctx.world == ctx.rank]
    pending = [b for b in mine if b[0] not in done]
    pending_idx = [i for _, a, b in pending for i in range(a, b)]
    loader = DataLoader(
        Subset(TransformedDataset(dataset, build_transform(backbone.preprocessing)), pending_idx),
        batch_size=batch_size,
        shuffle=False,
        **loader_options(num_workers, backbone.device),
    )
    bufs: dict[str, list[np.ndarray]] = {k: [] for k in names}
    labels: list[np.ndarray] = []
    buffered = 0
    shard_iter = iter(pending)
    shard = next(shard_iter, None)
    todo = sum(b - a for _, a, b in mine)  # this rank's share (the progress bar's total)
    bar = progress_bar(total=todo, initial=todo - len(pending_idx), unit="img",
                       desc=desc if not ctx.active else f"{desc} (rank 0 of {ctx.world})",
                       disable=not progress, lines_every=0.1)
    prec = Precision.of(precision, backbone.device)
    to_host = HostCopier(backbone.device, getattr(torch, dtype))
    for images, y in loader:
        with prec.autocast():
            feats = extract_features(backbone, images, names, token_grid)
        for k, v in to_host(feats).items():
            bufs[k].append(v)
        labels.append(np.asarray(y))
        buffered += len(y)
        bar.update(len(y))
        # A batch may span shard boundaries: flush every shard the buffer now covers.
        while shard is not None and buffered >= shard[2] - shard[1]:
            count = shard[2] - shard[1]
            tokens = {k: np.concatenate(v) for k, v in bufs.items()}
            lab = np.concatenate(labels)
            _check_finite(tokens, dtype)
            writer.write_shard(shard[0], shard[1], {k: v[:count] for k, v in tokens.items()},
                               lab[:count])
            bufs = {k: [v[count:]] for k, v in tokens.items()}
            labels = [lab[count:]]
            buffered -= count
            shard = next(shard_iter, None)
    bar.close()


class HostCopier:
    """A batch's layers as host arrays in the cache's dtype, converted on the device (half
    the bytes to copy for float16).

    From a CUDA device the layers are packed into one device buffer, copied in one
    ``non_blocking`` transfer into a pinned host buffer reused batch after batch, and
    waited for once; each layer is then copied out of it (the copy a transfer into
    pageable memory makes anyway), as the next batch overwrites it. Elsewhere each layer is
    simply moved to the host (on the CPU that is no copy beyond the conversion).
    ``staged=True`` takes the packed route on any device (for tests).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, staged: bool | None = None
                 ) -> None:
        self.dtype = dtype
        self.pinned = device.type == "cuda"
        self.staged = self.pinned if staged is None else staged
        self._host: torch.Tensor | None = None

    def __call__(self, feats: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        if not self.staged:
            return {k: v.to(self.dtype).cpu().numpy() for k, v in feats.items()}
        sizes = [v.numel() for v in feats.values()]
        packed = torch.empty(sum(sizes), dtype=self.dtype,
                             device=next(iter(feats.values())).device)
        places, at = [], 0
        for v, n in zip(feats.values(), sizes, strict=True):
            places.append((at, n, v.shape))
            packed[at:at + n].view(v.shape).copy_(v)  # converted and stacked in one kernel
            at += n
        if self._host is None or self._host.numel() < at:  # the first batch is the largest
            self._host = torch.empty(at, dtype=self.dtype, pin_memory=self.pinned)
        host = self._host[:at]
        host.copy_(packed, non_blocking=True)
        if packed.is_cuda:
            torch.cuda.current_stream(packed.device).synchronize()  # the batch's one wait
        return {k: host[a:a + n].view(shape).numpy().copy()
                for k, (a, n, shape) in zip(feats, places, strict=True)}


def _holds_files(root: Path) -> bool:
    """Whether ``root`` holds any file (empty shard folders left by a kill don't count)."""
    return root.exists() and any(p.is_file() for p in root.rglob("*"))


def _serves(found: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a cache can serve a request: same identity, and every layer asked for."""
    same = all(found.get(k) == wanted.get(k) for k in IDENTITY_KEYS if k != "layers")
    return same and set(wanted["layers"]) <= set(found.get("layers", []))


def _check_finite(tokens: dict[str, np.ndarray], dtype: str) -> None:
    for k, v in tokens.items():
        if not np.isfinite(v).all():
            hint = " (values exceed float16's range: use dtype='float32')" if dtype == "float16" \
                else ""
            raise CacheError(f"layer {k} produced non-finite activations{hint}")


__all__ = ["IDENTITY_KEYS", "extract_features", "extract_to_cache", "token_shapes"]
