"""Data: image folders, built-ins (Fashion-MNIST, digits), Hugging Face sets, CSV / JSON-lines
manifests, torchvision sets and lists of pairs (through :func:`as_image_dataset`); splits;
transforms."""

from inca.data.base import ImageDataset
from inca.data.builtin import ArrayDataset, list_datasets
from inca.data.datasets import as_image_dataset, has_split, load_dataset
from inca.data.folders import ImageFolderDataset
from inca.data.hf import HFDataset
from inca.data.images import ImageError, ImageTooLargeError, image_size, open_image
from inca.data.manifests import ManifestDataset
from inca.data.splits import (
    ClassAlignedDataset,
    SubsetDataset,
    align_classes,
    limit_dataset,
    split_train_val,
)
from inca.data.transforms import (
    TransformedDataset,
    build_transform,
    default_num_workers,
    loader_options,
    to_model_input,
)
from inca.data.wrappers import WrappedDataset

__all__ = [
    "ArrayDataset",
    "ClassAlignedDataset",
    "HFDataset",
    "align_classes",
    "as_image_dataset",
    "has_split",
    "ImageDataset",
    "ImageError",
    "ImageFolderDataset",
    "ImageTooLargeError",
    "ManifestDataset",
    "SubsetDataset",
    "TransformedDataset",
    "WrappedDataset",
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
