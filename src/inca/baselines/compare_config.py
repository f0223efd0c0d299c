"""What ``inca compare`` runs: the methods and their shared settings, checked."""

from __future__ import annotations

from dataclasses import dataclass

from inca._choices import DEFAULT_PRECISION
from inca.errors import ConfigError

METHODS = ("full", "last", "lora", "linear", "multilayer", "inca")
EXPENSIVE = ("full", "last", "lora")


@dataclass
class CompareConfig:
    """What ``inca compare`` runs.

    Attributes:
        backbone: backbone spec (``dinov2_vits14``, ``timm:<name>``, ...).
        data: data spec (``fashion-mnist``, a folder, ...); its test split is the test set.
        methods: methods to compare (see :data:`METHODS`).
        epochs: the epoch budget of every method.
        limit: training samples (a seeded, class-balanced subset).
        test_limit: test samples.
        seeds: seeds of the cheap methods (probes, InCA); one by default, for a quick look:
            with more, mean and spread are reported.
        expensive_seeds: seeds of full, last-layer and LoRA fine-tuning.
        batch_size: batch size of every method.
        lrs: learning-rate grid of the probes and InCA.
        input_size: image side (the backbone's default when ``None``).
        val_fraction: held-out share for selection and early choice of epoch.
        token_grid: pool patch tokens of the probes' and InCA's inputs to this grid.
        equal_time: also run the probes and InCA on full fine-tuning's wall time (its first
            seed's, extraction included): as many epochs as fit, at most ``max_epochs``.
            The table shows them as ``<method> @ full's time`` beside the equal-epoch rows.
        time_fraction: the share of full fine-tuning's wall time an equal-time run gets
            (0.5: half of it).
        max_epochs: the most epochs an equal-time run may take.
        checkpoint_path: local weights of the backbone (``timm:``/``torchvision:``) instead
            of the hub's.
        pretrained: load the backbone's pretrained weights (``False``: built at random, for
            trying the pipeline offline).
        device: where to run (``"auto"``: CUDA when available).
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` or ``"auto"`` (bf16-mixed on a
            GPU), the same for every method.
        workdir: where the shared activation cache goes (a temporary folder if ``None``).
    """

    backbone: str = "dinov2_vits14"
    data: str = "fashion-mnist"
    methods: tuple[str, ...] = METHODS
    epochs: int = 3
    limit: int | None = 2000
    test_limit: int | None = 1000
    seeds: int = 1
    expensive_seeds: int = 1
    batch_size: int = 32
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    input_size: int | None = None
    val_fraction: float = 0.15
    token_grid: int | None = None
    equal_time: bool = False
    time_fraction: float = 1.0
    max_epochs: int = 30
    checkpoint_path: str | None = None
    pretrained: bool = True
    device: str = "auto"
    precision: str = DEFAULT_PRECISION
    workdir: str | None = None

    def __post_init__(self) -> None:
        from inca._hints import did_you_mean

        self.methods = tuple(self.methods)
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"unknown method {m!r}{did_you_mean(m, METHODS)}; choose from "
                                f"{', '.join(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must name each method once, got {list(self.methods)}")
        if self.epochs < 1 or self.seeds < 1 or self.expensive_seeds < 1:
            raise ConfigError("epochs, seeds and expensive_seeds must be at least 1")
        for name in ("limit", "test_limit", "input_size", "token_grid"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 1 or self.max_epochs < 1:
            raise ConfigError("batch_size and max_epochs must be at least 1")
        self.lrs = tuple(float(v) for v in self.lrs)
        if not self.lrs or not all(0 < v < float("inf") for v in self.lrs):
            raise ConfigError(f"lrs must be positive numbers, got {list(self.lrs)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.time_fraction <= 10:
            raise ConfigError(f"time_fraction must be in (0, 10], got {self.time_fraction}")
        if self.equal_time and "full" not in self.methods:
            raise ConfigError("equal_time gives the other methods full fine-tuning's wall "
                            "time: include 'full' in the methods")
        # Resolved once, here: every method and every child process runs the same.
        from inca._precision import resolve_device, resolve_precision  # imports torch

        device = resolve_device(self.device)
        self.device = str(device)
        self.precision = resolve_precision(self.precision, device)
