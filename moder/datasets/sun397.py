"""SUN397 (Xiao et al., 2010): 108,754 scene images in 397 classes, MTIL's "SUN397" task.

Layout under root (the official archive extracted in root; what torchvision's SUN397 reads):

    SUN397/ClassName.txt                       one class path per line, e.g. /a/abbey, /a/apse/indoor
    SUN397/<letter>/<class path>/sun_*.jpg     e.g. SUN397/a/apse/indoor/sun_aaahzvrqjcxsagxq.jpg

Official download: http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz
(`tar xzf SUN397.tar.gz -C <root>`).

Classes in ClassName.txt order (torchvision's label order, and ZSCL's), named as CLIP names them:
the class path with "/" and "_" as spaces ("/a/apse/indoor" is "apse indoor"). There is no official
test split: ZSCL (mtil/src/datasets/collections.py, class SUN397) splits all images 80/20 at random with
seed 42 (`random_split_indices`) in the order torchvision lists them, which is `Path.rglob`'s, i.e. the
file system's directory order, so ZSCL's exact split depends on the machine. Here the images are
sorted by path first, which makes the split the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import SUN397

from moder.datasets import (
    DatasetFormatError,
    DatasetNotFound,
    ImageSplit,
    Split,
    catalog,
    remap_to_catalog,
    under_root,
    zscl_split,
)


def _clip_name(class_path: str) -> str:
    """CLIP's name of a class given as torchvision lists it, e.g. "apartment_building/outdoor"."""
    return class_path.replace("/", " ").replace("_", " ")


def _images_and_labels(root: Path) -> tuple[list[str], list[int]]:
    """Every image of the dataset with its label, sorted by path."""
    class_file = root / "SUN397" / "ClassName.txt"
    if not class_file.is_file():
        raise DatasetNotFound(
            f"sun397: {class_file} not found. Download "
            f"http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz and extract it in "
            f"{root} (see docs/datasets.md)."
        )
    try:
        # loader=str: items come back as paths; ImageSplit decodes them later, as RGB.
        dataset = SUN397(root, loader=str)
    except KeyError as error:  # an image folder that ClassName.txt does not list
        raise DatasetFormatError(f"sun397: {class_file} does not list the image folder {error}") from error
    to_catalog = remap_to_catalog(
        dataset.classes,
        catalog("sun397").class_names,
        lambda unknown: f"sun397: {class_file} lists {unknown[0]!r}, not a SUN397 class",
        normalise=_clip_name,
    )
    items = sorted(dataset[i] for i in range(len(dataset)))
    return [str(under_root(root, path, "sun397")) for path, _ in items], [to_catalog[y] for _, y in items]


def load(root: Path, split: Split) -> ImageSplit:
    return zscl_split(ImageSplit(*_images_and_labels(Path(root)), catalog("sun397").class_names), split)
