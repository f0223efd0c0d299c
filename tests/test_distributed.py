"""Real multi-process runs under torchrun: 2 ranks, Gloo over loopback, a tiny backbone.

The distributed cache equals the single-process one sample for sample (shards split
unevenly between the ranks); distributed training selects the same adapter with the same
accuracies; a rank killed mid-extraction leaves a cache that a rerun completes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import TESTS, make_backbone, torchrun

from inca.data import load_dataset
from inca.features import ActivationCache, extract_to_cache
from inca.features.cache import recorded_shards

N, SHARD = 52, 8  # 7 shards: 4 for rank 0, 3 for rank 1

_EXTRACT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from tiny import TESTS, make_backbone, torchrun
from inca.data import load_dataset
from inca.features import extract_to_cache
from inca.features import cache as cache_mod
if {kill_rank1} and os.environ["RANK"] == "1":
    real = cache_mod.CacheWriter.write_shard
    def write_then_die(self, *a, **k):
        real(self, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # dies after its first shard
    cache_mod.CacheWriter.write_shard = write_then_die
bb = make_backbone("module", Path({tmp!r}))
extract_to_cache(bb, load_dataset("digits", limit={n}), {out!r}, batch_size=4,
                 shard_size={shard}, num_workers=0, progress=False)
"""

_FIT = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import inca
from tiny import TESTS, make_backbone, torchrun
from inca.data import load_dataset
from inca._distributed import context
bb = make_backbone("module", Path({tmp!r}))
task = inca.fit(bb, load_dataset("digits", limit=160), test=load_dataset("digits",
                split="test", limit=60), kinds=("inca", "linear"), lrs=(3e-3, 1e-2),
                epochs=3, batch_size=16, patience=0, cache_dir={cache!r}, progress=False,
                num_workers=0, device="cpu")
if context().is_main:
    rep = task.report
    Path({out!r}).write_text(json.dumps({{"chosen": rep.chosen,
        "members": rep.chosen_members, "test": rep.test_accuracy,
        "rows": {{r["key"]: [r["val_accuracy"], r["val_loss"], r["test_accuracy"]]
                 for r in rep.rows}}}}))
"""

# without a test split: the chosen task's confusion matrix on validation, counted by each
# rank on its share from the predictions kept in training, and summed over the ranks; the
# top-3 ensemble chosen (scored best) when asked
_FIT_VAL = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import inca
import inca.training.fitting as fitting
from tiny import make_backbone
from inca.data import load_dataset
from inca._distributed import context
from inca.training.selection import Candidate
if {ensemble}:
    real = fitting.top_k_ensemble
    fitting.top_k_ensemble = lambda *a: Candidate("ensemble", real(*a).member_indices, 1., 0.)
bb = make_backbone("module", Path({tmp!r}))
task = inca.fit(bb, load_dataset("digits", limit=160), kinds=("inca", "linear"),
                lrs=(3e-3, 1e-2), epochs=3, batch_size=16, patience=0, ensemble_k=3,
                cache_dir={cache!r}, progress=False, num_workers=0, device="cpu")
if context().is_main:
    rep = task.report
    Path({out!r}).write_text(json.dumps({{"chosen": rep.chosen, "num_val":
        rep.data["num_val"], "per_class": rep.per_class}}))
"""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit=N)


