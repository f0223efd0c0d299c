"""Data: image folders, built-ins (Fashion-MNIST, digits), HF sets on disk; splits; transforms."""

from inca.data.datasets import (
    ArrayDataset,
    ClassAlignedDataset,
    ImageDataset,
    ImageFolderDataset,
    SubsetDataset,
    align_classes,
    limit_dataset,
    list_datasets,
    load_dataset,
    split_train_val,
)
from inca.data.images import ImageError, ImageTooLargeError, image_size, open_image
from inca.data.transforms import (
    TransformedDataset,
    build_transform,
    default_num_workers,
    loader_options,
    to_model_input,
)

__all__ = [
    "ArrayDataset",
    "ClassAlignedDataset",
    "align_classes",
    "ImageDataset",
    "ImageError",
    "ImageFolderDataset",
    "ImageTooLargeError",
    "SubsetDataset",
    "TransformedDataset",
    "build_transform",
    "default_num_workers",
    "loader_options",
    "to_model_input",
    "image_size",
    "limit_dataset",
    "list_datasets",
    "load_dataset",
    "open_image",
    "split_train_val",
]
