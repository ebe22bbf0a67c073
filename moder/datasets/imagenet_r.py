"""ImageNet-R (Class-IL, mammoth's seq-imagenet-r): 30,000 renditions of 200 ImageNet classes.

Layout under root (what extracting the official archive into root gives):

    root/imagenet-r/<wnid>/<rendition>_<n>.jpg        e.g. imagenet-r/n01443537/art_0.jpg
    root/imagenet-r_train.yaml, root/imagenet-r_test.yaml    optional: mammoth's split lists

Download: https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar (2.2 GB), then
`tar -xf imagenet-r.tar -C root`. Labels index the catalog: the 200 wnids in sorted order.

ImageNet-R has no official split. mammoth (aimagelab/mammoth, datasets/seq_imagenet_r.py) reads a
fixed 24,000/6,000 list, datasets/imagenet_r_utils/imagenet-r_{train,test}.yaml (inherited from
CODA-Prompt, no seed or rule published), so:
  * with both files copied into root, the split is exactly mammoth's: the images listed
    under the file's `data:` key (entries "data/imagenet-r/<wnid>/<file>"; its `targets` are not
    read, the label comes from the wnid);
  * without them, an 80/20 split with the same sizes: every image of the present wnid folders,
    sorted by "<wnid>/<file name>", split by `random_split_indices` (torch random_split, seed 42,
    as ZSCL splits datasets without a test set). Deterministic, disjoint and covering, but not
    mammoth's exact images.

Every image, listed or found, must lie inside root (no `..` or symlink out of it).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from moder.datasets import (
    DatasetFormatError,
    DatasetNotFound,
    ImageSplit,
    Split,
    catalog,
    inside_root,
    random_split_indices,
    under_root,
)

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_HOW = "download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar and extract it into the dataset root"


def _wnids() -> list[str]:
    """The catalog's wnids, in label order (kept beside the class names they belong to)."""
    return json.loads(Path(__file__).with_name("catalog").joinpath("imagenet-r.json").read_text())["wnids"]


def _all_images(root: Path, label_of: dict[str, int]) -> list[tuple[str, str]]:
    """("<wnid>", "<file>") of every image under root/imagenet-r, sorted, so the split does not depend on
    listing order."""
    items = []
    for folder in sorted(p for p in (root / "imagenet-r").iterdir() if p.is_dir()):
        if folder.name not in label_of:
            raise DatasetFormatError(f"imagenet-r: {folder} is not one of ImageNet-R's 200 wnid folders")
        items += [
            (folder.name, under_root(root, f, "imagenet-r").name)
            for f in sorted(folder.iterdir())
            if f.suffix.lower() in _IMAGE_SUFFIXES
        ]
    return items


def _mammoth_list(path: Path, label_of: dict[str, int]) -> list[tuple[str, str]]:
    """("<wnid>", "<file>") of every entry of one of mammoth's imagenet-r_{train,test}.yaml files."""
    try:
        # The C loader when PyYAML has it: the train list is 1.1 MB.
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as error:
        raise DatasetFormatError(f"imagenet-r: {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DatasetFormatError(f"imagenet-r: {path} has no `data:` list of image paths (mammoth's format)")
    items = []
    for entry in data["data"]:
        parts = str(entry).split("/")
        if len(parts) < 2 or parts[-2] not in label_of:
            raise DatasetFormatError(
                f"imagenet-r: {path} lists {entry!r}, not <...>/<wnid>/<file> with one of ImageNet-R's wnids"
            )
        items.append((parts[-2], parts[-1]))
    return items


def _split_items(root: Path, split: Split, label_of: dict[str, int]) -> list[tuple[str, str]]:
    """("<wnid>", "<file>") of the split: mammoth's list when root has it, else the seeded 80/20 split."""
    mammoth_files = [root / "imagenet-r_train.yaml", root / "imagenet-r_test.yaml"]
    if not any(path.is_file() for path in mammoth_files):
        items = _all_images(root, label_of)
        train, test = random_split_indices(len(items))
        return [items[i] for i in (train if split == "train" else test)]
    # Half of mammoth's split with our own other half would overlap: both lists or neither.
    absent = next((path for path in mammoth_files if not path.is_file()), None)
    if absent is not None:
        raise DatasetNotFound(
            f"imagenet-r: {absent} not found beside its pair; copy both of mammoth's "
            f"datasets/imagenet_r_utils/imagenet-r_{{train,test}}.yaml into {root}, or neither"
        )
    split_file = root / f"imagenet-r_{split}.yaml"
    items = _mammoth_list(split_file, label_of)
    paths = [inside_root(root, Path("imagenet-r", w, f), "imagenet-r", f"listed in {split_file}") for w, f in items]
    missing = next((path for path in paths if not path.is_file()), None)
    if missing is not None:
        raise DatasetNotFound(f"imagenet-r: {missing}, listed in {split_file}, not found; {_HOW}")
    return items


def load(root: Path, split: Split) -> ImageSplit:
    base = root / "imagenet-r"
    if not base.is_dir():
        raise DatasetNotFound(f"imagenet-r: {base} not found; {_HOW}")
    label_of = {wnid: i for i, wnid in enumerate(_wnids())}
    items = _split_items(root, split, label_of)
    return ImageSplit(
        [str(base / w / f) for w, f in items], [label_of[w] for w, _ in items], catalog("imagenet-r").class_names
    )
