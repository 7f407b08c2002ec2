"""Task families (data sources)."""

from innerloop.data.download import (
    ChecksumError,
    CorruptArchiveError,
    DataError,
    DownloadError,
    UnsafeArchiveError,
    download,
    extract_zip,
    iter_zip,
    safe_members,
    sha256_file,
)
from innerloop.data.factory import TASK_FAMILIES, MissingDataError, image_splits, task_family
from innerloop.data.global_labels import GlobalLabelBatches
from innerloop.data.images import ImageClassDataset, MiniImageNet, image_folder_dataset
from innerloop.data.metadataset import EpisodeDescription, MetaDatasetEpisodes, load_sources
from innerloop.data.omniglot import Omniglot, load_omniglot_characters
from innerloop.data.regression import FAMILIES, LinearRegression, Sinusoid, make_family
from innerloop.data.sampling import FewShotClassification, collate_tasks, task_loader

__all__ = [
    "FAMILIES",
    "TASK_FAMILIES",
    "ChecksumError",
    "CorruptArchiveError",
    "DataError",
    "DownloadError",
    "EpisodeDescription",
    "FewShotClassification",
    "GlobalLabelBatches",
    "ImageClassDataset",
    "LinearRegression",
    "MetaDatasetEpisodes",
    "MiniImageNet",
    "MissingDataError",
    "Omniglot",
    "Sinusoid",
    "UnsafeArchiveError",
    "collate_tasks",
    "download",
    "extract_zip",
    "image_folder_dataset",
    "image_splits",
    "iter_zip",
    "load_omniglot_characters",
    "load_sources",
    "make_family",
    "safe_members",
    "sha256_file",
    "task_family",
    "task_loader",
]
