"""Image datasets of the real benchmarks: one small adapter module per dataset, one registry.

Every adapter reads the files a normal download produces (torchvision's layout where torchvision
has the dataset) and returns an `ImageSplit` whose labels index the class names of the dataset's
catalog file (`catalog/<source>.json`: CLIP's published class names and prompt templates, data not
code); where a dataset numbers its classes its own way, `remap_to_catalog` maps them onto the catalog
by name. Nothing is downloaded here: a missing dataset is a `DatasetNotFound` naming what was looked
for and how to provide a local copy.

File names an adapter reads from the dataset's own lists, or finds walking its folders, are not
trusted: each file must lie inside the dataset root once `..` and symlinks are resolved
(`inside_root`), an empty split is refused, and an image that cannot be decoded is a `BadImage`
naming the file.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from moder.errors import UserError

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})  # files read as images
_CATALOG_DIR = Path(__file__).with_name("catalog")

# source name -> adapter module (moder.datasets.<module>.load(root, split) -> ImageSplit).
ADAPTERS: dict[str, str] = {
    "aircraft": "aircraft",
    "caltech101": "caltech101",
    "cifar100": "cifar100",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "flowers": "flowers",
    "food": "food",
    "mnist": "mnist",
    "pets": "pets",
    "cars": "cars",
    "sun397": "sun397",
    "imagenet-r": "imagenet_r",
    "cub200": "cub200",
    "imagefolder": "imagefolder",
    "csv": "csv_list",
}


class DatasetNotFound(UserError, FileNotFoundError):
    """A dataset's files are not where params.yaml points; the message says what was looked for and how to fix it."""


class DatasetFormatError(UserError, ValueError):
    """A dataset's files are there but do not hold what the adapter expects; the message names the file."""


class BadImage(DatasetFormatError):
    """An image file that cannot be decoded (truncated, not an image at all); the message names the file."""


def require(source: str, paths: Sequence[Path], how: str) -> None:
    """Refuses a dataset that lacks any of `paths` (files or folders it needs), as a DatasetNotFound naming
    the first one missing and `how` to get the dataset."""
    missing = next((path for path in paths if not path.exists()), None)
    if missing is not None:
        raise DatasetNotFound(f"{source}: {missing} not found; {how}")


def inside_root(root: Path, name: str | Path, source: str, named_in: str = "") -> Path:
    """`root / name`, for a file `name` (relative to root) that the dataset's own files give: a row of a
    list, or an entry found walking its folders. Such a name is not trusted: a row `../../etc/passwd`,
    an absolute path or a symlink out of the root would have the stage read, and store features of,
    files that are not the dataset's. So each is refused, as a DatasetFormatError naming the path and
    `named_in` (where the name came from, e.g. "train.csv line 3"). Symlinks that stay inside root are
    fine, and root itself may be a symlink."""
    origin = f" ({named_in})" if named_in else ""
    if Path(name).is_absolute():
        raise DatasetFormatError(
            f"{source}: {name}{origin} is an absolute path; name files relative to the dataset root {root}"
        )
    path = root / name
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DatasetFormatError(f"{source}: {path}{origin} resolves to {resolved}, outside the dataset root {root}")
    return path


def under_root(root: Path, path: str | Path, source: str, named_in: str = "") -> Path:
    """`inside_root` for a path already joined onto root (a folder walk's, or torchvision's items)."""
    path = Path(path)
    # os.path.join drops root before an absolute name (torchvision's Pets, Cars, Aircraft join so): such a
    # path is not under root as written, and stays absolute for inside_root to refuse.
    return inside_root(root, path.relative_to(root) if path.is_relative_to(root) else path, source, named_in)


def listed_items(dataset: Any, root: Path, source: str, named_in: str) -> tuple[list[str], list[int]]:
    """Image paths and labels of a torchvision dataset built with loader=str, in its order: with that
    loader its items are (path, label) pairs, so no image is decoded here. Each path comes from the
    dataset's own list (`named_in`), so it must lie `under_root`."""
    items = [dataset[i] for i in range(len(dataset))]
    return [str(under_root(root, path, source, named_in)) for path, _ in items], [label for _, label in items]


@dataclass(frozen=True)
class Catalog:
    """What CLIP's zero-shot evaluation uses for one dataset: class names in label order, prompt templates."""

    class_names: list[str]
    templates: list[str]


@cache
def catalog(source: str) -> Catalog:
    path = _CATALOG_DIR / f"{source}.json"
    if not path.is_file():
        raise KeyError(f"no catalog for dataset source {source!r} (looked for {path})")
    data = json.loads(path.read_text())
    return Catalog(list(data["class_names"]), list(data["templates"]))


