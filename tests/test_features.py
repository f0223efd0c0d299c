"""Extraction into the activation cache: round trip, resume, refusal, reduction, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import SIZE, SOURCES, make_backbone

from inca.data import build_transform, load_dataset
from inca.errors import CacheError, CacheMismatchError
from inca.features import ActivationCache, extract_features, extract_to_cache, reduce_tokens
from inca.features import cache as cache_mod
from inca.features.cache import recorded_shards

N = 40


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit=N)


def _live(backbone, dataset, layers, grid=None):
    tf = build_transform(backbone.preprocessing)
    x = torch.stack([tf(dataset[i][0]) for i in range(len(dataset))])
    return extract_features(backbone, x, layers, grid)


@pytest.mark.parametrize("source", SOURCES)
def test_cached_equals_live(source, tmp_path, digits):
    bb = make_backbone(source, tmp_path)
    cache = extract_to_cache(bb, digits, tmp_path / "cache", batch_size=16, shard_size=16,
                             progress=False)
    live = _live(bb, digits, bb.layers)
    assert len(cache) == N and cache.layers == bb.layers
    np.testing.assert_array_equal(cache.labels, digits.targets)
    for layer in bb.layers:
        got = cache.load(layer)
        assert got.shape == live[layer].shape
        assert cache.token_shape(layer) == tuple(live[layer].shape[1:])
        # fp16 storage: relative rounding of 2**-11
        torch.testing.assert_close(got, live[layer], rtol=2e-3, atol=2e-3)
    idx = [7, 0, 33, 16]
    torch.testing.assert_close(cache.get(bb.layers[0], idx), cache.load(bb.layers[0])[idx])
    m = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert m["complete"] and m["fingerprint"] == bb.fingerprint()
    assert m["backbone"] == bb.name and m["dataset"] == digits.fingerprint()
    assert m["dtype"] == "float16" and m["num_samples"] == N


def test_token_grid_reduction(tmp_path, digits):
    bb = make_backbone("timm-vit", tmp_path)  # 4x4 patches + CLS
    cache = extract_to_cache(bb, digits, tmp_path / "c", token_grid=2, progress=False)
    assert cache.manifest["token_grid"] == 2
    assert cache.token_shape("blocks.0") == (1 + 4, 32)
    live = _live(bb, digits, ["blocks.0"], grid=2)["blocks.0"]
    torch.testing.assert_close(cache.load("blocks.0"), live, rtol=2e-3, atol=2e-3)
    t = torch.randn(2, 1 + 16, 3)
    r = reduce_tokens(t, 1, 2)
    torch.testing.assert_close(r[:, 0], t[:, 0])
    torch.testing.assert_close(r[:, 1], t[:, [1, 2, 5, 6]].mean(1))


def test_interrupted_extraction_resumes(tmp_path, digits, monkeypatch):
    bb = make_backbone("module", tmp_path)
    out = tmp_path / "cache"
    real = cache_mod.CacheWriter.write_shard
    written = []

    def crash_after_two(self, index, *a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if the process died while writing shard 3
        written.append(index)
        return real(self, index, *a, **k)

    monkeypatch.setattr(cache_mod.CacheWriter, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract_to_cache(bb, digits, out, batch_size=8, shard_size=8, progress=False)
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(out)
    monkeypatch.setattr(cache_mod.CacheWriter, "write_shard", real)

    seen = []
    handle = bb.model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    cache = extract_to_cache(bb, digits, out, batch_size=8, shard_size=8, progress=False)
    handle.remove()
    assert sum(seen) == 1 + N - 16  # one probe image, then only the missing samples
    fresh = extract_to_cache(bb, digits, tmp_path / "fresh", progress=False)
    for layer in bb.layers:
        torch.testing.assert_close(cache.load(layer), fresh.load(layer))


_KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from tiny import make_backbone
from inca.data import load_dataset
from inca.features import extract_to_cache
bb = make_backbone("module", Path({tmp!r}))
bb.model.register_forward_pre_hook(lambda *a: time.sleep(0.15))
extract_to_cache(bb, load_dataset("digits", limit={n}), {out!r}, batch_size=4, shard_size=8,
                 progress=False)
"""


