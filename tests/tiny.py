"""Tiny random backbones of every source, a tiny task served by a real ``inca serve``,
requests to it, and task files to tamper with, for tests (no downloads).

``benchmarks/faults.py`` (the heavier, repeated version of the fault tests) imports these
too, so a tamper, a request body or a tiny model has one home: sys.path.insert(0, TESTS).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

import inca
from inca.adapters import create_adapter
from inca.backbones import Backbone, Preprocessing
from inca.task import TASK_JSON, TASK_WEIGHTS, Task

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


def save_tiny_vit_classifier(folder: Path, *, drop: str | None = None) -> Path:
    """A tiny ``ViTForImageClassification`` saved as the hub's classifiers are: the base
    model under ``vit.`` without a pooler (AutoModel adds one initialised at random), and a
    classifier head; ``drop`` deletes that weight from the saved file."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=SIZE, patch_size=8, num_labels=3)
    ViTForImageClassification(config).save_pretrained(folder)
    if drop is not None:
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        del weights[drop]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
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


def recv_all(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (or ``timeout`` passes)."""
    s.settimeout(timeout)
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


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


def png(image: Image.Image, **kwargs: Any) -> bytes:
    """``image`` as PNG bytes (``kwargs``: Pillow's PNG options)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None
              ) -> tuple[bytes, str]:
    """A multipart/form-data body of ``files`` (each a part named ``files``) and text
    ``fields``, and its content type."""
    boundary = "inca-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in (fields or {}).items()]
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                     f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode()
                     + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


# -- a random task on any backbone, and random pixels for it ------------------------------
CLASSES = ["cat", "dog", "eel"]


def random_task(bb: Any, *, token_grid: int | None = None, two: bool = True) -> Task:
    """An ensemble of an InCA adapter (first layer) and a linear probe (last layer)."""
    torch.manual_seed(1)
    first, last = bb.layers[0], bb.layers[-1]
    members = [create_adapter("inca", embed_dim=bb.embed_dims[first], num_classes=3)]
    layers = [[first]]
    if two:
        members.append(create_adapter("linear", embed_dim=bb.embed_dims[last], num_classes=3,
                                      pool="mean", num_prefix_tokens=bb.num_prefix_tokens))
        layers.append([last])
    with torch.no_grad():
        for m in members:
            for p in m.parameters():
                p.normal_(0, 0.5)
    return Task(members, layers, CLASSES, bb.describe(), backbone=bb, precision="32",
                token_grid=token_grid, keys=[f"m{i}" for i in range(len(members))])


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)


# -- torchrun: two ranks of a script on this machine --------------------------------------
TESTS = str(Path(__file__).parent)  # for scripts: sys.path.insert(0, TESTS) to import these


def torchrun(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "--no-python", sys.executable, "-c",
                           script], env=env, capture_output=True, text=True, timeout=timeout)


# -- task files to tamper with ------------------------------------------------------------
TAMPER_CLASSES = ["c0", "c1", "c2", "c3"]


def make_task(bb: Any, kind: str = "inca", layer: str = "block1", seed: int = 0,
              classes: list[str] = TAMPER_CLASSES, **cfg: Any) -> Task:
    """An untrained task with random (not initial) weights, so copies are told apart."""
    torch.manual_seed(seed)
    if kind == "linear":
        cfg = {"pool": "mean", "num_prefix_tokens": 0, **cfg}
    head = create_adapter(kind, embed_dim=bb.embed_dims[layer], num_classes=len(classes),
                          **cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    return Task([head], [[layer]], classes, bb.describe(), keys=[f"{kind}/{layer}"])


def edit_json(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    meta = json.loads((folder / TASK_JSON).read_text())
    change(meta)
    (folder / TASK_JSON).write_text(json.dumps(meta))


def rehash(folder: Path) -> None:
    """Record the weights file's current sha256, so the checks behind the hash are reached."""
    digest = hashlib.sha256((folder / TASK_WEIGHTS).read_bytes()).hexdigest()
    edit_json(folder, lambda m: m.update(weights_sha256=digest))


def edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """``change`` the saved weights' tensors in place, then :func:`rehash`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / TASK_WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / TASK_WEIGHTS))
    rehash(folder)


def nan_weight(t: dict[str, torch.Tensor]) -> None:
    """A NaN in the first matrix of the weights (by name: ``members.0.head.weight`` of an
    InCA member); a change for :func:`edit_weights`."""
    name = next(k for k, v in t.items() if v.ndim == 2)
    t[name][0, 0] = float("nan")


def task_state(task: Task) -> dict[str, torch.Tensor]:
    """Every member's weights by ``<member>.<name>``, to compare two tasks."""
    return {f"{i}.{k}": v for i, m in enumerate(task.members)
            for k, v in m.state_dict().items()}


def overwrite_inside(path: Path, n: int = 4096) -> None:
    """Overwrite up to ``n`` bytes in the middle of a file with 0xff, keeping its size (the
    attack's silent corruption: an array file still loads, as NaNs)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + n] = b"\xff" * len(data[start:start + n])
    path.write_bytes(bytes(data))
