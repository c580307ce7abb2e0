"""Record types and loaders for ViSU, ViSU-Text tables, NSFW-Caps and zero-shot tasks (docs/METHOD.md, "Data formats")."""

from .images import load_image
from .nsfw_caps import CaptionPairSet, load_nsfw_caps
from .records import (
    CaptionPair,
    DataFormatError,
    Mode,
    Quadruplet,
    QuadrupletSet,
    SkipReport,
    ZeroShotTask,
)
from .splits import distractor_images, load_split
from .tables import load_quadruplets, load_visu_table
from .torch_datasets import CaptionPairImages, QuadrupletImages
from .visu import load_visu_json
from .zeroshot import (
    ZeroShotImages,
    load_image_folder_task,
    load_torchvision_task,
    load_webdataset_task,
)

__all__ = [
    "CaptionPair",
    "CaptionPairImages",
    "CaptionPairSet",
    "DataFormatError",
    "Mode",
    "Quadruplet",
    "QuadrupletImages",
    "QuadrupletSet",
    "SkipReport",
    "ZeroShotImages",
    "ZeroShotTask",
    "distractor_images",
    "load_image",
    "load_image_folder_task",
    "load_nsfw_caps",
    "load_quadruplets",
    "load_split",
    "load_torchvision_task",
    "load_visu_json",
    "load_visu_table",
    "load_webdataset_task",
]
