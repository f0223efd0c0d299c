"""A backbone over any ``nn.Module``: forward hooks on named modules, early stop by exception.

Used for torchvision models, the bundled MobileNetV2, transformers models (hooks on the
encoder blocks give exactly ``output_hidden_states`` while stopping early), and any model a
user wraps with :func:`from_module`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from inca.backbones.base import Backbone, Preprocessing
from inca.errors import BackboneError


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer to end the pass early."""


def _first_tensor(out: object) -> torch.Tensor:
    # transformers blocks return tuples (hidden_states, ...); some modules return dicts.
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise BackboneError(f"a hooked module returned {type(out).__name__}, not a tensor")


class HookBackbone(Backbone):
    """Extract named modules' outputs with forward hooks.

    Args:
        model: the network; it is frozen and put in eval mode.
        layers: names of submodules (as in ``model.named_modules()``) in forward order.
        name: the id to record in caches and task files.
        preprocessing: the input the model expects.
        num_prefix_tokens: leading non-patch tokens in each hooked output (0 for CNNs).
        forward_fn: how to call the model, ``model(x)`` by default (e.g. a transformers
            model takes ``pixel_values=x``).
        embed_dims: token width of each layer; measured with one pass when omitted.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        name: str,
        preprocessing: Preprocessing,
        num_prefix_tokens: int = 0,
        forward_fn: Callable[[nn.Module, torch.Tensor], object] | None = None,
        embed_dims: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.layers = list(layers)
        self.num_prefix_tokens = num_prefix_tokens
        self.preprocessing = preprocessing
        self._forward_fn = forward_fn or (lambda m, x: m(x))
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise BackboneError(
                f"{name}: no submodule named {', '.join(missing)}; "
                "pass names as listed by model.named_modules()"
            )
        self.freeze()
        self.embed_dims = embed_dims or self._measure_dims()

    def _measure_dims(self) -> dict[str, int]:
        s = self.preprocessing.input_size
        x = torch.zeros(1, 3, s, s, device=self.device, dtype=self.dtype)
        return {k: int(v.shape[-1]) for k, v in self.extract(x, self.layers).items()}

    def _extract(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        return self._hooked_pass(x, layers, stop_early=True)

    def _extract_whole(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """The hooked layers' outputs from the model's whole forward: hooks that only record
        (no early-stop exception, which tracing cannot follow)."""
        return self._hooked_pass(x, layers, stop_early=False)

    def _hooked_pass(self, x: torch.Tensor, layers: list[str], stop_early: bool
                     ) -> dict[str, torch.Tensor]:
        """The outputs of ``layers`` recorded by forward hooks; with ``stop_early``, the
        deepest one's hook ends the pass."""
        out: dict[str, torch.Tensor] = {}
        last = layers[-1] if stop_early else None

        def make_hook(layer: str):
            def hook(_mod: nn.Module, _inp: object, output: object) -> None:
                out[layer] = _first_tensor(output)
                if layer == last:
                    raise _StopForward

            return hook

        handles = []
        for layer in layers:
            # Looked up by name at every call: a wrapper (e.g. LoRA) may have replaced it.
            module = self.model.get_submodule(layer)
            handles.append(module.register_forward_hook(make_hook(layer)))
        try:
            self._forward_fn(self.model, x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in layers if n not in out]
        if missing:
            raise BackboneError(
                f"{self.name}: layers {missing} were not reached by the forward pass; "
                "are they used by the model's forward?"
            )
        return out

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self._forward_fn(self.model, x))


def from_module(
    model: nn.Module,
    layers: Sequence[str],
    *,
    name: str = "module",
    preprocessing: Preprocessing | None = None,
    num_prefix_tokens: int = 0,
) -> HookBackbone:
    """Wrap any ``nn.Module`` as a :class:`Backbone` extracting the named submodules.

    Example:
        >>> import torchvision, inca
        >>> net = torchvision.models.resnet18()
        >>> bb = inca.from_module(net, ["layer1", "layer2", "layer3", "layer4"], name="my-resnet")
        >>> bb.embed_dims["layer3"]
        256
    """
    return HookBackbone(
        model,
        layers,
        name=name,
        preprocessing=preprocessing or Preprocessing(),
        num_prefix_tokens=num_prefix_tokens,
    )
