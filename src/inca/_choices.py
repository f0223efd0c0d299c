"""The fixed names that settings accept, and defaults shared by a function and its command,
in a module that imports nothing heavy: the configs check against them and ``inca --help``
lists them without importing torch."""

PRECISIONS = ("32", "bf16-mixed", "16-mixed")  # as PyTorch Lightning names them
AUGMENTATIONS = ("none", "crop", "crop-flip")  # see inca.data.transforms.build_transform
BACKBONE_DTYPES = ("float32", "bfloat16", "float16")  # a frozen backbone's weights
# the adapter kinds inca registers (inca.adapters.list_adapters(), which imports torch, may
# list more that a program registered; a test holds the two equal)
ADAPTER_KINDS = ("inca", "linear", "multilayer_linear", "open_inca")
# what :func:`inca.features.extract_to_cache` and ``inca extract`` default to
EXTRACT_LAYERS, EXTRACT_BATCH_SIZE, EXTRACT_DTYPE = "all", 32, "float16"
