"""The typed configuration of a fit: which adapters form the bank and how they train."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from inca._choices import DEFAULT_PRECISION, precision_name
from inca.errors import ConfigError, InCAError

# the names that fields take (torch-free: `inca fit --help` lists them)
SELECT_BY = ("accuracy", "loss")
MODES = ("auto", "cached", "streaming")
CACHE_DTYPES = ("float16", "float32")


@dataclass
class FitConfig:
    """How to train a bank of adapters.

    Attributes:
        layers: backbone layers to read (``"all"``, ``"last"``, or names).
        kinds: adapter kinds in the bank (see :func:`inca.adapters.list_adapters`);
            ``multilayer_linear`` reads every requested layer at once. A variant,
            ``"<kind>:<name>"`` (e.g. ``"inca:q4"``), is the kind with the settings
            ``adapter_options["inca:q4"]`` adds: the bank trains variants side by side and
            validation chooses.
        lrs: learning-rate grid; every (kind, layer) pair is trained at each.
        epochs: passes over the training data.
        batch_size: samples per step.
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        warmup_epochs: linear warm-up before the cosine schedule.
        patience: stop when no adapter improved its validation score for this many epochs
            (0 disables early stopping).
        seed: seeds initialisation and batch order.
        mode: ``"auto"`` (the default: cache when a cache fits ``cache_budget_gb`` and
            pays off, else stream; see :func:`inca.training.mode.choose_mode`),
            ``"cached"`` (extract once, read the activation cache every epoch) or
            ``"streaming"`` (run the backbone on every batch).
        augment: augmentation of the training images (streaming only: it changes the
            images every epoch): ``"none"``, ``"crop"`` (random resized crops) or
            ``"crop-flip"`` (and horizontal flips; not for data whose orientation is the
            label). ``True``/``False`` mean ``"crop-flip"``/``"none"``.
        cache_budget_gb: the largest cache ``mode="auto"`` writes (also at most 90% of the
            free disk).
        ensemble_k: size of the top-k ensemble evaluated (and used if better on validation).
        select_by: what "better on validation" means, for each adapter's best epoch, the
            ranking of adapters and the choice between the best adapter and the ensemble:
            ``"loss"`` (the default: the cross-entropy, ties broken by the higher accuracy; a
            steadier estimate on a small validation set) or ``"accuracy"`` (ties broken by
            the lower loss). ``benchmarks/results/selection.md`` compares the two on test:
            the same single adapters on average, and top-3 ensembles 0.9 points better
            chosen by loss.
        soup: also evaluate weight-averaged "soups" of same-layer adapters over the lr grid.
        token_grid: pool patch tokens to this grid side before the adapters (bounds memory).
        cache_dtype: storage of the activation cache, ``"float16"`` or ``"float32"``.
        val_fraction: share of the training data held out for selection.
        adapter_options: per-kind (or per-variant) adapter settings, e.g.
            ``{"inca": {"num_heads": 4}, "inca:q4": {"num_queries": 4}}``.
        time_budget_s: train for as many epochs (at most ``epochs``) as fit in this many
            seconds, timed on the first epoch; the learning-rate schedule decays over
            exactly those epochs. For comparisons at equal cost.
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` (autocast compute, float32
            weights, optimizer state and losses), or ``"auto"``: bf16-mixed on a GPU, 32 on
            the CPU. ``inca.fit`` records the precision it resolved to.
    """

    layers: str | list[str] = "all"
    kinds: tuple[str, ...] = ("inca", "linear")
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    epochs: int = 15
    batch_size: int = 64
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    patience: int = 5
    seed: int = 0
    mode: str = "auto"
    augment: str = "none"
    cache_budget_gb: float = 64.0
    ensemble_k: int = 3
    select_by: str = "loss"
    soup: bool = False
    token_grid: int | None = None
    cache_dtype: str = "float16"
    val_fraction: float = 0.15
    adapter_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    time_budget_s: float | None = None
    precision: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.lrs = tuple(float(v) for v in self.lrs)
        if not self.kinds:
            raise ConfigError("kinds must name at least one adapter kind")
        self._check_kinds()
        if not self.lrs or not all(0 < lr < math.inf for lr in self.lrs):
            raise ConfigError(f"lrs must be positive finite numbers, got {list(self.lrs)}")
        for name in ("epochs", "batch_size", "ensemble_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.patience < 0 or not (0 <= self.weight_decay < math.inf
                                     and 0 <= self.warmup_epochs < math.inf):
            raise ConfigError("patience, weight_decay and warmup_epochs must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.select_by not in SELECT_BY:
            raise ConfigError(f"select_by must be 'accuracy' or 'loss', got {self.select_by!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be 'auto', 'cached' or 'streaming', got {self.mode!r}")
        from inca.data.transforms import augmentation

        try:
            self.augment = augmentation(self.augment)
        except InCAError as e:
            raise ConfigError(str(e)) from None
        if self.mode == "cached" and self.augment != "none":
            raise ConfigError("augmentation needs mode 'streaming' (a cache holds one view of "
                              "each image): drop --augment or use --mode streaming")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"time_budget_s must be positive, got {self.time_budget_s}")
        if not self.cache_budget_gb >= 0:
            raise ConfigError(f"cache_budget_gb must be >= 0, got {self.cache_budget_gb}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache_dtype must be float16 or float32, got {self.cache_dtype!r}")
        self.precision = precision_name(self.precision)
        if self.token_grid is not None and self.token_grid < 1:
            raise ConfigError(f"token_grid must be positive, got {self.token_grid}")

    def _check_kinds(self) -> None:
        """Every kind registered, every option a field of its kind's config: refused before
        any extraction, not after."""
        from inca.adapters import adapter_class
        from inca.errors import AdapterError

        if len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(f"kinds are listed twice: {list(self.kinds)}")
        for name, opts in {**dict.fromkeys(self.kinds, None), **self.adapter_options}.items():
            base = name.split(":", 1)[0]
            try:
                fields = adapter_class(base).config_class.__dataclass_fields__
            except AdapterError as e:
                raise ConfigError(f"{e} (in {name!r})") from None
            unknown = sorted(set(opts or {}) - set(fields))
            if unknown:
                raise ConfigError(f"adapter_options[{name!r}] has {unknown}, not settings of "
                                  f"{base!r}; its settings are {sorted(fields)}")
            if ":" in name and name not in self.adapter_options:
                raise ConfigError(f"the variant {name!r} needs its settings: "
                                  f"adapter_options[{name!r}] = {{...}}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"], d["lrs"] = list(self.kinds), list(self.lrs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        return cls(**d)
