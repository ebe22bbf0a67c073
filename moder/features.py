"""Feature and prototype tables as Parquet, tagged with the model that made them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms
from tqdm.auto import tqdm

from moder.clip import LoadedClip, OpenClipModel
from moder.datasets import BadImage, DatasetFormatError, ImageSplit
from moder.io import atomic_path

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

_MODEL_KEY, _DATASET_KEY, _CLASSES_KEY = b"moder.model", b"moder.dataset", b"moder.classes"
_TEMPLATES_KEY = b"moder.templates"


class FeatureFileError(ValueError):
    """A feature file is missing, malformed or was made by another model; the message names the file."""


@dataclass(frozen=True)
class FeatureTable:
    """Rows of one dataset split (or one row per class for prototypes)."""

    vectors: Tensor  # [N, d] float32
    labels: Tensor  # [N] int64, indices into class_names
    class_names: list[str]
    dataset: str
    model: str  # ModelIdentity JSON of the producing model
    templates: tuple[str, ...] = ()  # prototype tables: the prompt templates they were encoded from

    def select(self, classes: list[int]) -> tuple[Tensor, Tensor]:
        """The rows of `classes` only, labelled by position in `classes` (a task's slice of its dataset)."""
        own = torch.tensor(classes, dtype=torch.long)
        keep = torch.isin(self.labels, own)
        position = torch.full((len(self.class_names),), -1, dtype=torch.long)
        position[own] = torch.arange(len(own))
        return self.vectors[keep], position[self.labels[keep]]


@torch.no_grad()
def encode_images(
    model: OpenClipModel,
    batches: Iterable[Tensor],
    device: str = "cpu",
    precision: Precision = "fp32",
    finish: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """L2-normalised image features of every batch, in order, as float32 on the CPU.

    `batches` are preprocessed image tensors (a DataLoader's, or chunks of rendered images), or, with
    `finish`, what `finish` completes on the device (see `UintPreprocess`); with bf16/fp16 the image
    tower runs under autocast, the normalisation in float32.
    """
    device_type = torch.device(device).type
    out = []
    for images in batches:
        images = images.to(device, non_blocking=True)
        if finish is not None:
            images = finish(images)
        with torch.autocast(device_type, dtype=_AUTOCAST.get(precision), enabled=precision != "fp32"):
            features = model.encode_image(images)
        out.append(F.normalize(features.float(), dim=-1).cpu())
    if not out:  # torch.cat's own message ("expected a non-empty list") does not say what was empty
        raise ValueError("encode_images: no batches of images to encode")
    return torch.cat(out)


@dataclass(frozen=True)
class UintPreprocess:
    """open_clip's preprocess cut before its float conversion: DataLoader workers hand over uint8 images,
    a quarter of float32's bytes (at ViT-B-16's 224 px, 154 MB per batch of 256 become 39 MB through
    shared memory, pinning and the copy to the GPU, which bounded extraction; BENCHMARKS.md), and the
    division by 255 and the normalisation run on the device, the same float32 operations as
    ToTensor + Normalize."""

    to_uint8: Callable[[Any], Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, preprocess: Callable | None) -> UintPreprocess | None:
        """The cut of a Compose ending in ToTensor (open_clip's MaybeToTensor is one) and Normalize; None
        for any other transform, which then runs whole in the workers."""
        if not isinstance(preprocess, transforms.Compose) or len(preprocess.transforms) < 2:
            return None
        *head, to_tensor, normalize = preprocess.transforms
        if not (isinstance(to_tensor, transforms.ToTensor) and isinstance(normalize, transforms.Normalize)):
            return None
        to_uint8 = transforms.Compose([*head, transforms.PILToTensor()])
        return cls(to_uint8, tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))

    def finish(self, images: Tensor) -> Tensor:
        images = images.float().div(255)
        return transforms.functional.normalize(images, list(self.mean), list(self.std))


@dataclass(frozen=True)
class Unreadable:
    """Stands in for an image that cannot be decoded. A BadImage raised in a DataLoader worker would reach
    the caller as a multi-line traceback and end the whole loader; as an item it travels like any other,
    and the caller decides whether to fail or skip it."""

    image: str
    message: str


class _Decoded(Dataset):
    """An ImageSplit whose undecodable images come back as (Unreadable, label) instead of raising."""

    def __init__(self, data: ImageSplit):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            return self.data[index]
        except BadImage as error:
            return Unreadable(str(self.data.images[index]), str(error)), self.data.labels[index]


def _collate_readable(items: list[tuple[Any, int]]) -> tuple[Tensor | None, Tensor, list[Unreadable]]:
    """(images, labels) of a batch's decodable items, so each label stays with its image, and its
    undecodable ones; images is None when no item of the batch could be decoded."""
    good = [(image, label) for image, label in items if not isinstance(image, Unreadable)]
    bad = [image for image, _ in items if isinstance(image, Unreadable)]
    if not good:
        return None, torch.empty(0, dtype=torch.long), bad
    images, labels = default_collate(good)
    return images, labels, bad


def encode_image_split(
    model: OpenClipModel,
    data: ImageSplit,
    *,
    batch_size: int,
    workers: int,
    device: str,
    precision: Precision,
    skip_bad_images: bool,
    where: str,
    skip_hint: str,
    progress: bool = False,
) -> tuple[Tensor, Tensor, list[str]]:
    """Features and labels of the decodable images of `data` (`where` names it in errors), and the
    undecodable images skipped: none unless `skip_bad_images`, else the first fails naming it (and
    `skip_hint` says how to skip instead). `data` carries its preprocessing (ImageSplit.with_transform);
    open_clip's is finished on the device (UintPreprocess)."""
    cut = UintPreprocess.of(data.transform)
    if cut is not None:
        data = data.with_transform(cut.to_uint8)
    loader = DataLoader(
        _Decoded(data),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        collate_fn=_collate_readable,
    )
    labels: list[Tensor] = []
    skipped: list[str] = []

    def batches() -> Iterator[Tensor]:
        for images, batch_labels, bad in tqdm(loader, desc=f"encode {where}", disable=not progress, leave=False):
            if bad and not skip_bad_images:
                raise BadImage(f"{bad[0].message}; {skip_hint}")
            skipped.extend(unreadable.image for unreadable in bad)
            if images is not None:
                labels.append(batch_labels)
                yield images
        if not labels:
            raise DatasetFormatError(f"none of the {len(data)} images of {where} can be decoded, e.g. {skipped[0]}")

    features = encode_images(model, batches(), device, precision, None if cut is None else cut.finish)
    return features, torch.cat(labels), skipped


def encode_image_files(
    clip: LoadedClip, files: list[Path], *, batch_size: int, skip_bad_images: bool, device: str = "cpu"
) -> tuple[Tensor, list[str]]:
    """Features of image files through the backbone's own preprocessing, with a progress bar; the
    undecodable files skipped (only with `skip_bad_images`)."""
    data = ImageSplit([str(f) for f in files], [0] * len(files), ["image"], transform=clip.preprocess)
    features, _, skipped = encode_image_split(
        clip.model,
        data,
        batch_size=batch_size,
        workers=0,
        device=device,
        precision="fp32",
        skip_bad_images=skip_bad_images,
        where=f"{len(files)} images",
        skip_hint="--skip-bad-images skips such images",
        progress=True,
    )
    return features, skipped


def write_features(path: Path | str, table: FeatureTable) -> None:
    """One Parquet file, written atomically: `label` and a fixed-size float32 `feature` column.

    Non-finite vectors are refused (a damaged backbone or preprocessing makes them)."""
    if not bool(torch.isfinite(table.vectors).all()):
        raise FeatureFileError(
            f"refusing to write {path}: the {table.dataset} features have non-finite values "
            "(check the backbone checkpoint and its preprocessing)"
        )
    vectors = table.vectors.detach().cpu().float().contiguous().numpy()
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
    arrow = pa.table({"label": pa.array(table.labels.cpu().numpy().astype(np.int32)), "feature": column})
    arrow = arrow.replace_schema_metadata(
        {
            _MODEL_KEY: table.model.encode(),
            _DATASET_KEY: table.dataset.encode(),
            _CLASSES_KEY: json.dumps(table.class_names).encode(),
            **({_TEMPLATES_KEY: json.dumps(list(table.templates)).encode()} if table.templates else {}),
        }
    )
    with atomic_path(path) as temporary:
        pq.write_table(arrow, temporary)


def read_features(path: Path | str, model: str | None = None, dataset: str | None = None) -> FeatureTable:
    """Read a table written by `write_features`; with `model` (and `dataset`), refuse one made by
    another model (or for another dataset). Damaged contents are refused naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"feature file not found: {path}")
    try:
        arrow = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise FeatureFileError(f"{path}: not a readable Parquet file ({error})") from None
    metadata = arrow.schema.metadata or {}
    missing = [key.decode() for key in (_MODEL_KEY, _DATASET_KEY, _CLASSES_KEY) if key not in metadata]
    if missing or "feature" not in arrow.column_names or "label" not in arrow.column_names:
        raise FeatureFileError(
            f"{path}: not a MoDER feature file (missing {', '.join(missing) or 'feature/label columns'})"
        )
    producer = metadata[_MODEL_KEY].decode()
    if model is not None and producer != model:
        raise FeatureFileError(
            f"{path} was made by another model:\n  file:     {producer}\n  expected: {model}\n"
            "re-run its extract stage with the current model"
        )
    tagged = metadata[_DATASET_KEY].decode()
    if dataset is not None and tagged != dataset:
        raise FeatureFileError(f"{path} holds features of dataset {tagged!r}, not {dataset!r}")
    column = arrow.column("feature").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or arrow.column("label").null_count or column.null_count:
        raise FeatureFileError(f"{path}: not a MoDER feature file (feature must be a fixed-size list, no nulls)")
    width = column.type.list_size
    vectors = np.asarray(column.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)
    labels = arrow.column("label").to_numpy().astype(np.int64)
    try:
        class_names = json.loads(metadata[_CLASSES_KEY])
        templates = tuple(json.loads(metadata[_TEMPLATES_KEY])) if _TEMPLATES_KEY in metadata else ()
    except ValueError as error:
        raise FeatureFileError(f"{path}: its class list or templates are not valid JSON ({error})") from None
    if not np.isfinite(vectors).all():
        raise FeatureFileError(
            f"{path}: {int((~np.isfinite(vectors)).any(1).sum())} feature rows have non-finite values"
        )
    outside = labels[(labels < 0) | (labels >= len(class_names))]
    if outside.size:
        raise FeatureFileError(f"{path}: label {int(outside[0])} is outside its {len(class_names)} classes")
    return FeatureTable(
        torch.from_numpy(vectors.copy()), torch.from_numpy(labels), class_names, tagged, producer, templates
    )


def read_prototypes(path: Path | str, model: str, dataset: str) -> FeatureTable:
    """A prototype table (`classes.parquet`): one row per class, in class order."""
    table = read_features(path, model, dataset)
    if not torch.equal(table.labels, torch.arange(len(table.class_names))):
        raise FeatureFileError(
            f"{path}: {len(table.labels)} prototype rows do not match its {len(table.class_names)} classes one to one"
        )
    return table
