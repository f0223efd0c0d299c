"""The fixed names that settings accept, in a module that imports nothing heavy: the
configs check against them and ``inca --help`` lists them without importing torch."""

PRECISIONS = ("32", "bf16-mixed", "16-mixed")  # as PyTorch Lightning names them
AUGMENTATIONS = ("none", "crop", "crop-flip")  # see inca.data.transforms.build_transform
