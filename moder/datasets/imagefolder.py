"""A local dataset as one folder per class, with its own train/test split (source "imagefolder").

Layout under root:

    root/train/<class_folder>/<any name>.{jpg,jpeg,png,bmp,gif,webp,tif,tiff}
    root/test/<class_folder>/<any name>.<same>

Class names are the train folder names, sorted, with "_" -> " " (folder "red_circle" is class
"red circle"); labels index that list. Files with other suffixes are ignored. A test folder with
no train folder is refused: the model would be asked for a class it was never shown; so are a
class folder without images in either split (a class taught from nothing, or never tested), and a folder or
file that is a symlink out of root (symlinks within root are followed).
"""

from __future__ import annotations

from pathlib import Path

from moder.datasets import IMAGE_SUFFIXES, DatasetFormatError, DatasetNotFound, ImageSplit, Split, under_root


def _class_folders(root: Path, split: Split) -> list[str]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetNotFound(
            f"imagefolder: {split_dir} not found; put one folder of images per class "
            f"in {split_dir} (see moder/datasets/imagefolder.py)"
        )
    return sorted(under_root(root, p, "imagefolder").name for p in split_dir.iterdir() if p.is_dir())


def _images(root: Path, folder: Path) -> list[str]:
    """The image files of one class folder, sorted by name."""
    return [
        str(under_root(root, p, "imagefolder")) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
    ]


def load(root: Path, split: Split) -> ImageSplit:
    classes = _class_folders(root, "train")
    if not classes:
        raise DatasetFormatError(f"imagefolder: {root / 'train'} has no class folders")
    folders = _class_folders(root, split)
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise DatasetFormatError(
            f"imagefolder: {root / split} has class folder(s) {', '.join(unknown)} that {root / 'train'} does not have"
        )
    label_of = {folder: i for i, folder in enumerate(classes)}
    images, labels = [], []
    for folder in classes:  # every class in both splits: taught from no example, or never tested, it means nothing
        files = _images(root, root / split / folder) if folder in folders else []
        if not files:
            raise DatasetFormatError(
                f"imagefolder: class folder {root / split / folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        images += files
        labels += [label_of[folder]] * len(files)
    return ImageSplit(images, labels, [folder.replace("_", " ") for folder in classes])