def test_kill_9_mid_extraction_then_resume(tmp_path, digits):
    out = tmp_path / "cache"
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), n=N,
                                 out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if recorded_shards(out):
                break
            assert proc.poll() is None, "extraction ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 0 < len(recorded_shards(out)) < N // 8
    with pytest.raises(CacheError, match="incomplete"):
        ActivationCache(out)
    bb = make_backbone("module", tmp_path)
    cache = extract_to_cache(bb, digits, out, batch_size=4, shard_size=8, progress=False)
    live = _live(bb, digits, bb.layers)
    for layer in bb.layers:
        torch.testing.assert_close(cache.load(layer), live[layer], rtol=2e-3, atol=2e-3)


def test_cache_of_another_backbone_is_refused(tmp_path, digits):
    bb = make_backbone("module", tmp_path)
    out = tmp_path / "cache"
    extract_to_cache(bb, digits, out, progress=False)
    other = make_backbone("module", tmp_path)
    with torch.no_grad():
        next(other.parameters()).mul_(2)
    other._fingerprint = None
    with pytest.raises(CacheError, match="fingerprint"):
        extract_to_cache(other, digits, out, progress=False)
    bigger = make_backbone("module", tmp_path)
    bigger.preprocessing = bigger.preprocessing.with_size(SIZE * 2)
    with pytest.raises(CacheError, match="preprocessing"):
        extract_to_cache(bigger, digits, out, progress=False)
    with pytest.raises(CacheError, match="fingerprint"):
        ActivationCache(out, expect={"fingerprint": other.fingerprint()})
    # overwrite replaces it
    cache = extract_to_cache(other, digits, out, overwrite=True, progress=False)
    assert cache.manifest["fingerprint"] == other.fingerprint()


def test_complete_cache_is_reused_without_a_pass(tmp_path, digits):
    bb = make_backbone("module", tmp_path)
    extract_to_cache(bb, digits, tmp_path / "c", progress=False)
    seen = []
    bb.model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    extract_to_cache(bb, digits, tmp_path / "c", progress=False)
    assert sum(seen) <= 1  # only the shape probe


