"""The :class:`Backbone` contract every source implements.

A backbone is a frozen model that, from one forward pass, returns the activations of the
layers asked for, each laid out as tokens ``(B, N, D)``. It stops after the deepest layer
asked for, so a request for an early layer costs only the blocks up to it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from inca.errors import BackboneError

RANDOM_INIT_SEED = 0  # random backbone weights (--no-pretrained) are drawn from this seed


@contextmanager
def seeded_init(random_weights: bool) -> Iterator[None]:
    """Build random weights from :data:`RANDOM_INIT_SEED` (when ``random_weights``), so the
    same spec gives the same weights in every process: a task fitted on a backbone built
    with ``pretrained=False`` loads again, and torchrun's ranks agree. The caller's random
    state is left as it was."""
    if not random_weights:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects of its input images.

    Attributes:
        input_size: side of the square image fed to the backbone, in pixels.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after the mean.
        interpolation: resize filter, ``"bilinear"`` or ``"bicubic"``.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.input_size <= 0:
            raise BackboneError(f"input_size must be positive, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BackboneError("mean and std must have 3 values (RGB)")
        if any(s <= 0 for s in self.std):
            raise BackboneError(f"std values must be positive, got {self.std}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise BackboneError(
                f"interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}"
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bicubic"),
        )

    def with_size(self, input_size: int) -> Preprocessing:
        """The same preprocessing at another input size."""
        return Preprocessing(input_size, self.mean, self.std, self.interpolation)


def to_tokens(t: torch.Tensor) -> torch.Tensor:
    """Lay out any layer output as tokens ``(B, N, D)``.

    This is the one place where CNN feature maps ``(B, C, H, W)`` become ``(B, H*W, C)``
    and pooled vectors ``(B, D)`` become a single token ``(B, 1, D)``.
    """
    if t.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
        return t.flatten(2).transpose(1, 2)
    if t.ndim == 3:  # already (B, N, D)
        return t
    if t.ndim == 2:  # (B, D) -> (B, 1, D)
        return t.unsqueeze(1)
    raise BackboneError(f"cannot lay out a layer output of shape {tuple(t.shape)} as tokens")


def weights_fingerprint(module: nn.Module) -> str:
    """A sha256 over the names, shapes and values of a module's parameters and buffers.

    Floating-point values are hashed rounded to bfloat16, so the same weights held in
    float32 or bfloat16, on any device, have one fingerprint. (A :class:`Backbone` also
    computes it before its first conversion, so a float16 copy keeps it too.)
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        if t.is_floating_point():
            t = t.to(torch.bfloat16).view(torch.int16)
        t = t.to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


