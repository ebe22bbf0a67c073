"""CUB-200-2011 (Class-IL, mammoth's seq-cub200): 11,788 images of 200 bird species, the official
train/test split of train_test_split.txt (5,994/5,794).

Layout under root (what extracting the official archive into root gives):

    root/CUB_200_2011/images.txt                  "<image id> <class folder>/<file>.jpg" per line
    root/CUB_200_2011/image_class_labels.txt      "<image id> <class id 1-200>"
    root/CUB_200_2011/train_test_split.txt        "<image id> <1 = train, 0 = test>"
    root/CUB_200_2011/images/<NNN.Class_name>/<file>.jpg

Download: CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 (1.1 GB), then
`tar -xzf CUB_200_2011.tgz -C root`. torchvision has no CUB reader: the three text files are read
here. Label = class id - 1, the order of classes.txt and of the catalog. An images.txt path that
is absolute or leads out of root (`..`, a symlink) is refused.
(mammoth's seq-cub200 downloads its own preprocessed npz copy; this reads the original files.)
"""

from __future__ import annotations

from pathlib import Path

from moder.datasets import DatasetFormatError, DatasetNotFound, ImageSplit, Split, catalog, under_root

_HOW = (
    "download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and extract it into the dataset root"
)


def _table(path: Path) -> dict[int, str]:
    """image id -> the rest of the line, for CUB's "<image id> <value>" files."""
    if not path.is_file():
        raise DatasetNotFound(f"cub200: {path} not found; {_HOW}")
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise DatasetFormatError(f"cub200: {path} line {number} is not '<image id> <value>': {line!r}")
        table[int(key)] = value
    return table


def _integer(value: str, path: Path, image_id: int, allowed: range) -> int:
    if not value.isdigit() or int(value) not in allowed:
        raise DatasetFormatError(
            f"cub200: {path} gives image {image_id} {value!r}, not an integer in {allowed.start}-{allowed.stop - 1}"
        )
    return int(value)


def load(root: Path, split: Split) -> ImageSplit:
    base = root / "CUB_200_2011"
    if not (base / "images").is_dir():
        raise DatasetNotFound(f"cub200: {base / 'images'} not found; {_HOW}")
    names = catalog("cub200").class_names
    images_file, labels_file = base / "images.txt", base / "image_class_labels.txt"
    split_file = base / "train_test_split.txt"
    paths, classes, is_train = _table(images_file), _table(labels_file), _table(split_file)
    for path, table in ((labels_file, classes), (split_file, is_train)):
        if table.keys() != paths.keys():
            raise DatasetFormatError(f"cub200: {path} does not list the same image ids as {images_file}")
    wanted = 1 if split == "train" else 0
    ids = [i for i in sorted(paths) if _integer(is_train[i], split_file, i, range(2)) == wanted]
    labels = [_integer(classes[i], labels_file, i, range(1, len(names) + 1)) - 1 for i in ids]
    images = [under_root(root, base / "images" / paths[i], "cub200", f"image {i} of {images_file}") for i in ids]
    return ImageSplit([str(path) for path in images], labels, names)
