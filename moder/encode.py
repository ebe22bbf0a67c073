"""Image features from the frozen image tower: one encoding loop for rendered images, image datasets read from
disk (DataLoader workers, undecodable files named or skipped) and a user's image files.

Image files are decoded in the DataLoader workers with PIL, open_clip's own preprocessing (`decode="workers"`),
or, with `decode="device"`, JPEG files are only read there and decoded and resized on the model's device
(TorchCodec's decode_jpeg, torchvision's successor: nvJPEG on a GPU), which frees extraction from the CPU's
decoding rate (BENCHMARKS.md). The two differ by at most one level of 255 in a resized pixel on the CPU
(libjpeg-turbo both, torch's bicubic resize against PIL's), a little more on a GPU (nvJPEG's own IDCT)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import ExifTags, Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchcodec.decoders import decode_jpeg
from torchvision import transforms
from tqdm.auto import tqdm

from moder.clip import LoadedClip, OpenClipModel
from moder.datasets import BadImage, DatasetFormatError, ImageSplit
from moder.errors import UserError

Precision = Literal["fp32", "bf16", "fp16"]
Decode = Literal["workers", "device"]  # where image files are decoded (module docstring)
JPEG_START = b"\xff\xd8\xff"  # start-of-image marker and the next marker's first byte
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


class DecodeUnsupported(UserError, ValueError):
    """Decoding on the device asked of a preprocess it cannot finish there; the message names its steps."""


_WORKERS_INSTEAD = "set extract.decode: workers"


@dataclass(frozen=True)
class UintPreprocess:
    """open_clip's preprocess cut before its float conversion: DataLoader workers hand over uint8 images,
    a quarter of float32's bytes (at ViT-B-16's 224 px, 154 MB per batch of 256 become 39 MB through
    shared memory, pinning and the copy to the GPU, which bounded extraction; BENCHMARKS.md), and the
    division by 255 and the normalisation run on the device, the same float32 operations as
    ToTensor + Normalize."""

    to_uint8: Callable[[Any], Tensor]
    resize: Callable[[Tensor], Tensor]  # the steps before ToTensor (resize, crop), here on uint8 [3, H, W] tensors
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
        mean, std = tuple(map(float, normalize.mean)), tuple(map(float, normalize.std))
        return cls(to_uint8, transforms.Compose(head), mean, std)

    def check_resize_takes_tensors(self) -> None:
        """Decoding on the device resizes decoded tensors with the preprocess's own steps: torchvision's
        Resize and CenterCrop take tensors (open_clip's mode conversion passes them through); refuse others."""
        steps = f"extract.decode: device: the preprocess steps {_step_names(self.resize)}"
        try:
            resized = self.resize(torch.zeros(3, 4, 4, dtype=torch.uint8))
        except (TypeError, AttributeError) as error:
            raise DecodeUnsupported(f"{steps} do not take tensors ({error}); {_WORKERS_INSTEAD}") from None
        if not isinstance(resized, Tensor) or resized.dtype != torch.uint8 or resized.dim() != 3:
            raise DecodeUnsupported(f"{steps} do not give uint8 [3, H, W] tensors; {_WORKERS_INSTEAD}")

    def finish(self, images: Tensor) -> Tensor:
        images = images.float().div(255)
        return transforms.functional.normalize(images, list(self.mean), list(self.std))


def _step_names(transform: Callable | None) -> str:
    """A transform in one line: its steps' class names (a Compose's repr spans lines)."""
    steps = transform.transforms if isinstance(transform, transforms.Compose) else [transform]
    return ", ".join(type(step).__name__ for step in steps)


@dataclass(frozen=True)
class Unreadable:
    """Stands in for an image that cannot be decoded. A BadImage raised in a DataLoader worker would reach
    the caller as a multi-line traceback and end the whole loader; as an item it travels like any other,
    and the caller decides whether to fail or skip it."""

    image: str
    message: str


@dataclass(frozen=True)
class JpegFile:
    """A JPEG file's bytes, read by a DataLoader worker and decoded on the device (`DeviceDecode`)."""

    path: str
    data: Tensor  # uint8 [bytes]


class _Decoded(Dataset):
    """An ImageSplit whose undecodable images come back as (Unreadable, label) instead of raising; with
    `jpeg_bytes`, a JPEG file comes back as its bytes (JpegFile), any other image as the split gives it."""

    def __init__(self, data: ImageSplit, jpeg_bytes: bool = False):
        self.data, self.jpeg_bytes = data, jpeg_bytes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        label = self.data.labels[index]
        path = self.data.file(index) if self.jpeg_bytes else None
        if path is not None:
            try:
                raw = Path(path).read_bytes()
            except OSError as error:
                return Unreadable(path, f"cannot decode image {path}: {error}"), label
            if raw.startswith(JPEG_START) and not _exif_turned(raw):
                return JpegFile(path, torch.frombuffer(bytearray(raw), dtype=torch.uint8)), label
        try:
            return self.data[index]
        except BadImage as error:
            return Unreadable(str(self.data.images[index]), str(error)), label


def _exif_turned(raw: bytes) -> bool:
    """Whether a JPEG file's EXIF asks for a rotation or mirroring. TorchCodec's decoder applies it and PIL's
    does not (nor, then, open_clip's preprocess), so such a file takes PIL's way and both decoders see the
    same image. Reading the header alone: about 40 microseconds a file."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.getexif().get(ExifTags.Base.Orientation, 1) != 1
    except Exception:  # a header PIL cannot read: its way then names the file as undecodable
        return True


def _collate_readable(items: list[tuple[Any, int]]) -> tuple[Tensor | list[Any] | None, Tensor, list[Unreadable]]:
    """(images, labels) of a batch's decodable items, so each label stays with its image, and its
    undecodable ones; images is None when no item of the batch could be decoded, and a list (not one
    tensor) when it holds JPEG bytes to decode on the device."""
    good = [(image, label) for image, label in items if not isinstance(image, Unreadable)]
    bad = [image for image, _ in items if isinstance(image, Unreadable)]
    if not good:
        return None, torch.empty(0, dtype=torch.long), bad
    if any(isinstance(image, JpegFile) for image, _ in good):
        return [image for image, _ in good], torch.tensor([label for _, label in good]), bad
    images, labels = default_collate(good)
    return images, labels, bad


@dataclass(frozen=True)
class DeviceDecode:
    """Decodes a batch's JPEG files on `device` in one call and resizes them there with the preprocess's
    own steps. A file the device's decoder refuses (nvJPEG lacks some JPEG variants) is decoded as the
    workers would (PIL), so only a file PIL cannot decode either is undecodable, with PIL's message."""

    cut: UintPreprocess
    read: Callable[[str], Any]  # the split's reader (PIL), for the files the device refuses
    device: str

    def _decode(self, jpegs: list[JpegFile]) -> list[Tensor]:
        decoded = decode_jpeg([jpeg.data for jpeg in jpegs], mode="RGB", device=self.device)
        assert isinstance(decoded, list)  # a list of files in, a list of images out
        return [self.cut.resize(image) for image in decoded]

    def _one(self, jpeg: JpegFile) -> Tensor | Unreadable:
        try:
            return self._decode([jpeg])[0]
        except RuntimeError:
            try:
                return self.cut.to_uint8(self.read(jpeg.path)).to(self.device)
            except BadImage as error:
                return Unreadable(jpeg.path, str(error))

    def __call__(self, items: Sequence[Tensor | JpegFile]) -> tuple[Tensor | None, Tensor, list[Unreadable]]:
        """The batch's images as one uint8 tensor on the device (None if none decodes), the positions in
        `items` it holds, and the undecodable files."""
        jpegs = [item for item in items if isinstance(item, JpegFile)]
        decoded: Sequence[Tensor | Unreadable]
        try:
            decoded = self._decode(jpegs)
        except RuntimeError:  # one file the decoder refuses fails the whole call: one by one, to find it
            decoded = [self._one(jpeg) for jpeg in jpegs]
        next_decoded = iter(decoded)
        images, kept, bad = [], [], []
        for position, item in enumerate(items):
            image = next(next_decoded) if isinstance(item, JpegFile) else item.to(self.device)
            if isinstance(image, Unreadable):
                bad.append(image)
            else:
                images.append(image)
                kept.append(position)
        return (torch.stack(images) if images else None), torch.tensor(kept, dtype=torch.long), bad


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
    decode: Decode = "workers",
) -> tuple[Tensor, Tensor, list[str]]:
    """Features and labels of the decodable images of `data` (`where` names it in errors), and the
    undecodable images skipped: none unless `skip_bad_images`, else the first fails naming it (and
    `skip_hint` says how to skip instead). `data` carries its preprocessing (ImageSplit.with_transform);
    open_clip's is finished on the device (UintPreprocess), and with `decode="device"` its JPEG files are
    decoded and resized there too (DeviceDecode)."""
    cut = UintPreprocess.of(data.transform)
    if cut is not None:
        data = data.with_transform(cut.to_uint8)
    on_device = None
    if decode == "device":
        if cut is None:
            needs = "open_clip's preprocess (ending in ToTensor, Normalize)"
            raise DecodeUnsupported(
                f"extract.decode: device needs {needs}, not {_step_names(data.transform)}; {_WORKERS_INSTEAD}"
            )
        cut.check_resize_takes_tensors()
        on_device = DeviceDecode(cut, data.read, device)
    loader = DataLoader(
        _Decoded(data, jpeg_bytes=on_device is not None),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        collate_fn=_collate_readable,
    )
    labels: list[Tensor] = []
    skipped: list[str] = []

    def batches() -> Iterator[Tensor]:
        for images, batch_labels, bad in tqdm(loader, desc=f"encode {where}", disable=not progress, leave=False):
            if isinstance(images, list):
                assert on_device is not None  # only _Decoded with jpeg_bytes gives lists
                images, kept, refused = on_device(images)
                batch_labels, bad = batch_labels[kept], bad + refused
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