def remap_to_catalog(
    own_names: Sequence[str],
    catalog_names: Sequence[str],
    unknown_message: Callable[[list[str]], str],
    normalise: Callable[[str], str] = str,
) -> list[int]:
    """Catalog label of each of the dataset's own classes: label i as the dataset (torchvision, or its
    files) numbers it is catalog label `result[i]`. The two numberings differ (torchvision numbers only
    the classes a split file mentions, a file may order them otherwise), so they meet on the name:
    `normalise(own_names[i])` (default: the name as is) is spelt as in `catalog_names`. Names with no
    catalog entry are a DatasetFormatError, `unknown_message(those names, as the dataset gives them)`."""
    index = {name: i for i, name in enumerate(catalog_names)}
    unknown = [name for name in own_names if normalise(name) not in index]
    if unknown:
        raise DatasetFormatError(unknown_message(unknown))
    return [index[normalise(name)] for name in own_names]


def check_class_ids(labels: Sequence[int], n_classes: int, source: str, where: Path) -> None:
    """Refuses a label (class id - 1, for datasets whose files number classes 1..n_classes) outside the
    catalog. ImageSplit refuses it too, but cannot name `where`, the file that gave it."""
    if any(not 0 <= y < n_classes for y in labels):
        raise DatasetFormatError(f"{source}: {where} has a class id outside 1-{n_classes}")


def _read_rgb(item: Any) -> Image.Image:
    """An image in memory, or an image file decoded, as RGB; a file that cannot be decoded is a BadImage."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    try:
        with Image.open(item) as image:
            # convert decodes the pixels: Pillow opens lazily, so a truncated file fails here, not later.
            return image.convert("RGB")
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, EOFError, struct.error, ...
        raise BadImage(f"cannot decode image {item}: {error}") from error


class ImageSplit(Dataset):
    """One split of a dataset: images (file paths, PIL images already in memory, or one uint8 array of
    them all for a dataset stored so) and labels.

    `labels[i]` indexes `class_names`. `transform` (e.g. open_clip's preprocess) is applied per
    item, so a DataLoader with workers decodes and resizes in parallel.
    """

    def __init__(
        self,
        images: Sequence[Any] | np.ndarray,
        labels: Sequence[int],
        class_names: list[str],
        read: Callable[[Any], Image.Image] = _read_rgb,
        transform: Callable | None = None,
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.class_names = images, [int(y) for y in labels], class_names
        self.read, self.transform = read, transform
        bad = [y for y in self.labels if not 0 <= y < len(class_names)]
        if bad:
            raise ValueError(f"label {bad[0]} outside the {len(class_names)} classes")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.read(self.images[index])
        return (image if self.transform is None else self.transform(image)), self.labels[index]

    def file(self, index: int) -> str | None:
        """The file item `index` is decoded from, where the split reads image files itself (`_read_rgb`), so
        that a caller may decode its bytes another way (moder.encode, decode on the device); None for an
        image in memory or a split with its own reader."""
        item = self.images[index]
        return str(item) if self.read is _read_rgb and isinstance(item, str | Path) else None

    def with_transform(self, transform: Callable | None) -> ImageSplit:
        return ImageSplit(self.images, self.labels, self.class_names, self.read, transform)

    def subset(self, indices: Sequence[int]) -> ImageSplit:
        return ImageSplit(
            [self.images[i] for i in indices],
            [self.labels[i] for i in indices],
            self.class_names,
            self.read,
            self.transform,
        )


def random_split_indices(n: int, seed: int = 42, train_fraction: float = 0.8) -> tuple[list[int], list[int]]:
    """ZSCL's split for datasets without an official test set (Caltech101, EuroSAT, SUN397; ZSCL
    mtil/src/datasets/collections.py, ClassificationDataset.split_dataset): random_split of the
    dataset's n items, in the adapter's item order, into int(0.8 * n) train and the rest test with
    torch.Generator().manual_seed(42). The lengths must be these integers: fractional lengths
    [0.8, 0.2] round differently (n=10 gives 9/1, ZSCL 8/2)."""
    n_train = int(train_fraction * n)
    # random_split only takes len() of and indexes its dataset, which a range of the indices does.
    train, test = torch.utils.data.random_split(
        cast(Dataset[int], range(n)), [n_train, n - n_train], generator=torch.Generator().manual_seed(seed)
    )
    return list(train.indices), list(test.indices)


def zscl_split(whole: ImageSplit, split: Split) -> ImageSplit:
    """The `split` half of a dataset with no official test set, by `random_split_indices` over its items."""
    train, test = random_split_indices(len(whole))
    return whole.subset(train if split == "train" else test)


def load_split(source: str, root: Path | str, split: Split) -> ImageSplit:
    """The `split` of dataset `source` stored under `root` (see each adapter's docstring for the layout)."""
    if source not in ADAPTERS:
        raise KeyError(f"unknown dataset source {source!r}; known: {', '.join(ADAPTERS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    root = Path(root)
    if not root.exists():
        raise DatasetNotFound(
            f"{source}: dataset root {root} does not exist. Download the dataset there (see docs/datasets.md "
            f"for its layout), or set datasets.<name>.root in params.yaml to where it already is."
        )
    module = importlib.import_module(f"moder.datasets.{ADAPTERS[source]}")
    data = module.load(root, split)
    if not len(data):
        # Refused here, not left to fail in torch.cat deep in extraction; adapters say more where they can.
        raise DatasetFormatError(f"{source}: the {split} split of {root} has no images")
    return data
