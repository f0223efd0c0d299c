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
    "ImageFolderDataset",
    "SubsetDataset",
    "TransformedDataset",
    "build_transform",
    "default_num_workers",
    "loader_options",
    "to_model_input",
    "limit_dataset",
    "list_datasets",
    "load_dataset",
    "split_train_val",
]
