"""Image features from the frozen image tower: one encoding loop for rendered images, image datasets read from
disk (DataLoader workers, undecodable files named or skipped) and a user's image files."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms
from tqdm.auto import tqdm

from moder.clip import LoadedClip, OpenClipModel
from moder.datasets import BadImage, DatasetFormatError, ImageSplit

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
