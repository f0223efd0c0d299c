"""Scale: the mode chosen by cost, sources that hold no split, workers that keep a device fed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from planted import planted_backbone, planted_data

import inca
from inca._precision import Precision
from inca.data import build_transform
from inca.data.transforms import default_num_workers
from inca.errors import CacheError, InCAError
from inca.features import ActivationCache, extract_to_cache
from inca.training import FitConfig
from inca.training import mode as mode_mod
from inca.training.mode import cache_bytes, choose_mode
from inca.training.sources import CachedSource, StreamingSource, batch_order

# ViT-B/16 at 224 px: 13 layers of 197 tokens x 768
VIT_B = {f"blocks.{i}": (197, 768) for i in range(13)}
CPU = torch.device("cpu")


def test_cache_size_estimate():
    # 13 x 197 x 768 x 2 bytes = 3.9 MB per image, as measured by the issue
    assert cache_bytes(VIT_B, 1, "float16") == 13 * 197 * 768 * 2
    assert cache_bytes(VIT_B, 4000, "float16") / 1e9 == pytest.approx(15.7, abs=0.1)


@pytest.fixture
def roomy(monkeypatch):
    monkeypatch.setattr(mode_mod, "free_disk", lambda folder: 10 * 2**40)
    monkeypatch.setattr(mode_mod, "available_memory", lambda: 16 * 2**30)


def _choose(tmp_path, n=4000, device=CPU, **cfg):
    return choose_mode(FitConfig(**cfg), VIT_B, 1, n, tmp_path, device)


def test_auto_mode_caches_only_when_it_pays_off(tmp_path, roomy):
    assert _choose(tmp_path, epochs=5).mode == "cached"  # 15.7 GB: fits, read 5 times
    choice = _choose(tmp_path, epochs=5, augment=True)
    assert choice.mode == "streaming" and "augmentation" in choice.reason
    assert _choose(tmp_path, epochs=1).mode == "streaming"
    big = _choose(tmp_path, n=20000, epochs=5)  # 79 GB > the 64 GiB budget
    assert big.mode == "streaming" and "--token-grid" in big.reason
    assert "--token-grid 8" in big.reason  # 13 x 65 tokens: 26 GB, within the budget
    # on a GPU, a cache that does not stay in memory is slower to read than to recompute
    gpu = _choose(tmp_path, epochs=5, device=torch.device("cuda"))
    assert gpu.mode == "streaming" and "forward pass" in gpu.reason
    assert _choose(tmp_path, n=1000, epochs=5, device=torch.device("cuda")).mode == "cached"
    assert _choose(tmp_path, epochs=5, mode="streaming").reason == "asked for"
    # every choice says what a cache would take (the report shows it)
    size = cache_bytes(VIT_B, 4000, "float16")
    assert {c.cache_bytes for c in (_choose(tmp_path, epochs=5), gpu, choice,
                                    _choose(tmp_path, epochs=5, mode="streaming"),
                                    _choose(tmp_path, epochs=1))} == {size}
    assert big.cache_bytes == cache_bytes(VIT_B, 20000, "float16")


def test_free_memory_and_disk_are_the_systems():
    """What the choice is made from: MemAvailable, and the free space where a cache would
    go (its nearest existing parent)."""
    import shutil

    psutil = pytest.importorskip("psutil")
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo")
    assert mode_mod.available_memory() == pytest.approx(psutil.virtual_memory().available,
                                                        rel=0.25)
    here = os.path.dirname(__file__)
    assert mode_mod.free_disk(os.path.join(here, "not", "made")) == pytest.approx(
        shutil.disk_usage(here).free, rel=0.01)


def test_cached_mode_refuses_a_cache_the_disk_cannot_hold(tmp_path, monkeypatch):
    monkeypatch.setattr(mode_mod, "free_disk", lambda folder: 2**30)
    with pytest.raises(InCAError, match=r"only 1.0 GiB is free.*--mode streaming"):
        _choose(tmp_path, epochs=5, mode="cached")
    with pytest.raises(InCAError, match="augmentation needs mode 'streaming'"):
        FitConfig(mode="cached", augment=True)


def test_cached_mode_takes_a_cache_of_up_to_95_percent_of_the_free_disk(tmp_path, monkeypatch):
    shapes, images = {"l": (19, 64)}, 2**14  # 19 x 2^21 bytes in float16
    size, disk = cache_bytes(shapes, images, "float16"), 20 * 2**21
    assert 0.95 * disk == size  # exactly at the limit: allowed

    def choose():
        return choose_mode(FitConfig(epochs=5, mode="cached"), shapes, 1, images, tmp_path, CPU)

    monkeypatch.setattr(mode_mod, "free_disk", lambda folder: disk)
    assert choose().mode == "cached"
    monkeypatch.setattr(mode_mod, "free_disk", lambda folder: disk - 1)
    with pytest.raises(InCAError, match="--mode streaming"):
        choose()


def test_fit_reports_the_mode_it_chose(tmp_path):
    common = dict(layers=["stem", "block1"], kinds=("linear",), lrs=(1e-2,), progress=False,
                  cache_dir=tmp_path)
    task = inca.fit(planted_backbone(), planted_data(96, 0), epochs=2, **common)
    assert task.report.mode["mode"] == "cached" and "budget" in task.report.mode["reason"]
    assert "Mode: cached" in task.report.to_markdown()
    one = inca.fit(planted_backbone(), planted_data(96, 0), epochs=1, **common)
    assert one.report.mode["mode"] == "streaming"


def test_batch_order_is_a_seeded_permutation_read_in_file_order():
    g = torch.Generator().manual_seed(0)
    batches = batch_order(100, 32, shuffle=True, generator=g)
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))
    assert all((np.diff(b) > 0).all() for b in batches)
    again = batch_order(100, 32, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    bb = planted_backbone()
    data = planted_data(120, 0)
    cache = extract_to_cache(bb, data, tmp_path_factory.mktemp("c"), layers=bb.layers,
                             shard_size=32, num_workers=0, progress=False)
    return bb, data, cache


class _LoggedCache(ActivationCache):
    """A cache that logs each read, ``<process id> <rows>``, to a file (workers append too)."""

    def __init__(self, path, log) -> None:
        super().__init__(path)
        self.log = log
        log.touch()

    def get_numpy(self, layer, indices, out=None):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {len(indices)}\n")
        return super().get_numpy(layer, indices, out)

    def reads(self) -> list[tuple[int, int]]:
        """The reads logged since the last call (then forgotten)."""
        lines = self.log.read_text().split()
        self.log.write_text("")
        return [(int(pid), int(n)) for pid, n in zip(lines[::2], lines[1::2], strict=True)]


def test_rows_read_into_a_given_array_equal_the_cache_in_any_order(cached):
    # Sorted indices are read with one take per shard straight into out; unsorted ones
    # (rows of a shard not side by side in out) row by row. Both across shard boundaries.
    _, _, cache = cached
    layer = cache.layers[1]
    whole = cache.get_numpy(layer, np.arange(len(cache)))
    rng = np.random.default_rng(0)
    for idx in (np.sort(rng.choice(len(cache), 50, replace=False)),  # runs, 4 shards
                rng.choice(len(cache), 50, replace=False),  # interleaved shards
                np.array([31, 32, 31, 0])):  # a shard boundary, repeats
        out = np.full((len(idx), *whole.shape[1:]), np.nan, dtype=whole.dtype)
        assert cache.get_numpy(layer, idx, out=out) is out
        np.testing.assert_array_equal(out, whole[idx])
        np.testing.assert_array_equal(cache.get_numpy(layer, idx), whole[idx])
    with pytest.raises(CacheError, match="out must be"):
        cache.get_numpy(layer, [0, 1], out=np.empty((3, *whole.shape[1:]), whole.dtype))


def test_cached_source_reads_batches_in_workers_and_holds_no_split(cached, tmp_path):
    bb, _, cache = cached
    idx = np.arange(3, 120, 2)  # a split: every other sample
    logged = [_LoggedCache(cache.path, tmp_path / f"reads-{w}") for w in (0, 1)]
    sources = [CachedSource(c, idx, bb.layers, num_workers=w) for w, c in enumerate(logged)]
    for src, c in zip(sources, logged, strict=True):  # nothing that grows with the split
        big = [k for k, v in vars(src).items()
               if isinstance(v, torch.Tensor) and k != "labels"]
        assert not big
        assert c.reads() == []  # and nothing read ahead
    workers = set()
    for epoch in range(2):
        got = []
        for src in sources:
            g = torch.Generator().manual_seed(epoch)
            got.append(list(src.batches(16, shuffle=True, generator=g)))
        for (fa, ya), (fb, yb) in zip(*got, strict=True):
            assert torch.equal(ya, yb) and fa.block.dtype == torch.float32
            assert torch.equal(fa.block, fb.block)
            assert fa.block.shape == (4, len(ya), 16, 16)  # (L, B, N, D), one block
        rows = np.concatenate([b for b in batch_order(len(idx), 16, True,
                                                      torch.Generator().manual_seed(epoch))])
        ys = torch.cat([y for _, y in got[0]])
        assert torch.equal(ys, torch.from_numpy(cache.labels[idx[rows]]))
        for w, c in enumerate(logged):  # every epoch reads the split again, batch by batch
            reads = c.reads()
            assert sorted(n for _, n in reads) == sorted([16, 16, 16, 11] * 4), w
            pids = {pid for pid, _ in reads}
            if w:  # ... in a worker process, kept across epochs
                assert len(pids) == 1 and os.getpid() not in pids
                workers |= pids
            else:
                assert pids == {os.getpid()}
    assert len(workers) == 1


def test_cached_source_reads_in_process_on_a_cpu_by_default(cached, tmp_path):
    # On a CPU the bank's compute uses every core, and a worker's batch costs one more copy
    # (into shared memory): the cache is read in this process unless workers are asked for.
    bb, _, cache = cached
    logged = _LoggedCache(cache.path, tmp_path / "reads")
    list(CachedSource(logged, np.arange(40), bb.layers).batches(16))
    assert {pid for pid, _ in logged.reads()} == {os.getpid()}
    assert CachedSource(cache, np.arange(40), bb.layers, device="cuda")._loader.options[
        "num_workers"] == min(2, default_num_workers())  # on a GPU: workers


def test_cached_source_converts_on_the_device_to_the_compute_dtype(cached):
    bb, _, cache = cached
    src = CachedSource(cache, np.arange(40), bb.layers, dtype=torch.bfloat16, num_workers=0)
    feats, _ = next(src.batches(8))
    assert feats.block.dtype == torch.bfloat16


def test_streaming_source_with_persistent_workers_equals_cache(cached):
    bb, data, cache = cached
    idx = np.arange(0, 120, 3)
    tf = build_transform(bb.preprocessing)
    stream = StreamingSource(bb, data, idx, bb.layers, tf, num_workers=1)
    ref = CachedSource(cache, idx, bb.layers, num_workers=0)
    for epoch in range(2):  # the same loader and worker serve both epochs, in new orders
        a = list(stream.batches(16, True, torch.Generator().manual_seed(epoch)))
        b = list(ref.batches(16, True, torch.Generator().manual_seed(epoch)))
        for (fa, ya), (fb, yb) in zip(a, b, strict=True):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(fa.block, fb.block, atol=2e-3, rtol=1e-2)  # fp16 cache
    assert stream._loader._loader is not None and stream._loader._loader.persistent_workers


def test_streaming_source_hands_the_compute_dtype_to_the_bank(cached):
    """Under bf16-mixed the backbone's float32 residual stream is cast once, as the cached
    source hands its tokens over, and equals the float32 tokens rounded."""
    bb, data, _ = cached
    idx = np.arange(0, 40, 2)
    tf = build_transform(bb.preprocessing)
    mixed = StreamingSource(bb, data, idx, bb.layers, tf, num_workers=0,
                            precision=Precision("bf16-mixed", "cpu"))
    plain = StreamingSource(bb, data, idx, bb.layers, tf, num_workers=0)
    (fm, _), (fp, _) = next(mixed.batches(8)), next(plain.batches(8))
    assert fm.block.dtype == torch.bfloat16 and fp.block.dtype == torch.float32
    assert all(v.dtype == torch.bfloat16 for v in fm.values())
    torch.testing.assert_close(fm.block.float(), fp.block, atol=0.1, rtol=0.05)


def test_streaming_fit_scores_validation_through_the_backbone_every_epoch(tmp_path):
    """Validation is streamed (a backbone pass per epoch), never held as tokens."""
    bb = planted_backbone()
    seen = []
    hook = bb.model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    try:
        task = inca.fit(bb, planted_data(100, 0), test=planted_data(30, 1), layers=["stem"],
                        kinds=("linear",), lrs=(1e-2,), epochs=3, batch_size=32,
                        mode="streaming", patience=0, progress=False, num_workers=0)
    finally:
        hook.remove()
    n_train, n_val = task.report.data["num_train"], task.report.data["num_val"]
    # token_shapes' probe (1 image), then per epoch: train and validation; then test once
    assert sum(seen) == 1 + 3 * (n_train + n_val) + 30
    assert set(task.report.test_accuracy) >= {"best", "linear_probe"}


def test_cached_source_relabels_for_another_task(cached):
    bb, _, cache = cached
    relabel = [1, 0, 1, 0]  # a two-way task from the four classes
    src = CachedSource(cache, np.arange(40), bb.layers, num_workers=0, relabel=relabel)
    ys = torch.cat([y for _, y in src.batches(16)])
    assert torch.equal(ys, torch.tensor(relabel)[torch.from_numpy(cache.labels[:40])])
