"""Tiny random backbones of every source, and a tiny task served by a real ``inca serve``,
for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import inca
from inca.backbones import Backbone, Preprocessing

SIZE = 32


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


def save_tiny_hf_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, image_size=SIZE, patch_size=8)
    ViTModel(config).save_pretrained(folder)
    return folder


def make_backbone(source: str, tmp_path: Path) -> Backbone:
    """A tiny random backbone of the given source, seeded."""
    torch.manual_seed(0)
    if source == "timm-vit":
        return inca.create_backbone("timm:vit_tiny_patch16_224", pretrained=False,
                                    input_size=SIZE, patch_size=8, embed_dim=32, depth=4,
                                    num_heads=2)
    if source == "timm-cnn":
        return inca.create_backbone("timm:resnet10t", pretrained=False, input_size=SIZE)
    if source == "hf":
        return inca.create_backbone(f"hf:{save_tiny_hf_vit(tmp_path / 'tiny-hf-vit')}")
    if source == "torchvision":
        return inca.create_backbone("torchvision:mobilenet_v2", pretrained=False,
                                    input_size=SIZE, width_mult=0.25)
    if source == "module":
        return inca.from_module(TinyCNN(), ["stem", "stage1", "stage2"], name="tiny-cnn",
                                preprocessing=Preprocessing(input_size=SIZE))
    raise ValueError(source)


SOURCES = ["timm-vit", "timm-cnn", "hf", "torchvision", "module"]


# -- a tiny task served by a real `inca serve` process (the serving tests) -----------------
def save_digits_task(folder: Path) -> tuple[Path, inca.Task]:
    """``(task folder, task)``: a linear head (one epoch on 40 digits) on a tiny saved HF
    ViT in ``folder/vit``, saved as ``folder/digits`` (served as task "digits")."""
    from inca.data import load_dataset

    bb = inca.create_backbone(f"hf:{save_tiny_hf_vit(folder / 'vit')}")
    task = inca.fit(bb, load_dataset("digits", limit=40), kinds=("linear",), layers="last",
                    lrs=(1e-2,), epochs=1, progress=False)
    task.save(folder / "digits")
    return folder / "digits", task


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(task: Path, log: Path, *args: str, key: str, timeout: float = 90.0):
    """``(process, port)`` of ``inca serve --task task *args`` on a free loopback port with
    API key ``key``, once ``/readyz`` answers 200; its stdout and stderr go to ``log``.
    End it with :func:`stop_serve`."""
    import http.client
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    with open(log, "wb") as out:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "inca.cli", "serve", "--task", str(task), "--port",
             str(port), "--device", "cpu", *args], env={**os.environ, "INCA_API_KEY": key},
            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/readyz", headers={"X-API-Key": key})
                if conn.getresponse().status == 200:
                    return proc, port
            finally:
                conn.close()
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_serve(proc)
            raise RuntimeError(f"inca serve did not start:\n{log.read_text()}")
        time.sleep(0.1)


def stop_serve(proc) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