class Backbone(nn.Module):
    """A frozen model that returns many layers' tokens from one forward pass.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`_extract`
    (and :meth:`_extract_whole` where stopping early cannot be traced); this class validates
    requests, orders layers, freezes weights, disables autograd and lays outputs out as
    tokens. Nothing outside ``inca.backbones`` calls those hooks: extraction, fine-tuning
    and export all go through :meth:`forward_layers`.

    Attributes:
        name: the id the registry created it from, e.g. ``"timm:vit_small_patch14_dinov2"``.
        model: the wrapped model (timm, transformers, torchvision, dinov2 or the user's own),
            whose parameters are the backbone's.
        layers: layer names in forward order (shallow to deep).
        embed_dims: token width ``D`` of each layer.
        num_prefix_tokens: leading non-patch tokens (CLS, registers) in each layer's tokens;
            0 for CNNs.
        preprocessing: the input the backbone expects.
        source: how to create it again (set by :func:`~inca.create_backbone`: its spec and
            arguments, local paths absolute), recorded in task files; ``None`` for a
            backbone built otherwise (:func:`~inca.from_module`).

    Example:
        >>> import inca, torch
        >>> bb = inca.create_backbone("dinov2_vits14")  # doctest: +SKIP
        >>> x = torch.randn(2, 3, 112, 112)
        >>> feats = bb.extract(x, ["blocks.3", "blocks.11"])  # doctest: +SKIP
        >>> feats["blocks.3"].shape  # doctest: +SKIP
        torch.Size([2, 65, 384])
    """

    name: str
    model: nn.Module
    layers: list[str]
    embed_dims: dict[str, int]
    num_prefix_tokens: int
    preprocessing: Preprocessing
    source: dict[str, Any] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._fingerprint: str | None = None
        self._frozen_weights = True  # False for a trainable copy: never cache its hash

    # -- subclass hooks --------------------------------------------------------------------
    def _extract(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Return raw outputs of ``layers`` (already in forward order), stopping after the last."""
        raise NotImplementedError

    def _extract_whole(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`_extract` through the model's whole forward, for tracing (``torch.export``
        cannot follow a pass ended early by an exception); the same unless overridden."""
        return self._extract(x, layers)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The model's plain forward (what a user would run without inca); for benchmarks."""
        raise NotImplementedError

    # -- public API ----------------------------------------------------------------------
    def freeze(self) -> Backbone:
        """Put the backbone in eval mode with every parameter frozen."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Backbone:  # noqa: D102 - a frozen backbone stays in eval
        return super().train(False)

    def fingerprint(self) -> str:
        """A short hash of the weights; task files and caches record it to refuse mismatches.

        It names the weights, not where or how they are held: moving or casting the
        backbone (``.to(device, dtype)``) keeps it.
        """
        if not self._frozen_weights:  # a trainable copy: its weights as they are now
            return weights_fingerprint(self)
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self)
        return self._fingerprint

    def trainable_copy(self) -> Backbone:
        """A deep copy whose weights are to change (fine-tuning): it holds no fingerprint,
        moving or casting it hashes nothing (seconds for a ViT-g), and :meth:`fingerprint`
        hashes its weights as they are when asked. Its parameters stay frozen until the
        caller unfreezes what it trains."""
        tuned = copy.deepcopy(self)
        tuned._fingerprint = None
        tuned._frozen_weights = False
        return tuned

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Every .to() / .cuda() / .half() comes through here: fix the fingerprint on the
        # weights as they were given, before a conversion rounds them.
        params = list(self.parameters())
        if self._frozen_weights and self._fingerprint is None and params \
                and params[0].device.type != "meta":
            self.fingerprint()
        return super()._apply(fn, recurse)

    def hub_weights(self) -> tuple[str | None, str | None]:
        """Where its pretrained weights came from on a model hub: ``(repo id, commit)``,
        each ``None`` when unknown. Each source answers for itself; task files record it."""
        return None, None

    def resolve_layers(self, layers: str | Sequence[str] | None) -> list[str]:
        """Turn a request into layer names in forward order.

        Accepts ``None`` or ``"all"`` (every layer), ``"last"``, a comma-separated string,
        a list of names, or integer positions (negative counts from the end).
        """
        if layers is None or layers == "all":
            return list(self.layers)
        if layers == "last":
            return [self.layers[-1]]
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        wanted: set[str] = set()
        for item in layers:
            if isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
                i = int(item)
                if not -len(self.layers) <= i < len(self.layers):
                    raise BackboneError(
                        f"layer index {i} is out of range for {self.name} "
                        f"({len(self.layers)} layers)"
                    )
                wanted.add(self.layers[i])
            elif item in self.layers:
                wanted.add(item)
            else:
                raise BackboneError(
                    f"unknown layer {item!r} for backbone {self.name}; "
                    f"its layers are: {', '.join(self.layers)}"
                )
        if not wanted:
            raise BackboneError("no layers requested")
        return [name for name in self.layers if name in wanted]

    def token_shape(self, layer: str) -> tuple[int, int]:
        """``(N, D)`` of a layer's tokens at the backbone's input size (runs one tiny pass)."""
        x = torch.zeros(1, 3, self.preprocessing.input_size, self.preprocessing.input_size,
                        device=self.device, dtype=self.dtype)
        t = self.extract(x, [layer])[layer]
        return int(t.shape[1]), int(t.shape[2])

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def extract(
        self, x: torch.Tensor, layers: str | Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run one forward pass and return ``{layer: tokens (B, N, D)}``.

        Args:
            x: a batch of preprocessed images ``(B, 3, H, W)``.
            layers: which layers to return (see :meth:`resolve_layers`); all by default.

        Returns:
            A dict in forward order. The pass stops after the deepest layer asked for.
            It runs without autograd (``torch.no_grad``): the tokens are ordinary tensors
            that adapters can train on directly.
        """
        return self.forward_layers(x, layers)

    def forward_layers(
        self, x: torch.Tensor, layers: str | Sequence[str] | None = None, *,
        grad: bool = False, stop_early: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``{layer: tokens (B, N, D)}`` of ``layers`` from one forward pass, in forward
        order: the one path every use of a backbone takes (:meth:`extract` is its default).

        Args:
            x: a batch of preprocessed images ``(B, 3, H, W)``.
            layers: which layers to return (see :meth:`resolve_layers`); all by default.
            grad: run in the caller's autograd mode, so that gradients reach the weights
                (fine-tuning, export); ``False`` runs under ``torch.no_grad``.
            stop_early: end the pass after the deepest layer asked for; ``False`` runs the
                model's whole forward, which tracing (``torch.export``) can follow.
        """
        names = self.resolve_layers(layers)
        if x.ndim != 4 or x.shape[1] != 3:
            raise BackboneError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        run = self._extract if stop_early else self._extract_whole
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad):
            raw = run(x, names)
        return {name: to_tokens(raw[name]) for name in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._forward_plain(x)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description, recorded in caches and task files."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint(),
            "layers": list(self.layers),
            "embed_dims": dict(self.embed_dims),
            "num_prefix_tokens": self.num_prefix_tokens,
            "preprocessing": self.preprocessing.to_dict(),
            "num_params": sum(p.numel() for p in self.parameters()),
            **({"source": dict(self.source)} if self.source is not None else {}),
        }