def test_two_ranks_extract_the_single_process_cache(tmp_path, digits):
    out = tmp_path / "dist"
    res = torchrun(_EXTRACT.format(tests=TESTS, tmp=str(tmp_path), n=N, out=str(out),
                                    shard=SHARD, kill_rank1=False))
    assert res.returncode == 0, res.stderr[-3000:]
    dist = ActivationCache(out)
    single = extract_to_cache(make_backbone("module", tmp_path), digits, tmp_path / "one",
                              batch_size=4, shard_size=SHARD, progress=False)
    assert len(dist) == len(single) == N
    np.testing.assert_array_equal(dist.labels, single.labels)
    for layer in single.layers:
        torch.testing.assert_close(dist.load(layer), single.load(layer), atol=0, rtol=0)
    assert [s["index"] for s in dist.manifest["shards"]] == list(range(7))


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_a_rank_killed_mid_extraction_leaves_a_cache_a_rerun_completes(tmp_path, digits):
    out = tmp_path / "dist"
    args = dict(tests=TESTS, tmp=str(tmp_path), n=N, out=str(out), shard=SHARD)
    res = torchrun(_EXTRACT.format(kill_rank1=True, **args))
    assert res.returncode != 0  # torchrun stops the group when a rank dies
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 1 <= len(recorded_shards(out)) < 7
    res = torchrun(_EXTRACT.format(kill_rank1=False, **args))
    assert res.returncode == 0, res.stderr[-3000:]
    single = extract_to_cache(make_backbone("module", tmp_path), digits, tmp_path / "one",
                              batch_size=4, shard_size=SHARD, progress=False)
    dist = ActivationCache(out)
    for layer in single.layers:
        torch.testing.assert_close(dist.load(layer), single.load(layer), atol=0, rtol=0)


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_two_ranks_train_and_select_as_one_process(tmp_path):
    args = dict(tests=TESTS, tmp=str(tmp_path))
    res = torchrun(_FIT.format(cache=str(tmp_path / "c2"), out=str(tmp_path / "two.json"),
                                **args), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    subprocess.run([sys.executable, "-c", _FIT.format(cache=str(tmp_path / "c1"),
                                                      out=str(tmp_path / "one.json"), **args)],
                   check=True, env=env, timeout=180)
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert (two["chosen"], two["members"]) == (one["chosen"], one["members"])
    assert two["test"] == pytest.approx(one["test"], abs=1e-9)
    for key, (acc, loss, test) in one["rows"].items():
        assert two["rows"][key][0] == pytest.approx(acc, abs=1e-9), key
        assert two["rows"][key][1] == pytest.approx(loss, rel=1e-4), key
        assert two["rows"][key][2] == pytest.approx(test, abs=1e-9), key


@pytest.mark.slow  # make test runs it; plain pytest skips it
@pytest.mark.parametrize("chosen", ["best", "ensemble"])
def test_two_ranks_count_the_validation_confusion_of_one_process(tmp_path, chosen):
    """Without a test split, each rank counts the chosen task's matrix on its share of
    validation; summed over the ranks it is the single process's, of every image once."""
    args = dict(tests=TESTS, tmp=str(tmp_path), ensemble=chosen == "ensemble")
    res = torchrun(_FIT_VAL.format(cache=str(tmp_path / "c2"), out=str(tmp_path / "two.json"),
                                   **args), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    subprocess.run([sys.executable, "-c", _FIT_VAL.format(
        cache=str(tmp_path / "c1"), out=str(tmp_path / "one.json"), **args)],
        check=True, env=env, timeout=180)
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert two["per_class"]["split"] == "validation"
    assert two["chosen"] == one["chosen"] == chosen and two["per_class"] == one["per_class"]
    assert sum(map(sum, two["per_class"]["confusion"])) == two["num_val"]


class _FakeCuda:
    """A machine with ``count`` GPUs, as torch.cuda reports it; records set_device."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.selected: list[torch.device] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.selected.append)
        monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)


@pytest.mark.parametrize(("gpus", "local_world", "backend"), [
    (2, 2, "cpu:gloo,cuda:nccl"),  # a GPU per rank: NCCL for CUDA tensors, Gloo for CPU
    (1, 2, "gloo"),  # two ranks on one GPU: NCCL refuses that
    (0, 2, "gloo"),
])
def test_the_backend_follows_the_gpus_per_rank(monkeypatch, gpus, local_world, backend):
    from inca._distributed import _default_backend

    _FakeCuda(monkeypatch, gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert _default_backend() == backend


def test_each_rank_gets_a_gpu_that_exists_and_only_when_it_asks_for_cuda(monkeypatch):
    from inca._distributed import Dist

    cuda = _FakeCuda(monkeypatch, 1)
    rank1 = Dist(rank=1, world=2, local_rank=1)
    assert rank1.device("cpu") == "cpu" and cuda.selected == []  # --device cpu on a GPU box
    assert rank1.device("cuda") == torch.device("cuda", 0)  # two ranks sharing one GPU
    assert cuda.selected == [torch.device("cuda", 0)]
    cuda = _FakeCuda(monkeypatch, 4)
    assert Dist(rank=5, world=8, local_rank=3).device("auto") == torch.device("cuda", 3)
    assert Dist().device("cuda") == "cuda"  # one process: as asked


def test_ranks_holding_other_weights_are_refused(monkeypatch):
    from inca._distributed import Dist
    from inca.errors import DistributedError

    def gather(out, value):  # rank 1 built its backbone with other random weights
        out[:] = [value, "f00d"]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    with pytest.raises(DistributedError, match=r"rank\(s\) \[1\] hold other backbone weights"
                                               r" .*--checkpoint"):
        Dist(rank=0, world=2).agree("beef", "backbone weights", "use the same --checkpoint")
    Dist(rank=0, world=2).agree("f00d", "backbone weights", "")  # the same: fine
    Dist().agree("anything", "backbone weights", "")  # one process: nothing to compare
