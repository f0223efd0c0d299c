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
