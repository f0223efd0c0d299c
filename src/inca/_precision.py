"""Devices and numeric precision, named as PyTorch Lightning names them.

- ``device``: ``"auto"`` (CUDA when available, else the CPU), or any ``torch.device``.
- ``precision``: ``"32"`` (float32 throughout), ``"bf16-mixed"`` or ``"16-mixed"``
  (autocast for the compute; float32 master weights, optimizer state, losses and
  softmaxes; a gradient scaler for float16), or ``"auto"`` (``"bf16-mixed"`` on a GPU
  that supports it, ``"16-mixed"`` on one that does not, ``"32"`` on the CPU).

Why every training step enters its own autocast region: autocast caches the 16-bit copy of
each float32 weight it casts until the *outermost* autocast region is left. A whole
training loop run inside one region (``with torch.autocast(...): fit(...)``) therefore
computes every forward with the weights of the first step, while the optimizer updates
the float32 weights that the forward never reads again. That is how an outer autocast
broke full fine-tuning (92.95% -> 41.9%) and made InCA's validation and test disagree.
:meth:`Precision.autocast` drops that cache on entry, so a step always reads the current
weights, whether or not the caller wrapped inca in an autocast region of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from inca._choices import DEFAULT_PRECISION, precision_name
from inca.errors import InCAError

_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) is CUDA when available, else the CPU; anything else is
    checked to exist.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InCAError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or "
                        "'cuda:<index>'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InCAError(f"device {device!r} was asked for, but this torch sees no CUDA GPU; "
                        "use --device cpu (or 'auto')")
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """A precision name from :data:`PRECISIONS` (``"auto"`` chosen for ``device``)."""
    name = precision_name(precision)
    if name == DEFAULT_PRECISION:
        if device.type != "cuda":
            return "32"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if name == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InCAError("this GPU has no bfloat16 support: use --precision 16-mixed")
    return name


class Precision:
    """How a device computes: autocast regions and a gradient scaler for one precision.

    Args:
        precision: a name from :data:`PRECISIONS`, or ``"auto"``.
        device: the device the compute runs on.

    Example:
        >>> p = Precision("bf16-mixed", "cpu")
        >>> with p.autocast():
        ...     y = torch.ones(2, 2) @ torch.ones(2, 2)
        >>> y.dtype, p.compute_dtype
        (torch.bfloat16, torch.bfloat16)
    """

    def __init__(self, precision: str | None = DEFAULT_PRECISION,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.name = resolve_precision(precision, self.device)

    @classmethod
    def of(cls, precision: str | Precision | None, device: str | torch.device) -> Precision:
        """``precision`` as a :class:`Precision` for ``device``: one given is kept when it is
        for that device (else its name is resolved anew for ``device``)."""
        device = torch.device(device)
        if isinstance(precision, Precision):
            if precision.device == device:
                return precision
            precision = precision.name
        return cls(precision, device)

    @property
    def mixed(self) -> bool:
        return self.name != "32"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the autocast matmuls (float32 for ``"32"``)."""
        return _DTYPES.get(self.name, torch.float32)

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """One step's autocast region (disabled for ``"32"``, so an outer region is
        overridden), with autocast's weight cache dropped first (see the module docstring)."""
        torch.clear_autocast_cache()
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.mixed):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for ``"16-mixed"`` only (bfloat16 needs none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "16-mixed")

    def stepper(self, optimizer: torch.optim.Optimizer) -> Stepper:
        """One training run's backward and optimizer step in this precision (its own
        gradient scaler): what the bank loop and fine-tuning call after each forward."""
        return Stepper(optimizer, self.grad_scaler())

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, device={str(self.device)!r})"


class Stepper:
    """Backward and optimizer step of one training run, as its precision needs them: the
    gradients cleared, the loss's backward (scaled for float16), the step (for float16
    skipped when a gradient overflowed, the scale then lowered).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> step = Precision("32", "cpu").stepper(torch.optim.SGD([w], lr=0.5))
        >>> step((w * w).sum())
        >>> w.detach()
        tensor([0., 0.])
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler

    def __call__(self, loss: torch.Tensor,
                 before_scaled_step: Callable[[], None] | None = None) -> None:
        """``loss``'s backward and the step; ``before_scaled_step`` runs between them when
        a scaler is in use (e.g. to zero gradients that must not stop the others' step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if before_scaled_step is not None and self.scaler.is_enabled():
            before_scaled_step()
        self.scaler.step(self.optimizer)
        self.scaler.update()
