"""``inca export``: a fitted task (its backbone and members) as one ONNX or ``torch.export``
file, images in, class probabilities out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inca.cli._app import app, friendly
from inca.cli._options import OUTPUT, TASKS, TaskBackbone, TaskCheckpoint, check_choices
from inca.errors import InCAError

FORMATS = ("onnx", "export")  # ONNX (torch's dynamo exporter) or a torch.export program
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


@app.command("export")
@friendly
def export_cmd(
    task: Annotated[Path, typer.Option(help="a fitted task folder", rich_help_panel=TASKS)],
    out: Annotated[Path, typer.Option(help="the file to write (.onnx or .pt2)",
                                      rich_help_panel=OUTPUT)],
    format: Annotated[str, typer.Option(  # noqa: A002 - the option's name
        help="onnx: an ONNX model (onnxruntime, TensorRT, ...); export: a torch.export "
             "program (torch.export.load)", metavar="[onnx|export]",
        rich_help_panel=OUTPUT)] = "onnx",
    backbone: TaskBackbone = None,
    checkpoint: TaskCheckpoint = None,
) -> None:
    """Export a task as one model: uint8 images (batch, 3, size, size) named 'images' in,
    'probabilities' (batch, classes) out, any batch size. Runs on the CPU in float32."""
    check_choices("--format", [format], list(FORMATS))
    written = export_task(task, out, format, backbone=backbone, checkpoint=checkpoint)
    typer.echo(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB): input "
               f"'{INPUT_NAME}' uint8 (batch, 3, H, W), output '{OUTPUT_NAME}' (batch, classes)")


def export_task(task: Path, out: Path, format: str = "onnx", *,  # noqa: A002
                backbone: str | None = None, checkpoint: Path | None = None) -> Path:
    """Write ``task`` as an ONNX model or a ``torch.export`` program at ``out`` (atomically).

    Raises:
        InCAError: the exporter is missing (``pip install 'inca[export]'``) or refused the
            model (the message names why).
    """
    import torch

    from inca._files import atomic_write_bytes
    from inca.task import load_task

    if format == "onnx":
        from inca._hints import require

        for module in ("onnx", "onnxscript"):
            require(module, "export", purpose="inca export --format onnx")
    kwargs = {"checkpoint_path": str(checkpoint.resolve())} if checkpoint else {}
    loaded = load_task(task, backbone, device="cpu", **kwargs)
    module = loaded.to_module().eval()
    size = loaded.preprocessing.input_size
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        if format == "export":
            program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
            import io

            buf = io.BytesIO()
            torch.export.save(program, buf)
            atomic_write_bytes(out, buf.getvalue())
            return out
        try:
            onnx = torch.onnx.export(module, (x,), dynamo=True, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                     verbose=False)
        except Exception as e:  # noqa: BLE001 - the exporter's own error, named
            raise InCAError(f"the ONNX exporter refused {task}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}; try --format "
                            "export") from e
    atomic_write_bytes(out, onnx.model_proto.SerializeToString())
    return out