def test_bad_requests(tmp_path, digits):
    bb = make_backbone("module", tmp_path)
    with pytest.raises(CacheError, match="dtype"):
        extract_to_cache(bb, digits, tmp_path / "c", dtype="int8", progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not empty"):  # what --overwrite replaces
        extract_to_cache(bb, digits, junk, progress=False)
    extract_to_cache(bb, digits, tmp_path / "c", progress=False)
    with pytest.raises(CacheMismatchError, match="made differently"):
        extract_to_cache(bb, digits, tmp_path / "c", token_grid=1, progress=False)
    with pytest.raises(CacheMismatchError, match="made differently"):
        ActivationCache(tmp_path / "c", expect={"token_grid": 3})
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationCache(tmp_path / "nowhere")


def test_cli_extract_and_backbones(tmp_path):
    from tiny import save_tiny_hf_vit
    from typer.testing import CliRunner

    from inca.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["backbones"])
    assert res.exit_code == 0 and "dinov2_vits14" in res.output
    folder = save_tiny_hf_vit(tmp_path / "vit")
    args = ["extract", "--backbone", f"hf:{folder}", "--data", "digits", "--limit", "24",
            "--out", str(tmp_path / "c"), "--token-grid", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "KiB per image" in res.output and "layers.2" in res.output
    res = runner.invoke(app, [*args[:-2], "--input-size", "64"])
    assert res.exit_code == 2 and "made differently" in res.output
    res = runner.invoke(app, ["extract", "--backbone", "nope", "--data", "digits",
                              "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "unknown backbone" in res.output


def test_cache_of_more_layers_serves_a_subset(tmp_path, digits):
    bb = make_backbone("module", tmp_path)
    full = extract_to_cache(bb, digits, tmp_path / "c", progress=False)
    seen = []
    bb.model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    sub = extract_to_cache(bb, digits, tmp_path / "c", layers=[bb.layers[1]], progress=False)
    assert sum(seen) <= 1 and sub.layers == full.layers  # reused, no extraction pass
    with pytest.raises(CacheError, match="token_grid"):  # other identity: still refused
        extract_to_cache(bb, digits, tmp_path / "c", token_grid=1, progress=False)


# -- the copy to the host: one packed transfer from a GPU, the plain route on the CPU ------


def _layers(batch, seed):
    g = torch.Generator().manual_seed(seed)
    fmap = torch.randn(batch, 6, 3, 3, generator=g)
    return {"a": torch.randn(batch, 5, 4, generator=g) * 100,
            "b": fmap.flatten(2).transpose(1, 2),  # a CNN's tokens: not contiguous
            "c": torch.randn(batch, 1, 7, generator=g)}


def test_packed_host_copy_equals_the_plain_one():
    from inca.features.extract import HostCopier

    plain = HostCopier(torch.device("cpu"), torch.float16)
    packed = HostCopier(torch.device("cpu"), torch.float16, staged=True)
    assert not plain.staged and packed.staged and not packed.pinned
    kept = []
    for i, batch in enumerate([4, 2, 5, 3]):  # smaller, then larger than the buffer
        feats = _layers(batch, i)
        got, want = packed(feats), plain(feats)
        assert list(got) == list(feats)
        for k in feats:
            assert got[k].dtype == np.float16 and got[k].shape == tuple(feats[k].shape)
            np.testing.assert_array_equal(got[k], want[k])
        kept.append((got, want))
    for got, want in kept:  # the reused buffer was copied out of, not handed out
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])


def test_cache_through_the_packed_copy_is_identical(tmp_path, digits, monkeypatch):
    import functools

    from inca.features import extract as extract_mod

    bb = make_backbone("module", tmp_path)  # three layers of three shapes
    plain = extract_to_cache(bb, digits, tmp_path / "plain", batch_size=6, shard_size=16,
                             progress=False)
    monkeypatch.setattr(extract_mod, "HostCopier",
                        functools.partial(extract_mod.HostCopier, staged=True))
    packed = extract_to_cache(bb, digits, tmp_path / "packed", batch_size=6, shard_size=16,
                              progress=False)
    for layer in bb.layers:
        np.testing.assert_array_equal(packed.load(layer).numpy(), plain.load(layer).numpy())
    for shard in (tmp_path / "plain" / "shards").iterdir():
        for f in shard.iterdir():
            assert f.read_bytes() == (tmp_path / "packed" / "shards" / shard.name / f.name
                                      ).read_bytes(), f


@pytest.mark.cuda
def test_cuda_extraction_waits_once_per_batch(tmp_path, digits, monkeypatch):
    from inca.features import extract as extract_mod

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # to compare with the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    bb = make_backbone("timm-cnn", tmp_path)  # five layers of five shapes
    cpu = extract_to_cache(bb, digits, tmp_path / "cpu", batch_size=8, progress=False)
    bb.to("cuda")
    waits, copiers = [], []
    real_wait, real_copier = torch.cuda.Stream.synchronize, extract_mod.HostCopier
    monkeypatch.setattr(torch.cuda.Stream, "synchronize",
                        lambda s: waits.append(1) or real_wait(s))
    monkeypatch.setattr(extract_mod, "HostCopier",
                        lambda *a, **k: copiers.append(real_copier(*a, **k)) or copiers[-1])
    gpu = extract_to_cache(bb, digits, tmp_path / "gpu", batch_size=8, precision="32",
                           progress=False)
    (copier,) = copiers
    assert copier.staged and copier._host.is_pinned()
    assert len(waits) == -(-N // 8)  # one wait per batch, not one per layer
    for layer in bb.layers:
        torch.testing.assert_close(gpu.load(layer), cpu.load(layer), rtol=2e-3, atol=2e-3)
