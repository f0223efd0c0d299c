"""transformers backbones: layers are the encoder blocks, as in ``output_hidden_states``.

``hidden_states[i + 1]`` of a transformers vision model is the output of encoder block
``i``; hooking the blocks gives the same tensors while letting the pass stop early.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from inca._hints import require
from inca.backbones._hub import hub_offline, is_hub_error, offline_hint, offline_mode
from inca.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    seeded_init,
    weights_fingerprint,
)
from inca.backbones.hooks import HookBackbone
from inca.errors import BackboneError


def _find_blocks(model: nn.Module, depth: int) -> str:
    """The dotted name of the ModuleList holding the model's ``depth`` encoder blocks."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == depth and name:
            return name
    raise BackboneError(f"cannot find the {depth} encoder blocks of {type(model).__name__}")


def _hf_preprocessing(path: str, config: Any, input_size: int | None,
                      **hub: Any) -> Preprocessing:
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, getattr(config, "image_size", 224)
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(path, **hub)
        mean = tuple(proc.image_mean) if getattr(proc, "image_mean", None) else mean
        std = tuple(proc.image_std) if getattr(proc, "image_std", None) else std
    except Exception:  # noqa: BLE001 - a model saved without a processor keeps the defaults
        pass
    if isinstance(size, (list, tuple)):
        size = size[0]
    return Preprocessing(input_size=input_size or int(size), mean=mean, std=std)


class HFBackbone(HookBackbone):
    """A transformers model read through forward hooks."""

    def hub_weights(self) -> tuple[str | None, str | None]:
        """The model's hub id and the commit transformers loaded (``None`` for a folder)."""
        commit = getattr(getattr(self.model, "config", None), "_commit_hash", None)
        return self.name.partition(":")[2], commit


def create_hf_backbone(
    id_or_path: str, *, pretrained: bool = True, input_size: int | None = None,
    checkpoint_path: str | None = None, **kwargs: Any
) -> HFBackbone:
    """Load a transformers vision model (``AutoModel``) and wrap its encoder blocks.

    Args:
        id_or_path: a hub id (needs internet or a populated cache) or a local folder
            written by ``save_pretrained``. Offline (``HF_HUB_OFFLINE=1``, or the hub does
            not answer), a hub id missing from the cache fails at once with the fix.
        pretrained: load the saved weights; ``False`` builds the architecture at random.
            Parameters the checkpoint lacks (the pooler of a classifier's base model) are
            left out of the fingerprint when no layer reads them, and refused when one does.
        input_size: image side; position embeddings are interpolated when it differs.
        checkpoint_path: not taken: local weights are a folder, given as ``id_or_path``.
        **kwargs: passed to ``AutoModel.from_pretrained`` (``revision`` also reads the
            config and the image processor of that commit).
    """
    if checkpoint_path is not None:
        raise BackboneError("hf: backbones read local weights from a folder written by "
                            "save_pretrained(): pass it as hf:<folder> instead of a checkpoint")
    transformers = require("transformers", purpose="hf backbones")
    local = Path(id_or_path).expanduser().exists()
    if not local and (id_or_path.startswith(("/", ".", "~")) or id_or_path.count("/") > 1):
        raise BackboneError(f"could not load transformers model {id_or_path!r}: no such "
                            "folder (a hub id is <org>/<name>)")
    offline = not local and hub_offline()
    hub = {"revision": kwargs["revision"]} if kwargs.get("revision") else {}
    try:
        with offline_mode(offline):
            config = transformers.AutoConfig.from_pretrained(id_or_path, **hub)
            fresh: set[str] = set()  # parameters the checkpoint lacks: initialised at random
            if pretrained:
                model, loading = transformers.AutoModel.from_pretrained(
                    id_or_path, output_loading_info=True, **kwargs)
                fresh = _newly_initialised(loading)
            else:
                with seeded_init(True):  # the same spec, the same weights in any process
                    model = transformers.AutoModel.from_config(config)
            prep = _hf_preprocessing(id_or_path, config, input_size, **hub)
    except Exception as e:
        if not local and is_hub_error(e):
            raise BackboneError(
                f"could not load transformers model {id_or_path!r}: " + offline_hint(
                    "pass a local folder written by save_pretrained() as hf:<folder>",
                    offline)) from e
        raise BackboneError(f"could not load transformers model {id_or_path!r}: {e}") from e
    depth = int(config.num_hidden_layers)
    blocks = _find_blocks(model, depth)
    layers = [f"{blocks}.{i}" for i in range(depth)]
    patch = int(getattr(config, "patch_size", 16))
    num_patches = (prep.input_size // patch) ** 2

    def forward_fn(m: nn.Module, x):
        kw = {"interpolate_pos_encoding": True} if _takes_interp(m) else {}
        return m(pixel_values=x, **kw)

    bb = HFBackbone(
        model, layers, name=f"hf:{id_or_path}", preprocessing=prep, forward_fn=forward_fn
    )
    n_tokens = bb.token_shape(layers[0])[0]
    bb.num_prefix_tokens = max(n_tokens - num_patches, 0)
    if fresh:
        _exclude_fresh(bb, fresh, id_or_path)
    return bb


def _newly_initialised(loading: dict[str, Any]) -> set[str]:
    """Names (in the model) of the parameters transformers initialised at random: missing
    from the checkpoint (the pooler ``AutoModel`` adds to a ``*ForImageClassification``
    checkpoint's base model), or of another shape there."""
    fresh = {str(k) for k in loading.get("missing_keys") or ()}
    for item in loading.get("mismatched_keys") or ():
        fresh.add(str(item[0] if isinstance(item, (tuple, list)) else item))
    return fresh


class _Tensors:
    """A ``state_dict()`` to fingerprint: the loaded weights only."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return self.tensors


def _exclude_fresh(bb: HookBackbone, fresh: set[str], id_or_path: str) -> None:
    """Fingerprint ``bb`` on the checkpoint's weights only, so that it is the same in every
    process (a random pooler made each process's fingerprint new, and no task or cache
    could ever be loaded again); refuse random weights that the layers read."""
    import torch

    owners = {name.rpartition(".")[0] for name in fresh}
    modules = dict(bb.model.named_modules())
    read: list[str] = []
    handles = [modules[o].register_forward_pre_hook(lambda m, a, o=o: read.append(o))
               for o in sorted(owners) if o in modules]
    try:  # the pass stops after the deepest layer, as every extraction does
        s = bb.preprocessing.input_size
        bb.extract(torch.zeros(1, 3, s, s, device=bb.device, dtype=bb.dtype), bb.layers[-1:])
    finally:
        for h in handles:
            h.remove()
    if read:
        used = sorted(n for n in fresh if n.rpartition(".")[0] in set(read))
        raise BackboneError(
            f"transformers model {id_or_path!r} lacks weights its layers read "
            f"({', '.join(used[:3])}{', ...' if len(used) > 3 else ''}): transformers "
            "initialised them at random, so its features would differ in every process; use "
            "a checkpoint that holds them (save_pretrained() of the whole model)")
    skip = {f"model.{n}" for n in fresh}
    bb._fingerprint = weights_fingerprint(  # type: ignore[arg-type]
        _Tensors({k: v for k, v in bb.state_dict().items() if k not in skip}))


def _takes_interp(m: nn.Module) -> bool:
    import inspect

    return "interpolate_pos_encoding" in inspect.signature(m.forward).parameters
