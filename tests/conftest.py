"""Test-suite settings: ``cuda`` tests run only where a GPU is; the tiny served task."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_task(tmp_path_factory):
    """``(folder, task)``: a tiny digits task on a tiny saved HF ViT (a local path), built
    once for the serving tests (:func:`tiny.save_digits_task`)."""
    from tiny import save_digits_task

    return save_digits_task(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def two_tasks():
    """``(backbone, a, b)``: two small linear tasks on the planted backbone, reading its
    ``stem`` and ``block1``."""
    from planted import planted_backbone, planted_data

    import inca


    bb = planted_backbone()
    common = dict(kinds=("linear",), lrs=(1e-2,), epochs=2, progress=False)
    a = inca.fit(bb, planted_data(96, 0), layers=["stem"], **common)
    b = inca.fit(bb, planted_data(96, 1), layers=["block1"], ensemble_k=1, **common)
    return bb, a, b


@pytest.fixture
def hashes(monkeypatch):
    """The modules whose weights get hashed (``weights_fingerprint`` calls), in order."""
    from inca.backbones import base

    hashed: list[object] = []
    real = base.weights_fingerprint
    monkeypatch.setattr(base, "weights_fingerprint", lambda m: hashed.append(m) or real(m))
    return hashed
