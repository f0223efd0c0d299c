"""The fixed names that settings accept, and defaults shared by a function and its command,
in a module that imports nothing heavy: the configs check against them and ``inca --help``
lists them without importing torch."""

PRECISIONS = ("32", "bf16-mixed", "16-mixed")  # as PyTorch Lightning names them
# other names accepted for them (Lightning's older ones, torch's dtypes)
PRECISION_ALIASES = {"32-true": "32", "fp32": "32", "float32": "32", "bf16": "bf16-mixed",
                     "16": "16-mixed", "fp16": "16-mixed"}
# the precision of every function, config and command unless told otherwise: bf16-mixed on a
# GPU that supports it, 16-mixed on one that does not, 32 on the CPU (decided per device by
# inca._precision.resolve_precision)
DEFAULT_PRECISION = "auto"
AUGMENTATIONS = ("none", "crop", "crop-flip")  # see inca.data.transforms.build_transform
BACKBONE_DTYPES = ("float32", "bfloat16", "float16")  # a frozen backbone's weights
# the adapter kinds inca registers (inca.adapters.list_adapters(), which imports torch, may
# list more that a program registered; a test holds the two equal)
ADAPTER_KINDS = ("inca", "linear", "multilayer_linear", "open_inca")
# what :func:`inca.features.extract_to_cache` and ``inca extract`` default to
EXTRACT_LAYERS, EXTRACT_BATCH_SIZE, EXTRACT_DTYPE = "all", 32, "float16"


def precision_name(precision: str | None) -> str:
    """``"auto"`` or a name from :data:`PRECISIONS` for ``precision`` (an alias, or ``None``
    for ``"auto"``); :class:`~inca.errors.ConfigError` naming the choices otherwise. The one
    check of a precision's name, for configs, functions and commands alike."""
    if precision is None:
        return DEFAULT_PRECISION
    name = PRECISION_ALIASES.get(str(precision), str(precision))
    if name != DEFAULT_PRECISION and name not in PRECISIONS:
        from inca.errors import ConfigError
        raise ConfigError(f"precision must be one of {DEFAULT_PRECISION}, "
                          f"{', '.join(PRECISIONS)} (or {', '.join(PRECISION_ALIASES)}); "
                          f"got {precision!r}")
    return name
