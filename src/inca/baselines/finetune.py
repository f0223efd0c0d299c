"""Baselines that back-propagate through the backbone: full, last-block and LoRA fine-tuning.

For comparisons only (``inca compare``): each trains a deep copy of the backbone (the
caller's stays frozen and unchanged) and a new linear head on the pooled features of the
deepest layer, with AdamW, a cosine schedule with warm-up and label smoothing, keeping the
best epoch on validation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from inca._choices import DEFAULT_PRECISION, precision_name
from inca._precision import Precision, Stepper, resolve_device
from inca._progress import progress_bar
from inca.backbones.base import Backbone
from inca.data.transforms import (
    TransformedDataset,
    augmentation,
    build_transform,
    loader_options,
    to_model_input,
)
from inca.errors import ConfigError, InCAError, TrainingError

FINETUNE_METHODS = ("full", "last", "lora")
_NORMS = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm, nn.BatchNorm1d)


@dataclass
class FineTuneConfig:
    """How a fine-tuning baseline trains.

    Attributes:
        method: ``"full"`` (every backbone weight), ``"last"`` (the final block, and the
            final norm when that is the last layer) or ``"lora"`` (LoRA through peft).
        epochs: passes over the training data.
        batch_size: images per step.
        lr_head: learning rate of the new linear head.
        lr_backbone: learning rate of the deepest backbone weights (full, last): lower than
            the head's, as usual when fine-tuning pretrained weights.
        layer_decay: layer-wise learning-rate decay (BEiT, MAE): each layer below the
            deepest learns ``layer_decay`` times slower than the one above; 1 disables it.
        lr_lora: learning rate of the LoRA weights.
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        warmup_epochs: linear warm-up before the cosine decay.
        seed: seeds the head, LoRA initialisation and batch order.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_targets: module names to adapt; ``None`` finds the attention projections
            (``qkv``, or ``query``/``key``/``value``), else the 1x1 convolutions of a CNN.
        augment: ``"none"``, ``"crop"`` or ``"crop-flip"`` (as ``inca.fit``'s).
        num_workers: data-loading workers decoding images (default: the cores but one, at
            most 8).
        precision: ``"32"``, ``"bf16-mixed"``, ``"16-mixed"`` (autocast forward, float32
            master weights and optimizer state, float32 loss, a gradient scaler for
            float16) or ``"auto"`` (bf16-mixed on a GPU, 32 on the CPU).
    """

    method: str = "full"
    epochs: int = 3
    batch_size: int = 32
    lr_head: float = 1e-3
    lr_backbone: float = 2e-4  # with the decay: best on validation (finetune-lr.md)
    layer_decay: float = 0.75
    lr_lora: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 0.5
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] | None = None
    augment: str = "none"
    num_workers: int | None = None
    precision: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise ConfigError(f"method must be one of {FINETUNE_METHODS}, got {self.method!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lora_r < 1:
            raise ConfigError("epochs, batch_size and lora_r must be at least 1")
        if min(self.lr_head, self.lr_backbone, self.lr_lora) <= 0:
            raise ConfigError("learning rates must be positive")
        self.augment = augmentation(self.augment)
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        self.precision = precision_name(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FineTuneResult:
    """What a fine-tuning run measured."""

    method: str
    val_accuracy: float
    test_accuracy: float | None
    train_seconds: float
    epochs_run: int
    trainable_parameters: int
    stored_bytes: int  # what a per-task file must hold beyond the shared backbone
    history: list[dict[str, Any]] = field(default_factory=list)
    model_: Backbone | None = field(default=None, repr=False)  # the fine-tuned copy
    head_: nn.Module | None = field(default=None, repr=False)


# Attention projections as timm (qkv), transformers 4 (query/key/value) and transformers 5
# (q_proj/k_proj/v_proj, as in its language models) name them.
_ATTENTION_PROJECTIONS = ("qkv", "query", "key", "value", "q_proj", "k_proj", "v_proj")


def _lora_targets(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    attn = [n for n in names if n.rsplit(".", 1)[-1] in _ATTENTION_PROJECTIONS]
    if attn:
        return attn
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]


def _last_block_modules(backbone: Backbone) -> list[str]:
    last = backbone.layers[-1]
    names = [last]
    if isinstance(backbone.model.get_submodule(last), _NORMS) and len(backbone.layers) > 1:
        names.insert(0, backbone.layers[-2])  # e.g. dinov2: blocks.11 + the final norm
    return names


def prepare(backbone: Backbone, config: FineTuneConfig) -> tuple[Backbone, list[str]]:
    """A trainable copy of ``backbone`` for ``config.method`` and the names of the
    parameters (in ``copy.model.named_parameters()``) it trains."""
    tuned = backbone.trainable_copy()  # its weights will change: hashed only if asked
    model = tuned.model
    for p in model.parameters():
        p.requires_grad_(False)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif config.method == "last":
        for name in _last_block_modules(tuned):
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    else:
        from inca._hints import require

        peft = require("peft", purpose="the LoRA baseline")
        LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model
        targets = list(config.lora_targets or _lora_targets(model))
        if not targets:
            raise InCAError(f"{backbone.name}: no attention projections or 1x1 convolutions "
                            "to put LoRA on; name them with lora_targets")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            inject_adapter_in_model(LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                               target_modules=targets), model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return tuned, names


def layer_depths(backbone: Backbone, names: list[str]) -> dict[str, int]:
    """Depth of each parameter for layer-wise learning-rate decay (as BEiT and MAE count):
    0 for what comes before the first layer (patch and position embeddings), ``i + 1`` in
    ``backbone.layers[i]``, ``len(layers) + 1`` for what comes after the last (a head)."""
    layers = backbone.layers
    depths, seen = {}, 0
    for name, _ in backbone.model.named_parameters():
        inside = [i for i, ly in enumerate(layers) if name.startswith(ly + ".")]
        if inside:
            seen = max(inside) + 1
            depths[name] = seen
        else:
            depths[name] = 0 if seen == 0 else len(layers) + 1
    return {n: depths[n] for n in names}


def layer_decay_groups(backbone: Backbone, names: list[str], lr: float, decay: float
                       ) -> list[dict[str, Any]]:
    """Optimizer groups with ``lr * decay ** (top - depth)``: the deepest layers learn at
    ``lr``, each shallower one ``decay`` times slower (``decay=1``: one learning rate)."""
    params = dict(backbone.model.named_parameters())
    depths = layer_depths(backbone, names)
    top = max(depths.values(), default=0)
    groups: dict[int, list[torch.nn.Parameter]] = {}
    for n in names:
        groups.setdefault(depths[n], []).append(params[n])
    return [{"params": ps, "lr": lr * decay ** (top - d), "depth": d}
            for d, ps in sorted(groups.items())]


def _features(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """Pooled features of the deepest layer, with gradients (not ``extract``'s
    inference mode): the CLS token, or the mean of the tokens of a CNN."""
    layer = backbone.layers[-1]
    tokens = backbone.forward_layers(x, [layer], grad=True)[layer]  # (B, N, D)
    return tokens[:, 0] if backbone.num_prefix_tokens else tokens.mean(1)


def _set_mode(tuned: Backbone, config: FineTuneConfig, training: bool) -> None:
    # Frozen parts stay in eval mode (BatchNorm statistics untouched); trained parts train.
    nn.Module.train(tuned.model, False)
    if not training:
        return
    if config.method == "full":
        nn.Module.train(tuned.model, True)
    elif config.method == "last":
        for name in _last_block_modules(tuned):
            tuned.model.get_submodule(name).train(True)


@torch.no_grad()
def _accuracy(tuned: Backbone, head: nn.Module, loader: DataLoader,
              precision: Precision) -> float:
    correct = torch.zeros((), dtype=torch.long, device=tuned.device)
    total = 0
    for x, y in loader:
        x = to_model_input(x, tuned.preprocessing, tuned.device)
        y = y.to(tuned.device, non_blocking=True)
        with precision.autocast():
            logits = head(_features(tuned, x))
        correct += (logits.argmax(-1) == y).sum()
        total += len(y)
    return int(correct) / max(total, 1)


def finetune(backbone: Backbone, train: Any, val: Any, test: Any = None,
             config: FineTuneConfig | None = None, *, progress: bool = True,
             device: str | torch.device | None = None) -> FineTuneResult:
    """Fine-tune a copy of ``backbone`` with a new head; the caller's backbone is unchanged.

    Every step runs its forward and loss in its own autocast region (``config.precision``):
    don't wrap this in ``torch.autocast`` yourself (see :mod:`inca._precision`).

    Args:
        backbone: the pretrained backbone (left frozen and unchanged).
        train: training data yielding ``(image, label)`` with ``classes``.
        val: validation data (best epoch kept).
        test: optional test data, evaluated with the best epoch's weights.
        config: method and hyper-parameters.
        progress: show a progress bar.
        device: where the copy trains (``"auto"``: CUDA when available); the backbone's
            device when omitted.
    """
    config = config or FineTuneConfig()
    tuned, names = prepare(backbone, config)
    if device is not None:
        tuned.to(resolve_device(device))  # a trainable copy: moved without hashing
    device = tuned.device
    precision = Precision(config.precision, device)
    params = dict(tuned.model.named_parameters())
    trained = [params[n] for n in names]
    size = tuned.preprocessing.input_size
    dim = _features(tuned, torch.zeros(1, 3, size, size, device=device)).shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = nn.Linear(dim, len(train.classes)).to(device)
    loaders = _Loaders(tuned, config, train)
    optimizer, schedule = _optimizer(tuned, names, trained, head, config,
                                     len(loaders.train))
    best_acc, best_state, history = -1.0, None, []
    bar = progress_bar(total=len(loaders.train) * config.epochs,
                       desc=f"fine-tune ({config.method})", unit="step", disable=not progress)
    start = time.perf_counter()
    step = precision.stepper(optimizer)
    for epoch in range(config.epochs):
        _set_mode(tuned, config, True)
        epoch_loss = _epoch(tuned, head, loaders.train, step, schedule, precision, config, bar)
        if not math.isfinite(epoch_loss):
            raise TrainingError(f"{config.method} fine-tuning: the loss became {epoch_loss} "
                                f"at epoch {epoch + 1}; lower the learning rates")
        _set_mode(tuned, config, False)
        acc = _accuracy(tuned, head, loaders.eval(val), precision)
        history.append({"epoch": epoch + 1, "train_loss": epoch_loss, "val_accuracy": acc})
        bar.set_postfix({"epoch": epoch + 1, "val_acc": f"{acc:.3f}"})  # a log's line per epoch
        if acc > best_acc:
            best_acc = acc
            best_state = ([p.detach().clone() for p in trained],
                          {k: v.detach().clone() for k, v in head.state_dict().items()})
    train_seconds = time.perf_counter() - start
    bar.close()
    with torch.no_grad():
        for p, v in zip(trained, best_state[0], strict=True):
            p.copy_(v)
    head.load_state_dict(best_state[1])
    test_acc = _accuracy(tuned, head, loaders.eval(test), precision) if test is not None \
        else None
    head_params = sum(p.numel() for p in head.parameters())
    return FineTuneResult(config.method, best_acc, test_acc, train_seconds, config.epochs,
                          sum(p.numel() for p in trained) + head_params,
                          _stored_bytes(tuned, config, trained, head_params), history,
                          tuned, head)


def _epoch(tuned: Backbone, head: nn.Module, loader: DataLoader, step: Stepper,
           schedule: torch.optim.lr_scheduler.LambdaLR, precision: Precision,
           config: FineTuneConfig, bar: Any) -> float:
    """One pass over the training data: each step's forward and loss in its autocast
    region, then the scaled backward and step. Returns the mean training loss (the epoch's
    one wait for the device)."""
    loss_sum = torch.zeros((), device=tuned.device)
    for x, y in loader:
        x = to_model_input(x, tuned.preprocessing, tuned.device)
        y = y.to(tuned.device, non_blocking=True)
        with precision.autocast():
            logits = head(_features(tuned, x))
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        step(loss)
        schedule.step()
        loss_sum += loss.detach()
        bar.update(1)
    return float(loss_sum) / max(len(loader), 1)


class _Loaders:
    """The fine-tuning's data loaders: training (shuffled, seeded, augmented as configured),
    and one per evaluated data set, made once (their workers persist)."""

    def __init__(self, tuned: Backbone, config: FineTuneConfig, train: Any) -> None:
        self.prep = tuned.preprocessing
        self.options = {**loader_options(config.num_workers, tuned.device),
                        "batch_size": config.batch_size}
        self.train = DataLoader(
            TransformedDataset(train, build_transform(self.prep, config.augment)),
            shuffle=True, generator=torch.Generator().manual_seed(config.seed),
            drop_last=len(train) > config.batch_size, **self.options)
        self._eval: dict[int, DataLoader] = {}

    def eval(self, ds: Any) -> DataLoader:
        if id(ds) not in self._eval:
            self._eval[id(ds)] = DataLoader(TransformedDataset(ds, build_transform(self.prep)),
                                            **self.options)
        return self._eval[id(ds)]


def _optimizer(tuned: Backbone, names: list[str], trained: list[nn.Parameter], head: nn.Module,
               config: FineTuneConfig, steps_per_epoch: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trained weights (LoRA's at one rate, the backbone's with layer-wise
    decay) and the head, and its warm-up + cosine schedule."""
    from inca.training.schedule import cosine_with_warmup

    if config.method == "lora":
        groups = [{"params": trained, "lr": config.lr_lora}]
    else:
        groups = layer_decay_groups(tuned, names, config.lr_backbone, config.layer_decay)
    optimizer = torch.optim.AdamW(
        [*groups, {"params": list(head.parameters()), "lr": config.lr_head}],
        weight_decay=config.weight_decay, fused=tuned.device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        steps_per_epoch * config.epochs, round(config.warmup_epochs * steps_per_epoch)))
    return optimizer, schedule


def _stored_bytes(tuned: Backbone, config: FineTuneConfig, trained: list[nn.Parameter],
                  head_params: int) -> int:
    """Bytes a task of this method keeps: its trained weights and the float32 head; for
    full fine-tuning the whole backbone, buffers too (it is the task's own copy)."""
    if config.method == "full":
        return sum(v.numel() * v.element_size()
                   for v in tuned.model.state_dict().values()) + head_params * 4
    return sum(p.numel() * p.element_size() for p in trained) + head_params * 4


def trainable_parameter_names(backbone: Backbone, method: str) -> list[str]:
    """Names of the backbone parameters a method trains (in ``backbone.model``'s naming;
    LoRA's are the injected ``lora_`` weights)."""
    return prepare(backbone, FineTuneConfig(method=method))[1]
