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
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_backbone

from inca.data import load_dataset
from inca.features import ActivationCache, extract_to_cache
from inca.features.cache import recorded_shards

TESTS = str(Path(__file__).parent)
N, SHARD = 52, 8  # 7 shards: 4 for rank 0, 3 for rank 1

_EXTRACT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from tiny import make_backbone
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
from tiny import make_backbone
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


def _torchrun(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "--no-python", sys.executable, "-c",
                           script], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit=N)


def test_two_ranks_extract_the_single_process_cache(tmp_path, digits):
    out = tmp_path / "dist"
    res = _torchrun(_EXTRACT.format(tests=TESTS, tmp=str(tmp_path), n=N, out=str(out),
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
    res = _torchrun(_EXTRACT.format(kill_rank1=True, **args))
    assert res.returncode != 0  # torchrun stops the group when a rank dies
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 1 <= len(recorded_shards(out)) < 7
    res = _torchrun(_EXTRACT.format(kill_rank1=False, **args))
    assert res.returncode == 0, res.stderr[-3000:]
    single = extract_to_cache(make_backbone("module", tmp_path), digits, tmp_path / "one",
                              batch_size=4, shard_size=SHARD, progress=False)
    dist = ActivationCache(out)
    for layer in single.layers:
        torch.testing.assert_close(dist.load(layer), single.load(layer), atol=0, rtol=0)


@pytest.mark.slow  # make test runs it; plain pytest skips it
def test_two_ranks_train_and_select_as_one_process(tmp_path):
    args = dict(tests=TESTS, tmp=str(tmp_path))
    res = _torchrun(_FIT.format(cache=str(tmp_path / "c2"), out=str(tmp_path / "two.json"),
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
