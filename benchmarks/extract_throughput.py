"""ViT-B-16 image features through moder's extraction path vs a bare forward (target: >= 0.9 of its rate).

    python benchmarks/extract_throughput.py --device cuda --images 8192 --workers 4 8 15

Baseline: the same encoding loop (moder.features.encode_images: autocast, normalisation, copy back) over
images already decoded, preprocessed and resident on the device, so it measures the model alone. moder's
path (encode_image_split, what the extract stage runs) decodes JPEG files from disk in `--workers`
DataLoader processes, which hand uint8 images to the device (moder.encode.UintPreprocess); "float
hand-off" runs open_clip's whole preprocess in the workers instead (the path before UintPreprocess). One
process's preprocessing rate bounds what the workers can give. "decode on the device" (extract.decode:
device) has the workers only read the files, and decodes and resizes them on the device (moder.encode.
DeviceDecode; nvJPEG on a GPU); its features differ slightly from PIL's, so its rows print the smallest
cosine to the bare forward's instead of 0 difference. The images are generated (smooth random
colour fields, 500x375 like many benchmark photos); weights are random, which does not change the time of
a forward.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from moder.clip import load_clip
from moder.datasets import ImageSplit
from moder.encode import Decode, DeviceDecode, JpegFile, UintPreprocess, encode_image_split, encode_images


def write_image(path_and_seed: tuple[str, int]) -> None:
    path, seed = path_and_seed
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # upsampled: compresses like a photo, not noise
    Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(path, quality=90)


class WholeInWorkers:
    """open_clip's preprocess, hidden from UintPreprocess.of: the workers convert to float and normalise."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 15])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    clip = load_clip("ViT-B-16", device=args.device, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        files = [str(Path(folder) / f"{i}.jpg") for i in range(args.images)]
        with Pool() as pool:
            pool.map(write_image, [(f, i) for i, f in enumerate(files)], chunksize=64)
        data = ImageSplit(files, [0] * len(files), ["image"], transform=clip.preprocess)
        loader = DataLoader(data, batch_size=args.batch_size, num_workers=max(args.workers))
        resident = [images.to(args.device) for images, _ in loader]
        encode_images(clip.model, resident[:2], args.device, args.precision)  # warm-up: kernels, autotuning
        synchronize(args.device)
        start = time.perf_counter()
        bare = encode_images(clip.model, resident, args.device, args.precision)
        synchronize(args.device)
        bare_rate = args.images / (time.perf_counter() - start)
        del resident
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        print(f"ViT-B-16 {args.precision}, {args.images} JPEG images 500x375, batch {args.batch_size}, {name}")
        print(f"  {'bare forward, images on the device':35s}: {bare_rate:8.0f} images/s")
        start = time.perf_counter()
        sample = min(256, args.images)  # images decoded one by one for the per-process rates
        for i in range(sample):
            data[i]
        print(f"  {'decode + preprocess, one process':35s}: {sample / (time.perf_counter() - start):8.0f} images/s")
        cut = UintPreprocess.of(clip.preprocess)
        assert cut is not None
        batch = [
            JpegFile(f, torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8)) for f in files[:sample]
        ]
        on_device = DeviceDecode(cut, data.read, args.device)
        on_device(batch[:8])  # warm-up: the decoder's handle and buffers
        synchronize(args.device)
        start = time.perf_counter()
        on_device(batch)
        synchronize(args.device)
        print(f"  {'decode + resize on the device':35s}: {len(batch) / (time.perf_counter() - start):8.0f} images/s")
        runs: list[tuple[str, ImageSplit, int, Decode]] = [("moder extract", data, w, "workers") for w in args.workers]
        runs += [("decode on the device", data, w, "device") for w in args.workers]
        runs.append(
            ("float hand-off", data.with_transform(WholeInWorkers(clip.preprocess)), max(args.workers), "workers")
        )
        for label, split, workers, decode in runs:
            start = time.perf_counter()
            features, _, _ = encode_image_split(
                clip.model,
                split,
                batch_size=args.batch_size,
                workers=workers,
                device=args.device,
                precision=args.precision,
                skip_bad_images=False,
                where="benchmark images",
                skip_hint="",
                decode=decode,
            )
            synchronize(args.device)
            rate = args.images / (time.perf_counter() - start)
            same = (
                f"max |difference| {(features - bare).abs().max().item():.1e}"
                if decode == "workers"
                else f"smallest cosine {(features * bare).sum(1).min().item():.6f}"
            )
            print(
                f"  {f'{label}, {workers} workers':35s}: {rate:8.0f} images/s = {rate / bare_rate:.2f} of bare ({same})"
            )


if __name__ == "__main__":
    main()
