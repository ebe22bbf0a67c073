"""`moder`: use a trained hub after the run — classify images among new class names, export a zero-shot
head, show what a hub holds. Every subcommand has --help; bad input is one line naming what is at fault."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moder.classifier import Classifier
from moder.clip import ModelIdentity
from moder.datasets import IMAGE_SUFFIXES, catalog
from moder.errors import USER_ERRORS, UserError
from moder.features import FeatureFileError, read_features
from moder.hub import ExpertHub
from moder.io import atomic_path, csv_text
from moder.tensors import save_tensors


class InputError(UserError, ValueError):
    """A command-line input (class list, templates, images) is unusable; the message names it."""


def class_names(spec: str) -> list[str]:
    """`catalog:<source>` (a real dataset's CLIP class names), "a,b,c" (a comma is what makes a list), or a text
    file (one name per line), which must exist: a single word is never taken as the one class of every image."""
    if spec.startswith("catalog:"):
        try:
            return catalog(spec.removeprefix("catalog:")).class_names
        except KeyError as error:
            raise InputError(str(error.args[0])) from None
    if "," in spec:
        names = [name.strip() for name in spec.split(",") if name.strip()]
    else:
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = "no such file" if isinstance(error, FileNotFoundError) else f"not a readable text file ({error})"
            raise InputError(
                f"--classes {spec}: {reason}; give a file with one name per line, 'a,b,c' or catalog:<source>"
            ) from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(
            f"--classes {spec!r}: no class names (give a file with one per line, 'a,b,c' or catalog:<source>)"
        )
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise InputError(f"--classes {spec!r}: repeated class name(s): {', '.join(repeated)}")
    return names


def templates(spec: str | None) -> list[str] | None:
    """`catalog:<source>`, a text file (one template per line), or None for the hub's own templates."""
    if spec is None:
        return None
    if spec.startswith("catalog:"):
        return catalog(spec.removeprefix("catalog:")).templates
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--templates {spec}: not a file (one template per line) nor catalog:<source>")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def image_files(inputs: list[str]) -> list[Path]:
    """Image files from folders (every image below them, sorted), files, and CSV lists (a `path`
    column, relative to the CSV's folder)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.suffix.lower() == ".csv":
            with item.open(newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.DictReader(handle))
            if not rows or "path" not in rows[0]:
                raise InputError(f"{item}: a CSV list needs a header with a `path` column and at least one row")
            files += [item.parent / row["path"] for row in rows]
        elif item.is_file():
            files.append(item)
        else:
            raise InputError(f"{item}: no such image, folder or CSV list")
    if not files:
        raise InputError(f"no images in {', '.join(inputs)}")
    return files


def classify_inputs(items: list[str], identity: str) -> tuple[Tensor | list[Path], list[str]]:
    """Image files (see `image_files`), or image features from the project's Parquet files (made by the
    hub's backbone), with a name for each row of the output."""
    if not all(item.endswith(".parquet") for item in items):
        files = image_files(items)
        return files, [str(f) for f in files]
    try:
        tables = [read_features(item, identity) for item in items]
    except FeatureFileError as error:
        raise InputError(str(error)) from None
    names = [f"{item}#{row}" for item, table in zip(items, tables, strict=True) for row in range(len(table.labels))]
    return torch.cat([table.vectors for table in tables]), names


def classify(args: argparse.Namespace) -> None:
    classifier = Classifier.from_files(args.backbone, args.hub, args.experts, args.device)
    inputs, names = classify_inputs(args.images, classifier.hub.identity)
    prediction = classifier.predict(
        inputs,
        class_names(args.classes),
        args.top_k,
        templates(args.templates),
        args.dataset,
        args.skip_bad_images,
        args.batch_size,
    )
    if prediction.skipped:
        print(
            f"skipped {len(prediction.skipped)} undecodable image(s): {', '.join(prediction.skipped[:3])}"
            f"{', ...' if len(prediction.skipped) > 3 else ''}",
            file=sys.stderr,
        )
    kept = [name for name in names if name not in set(prediction.skipped)]
    ranks = prediction.scores.shape[1]  # --top-k, or every class when there are fewer
    rows: list[dict[str, Any]] = [
        {"image": str(file), "labels": labels, "scores": [round(float(s), 6) for s in scores]}
        for file, labels, scores in zip(kept, prediction.labels, prediction.scores.tolist(), strict=True)
    ]
    if args.out is not None and args.out.suffix == ".json":
        text = json.dumps(rows, indent=1) + "\n"
    else:
        lines = [["image", *[f"{kind}_{rank}" for rank in range(1, ranks + 1) for kind in ("label", "score")]]]
        lines += [
            [row["image"], *[v for pair in zip(row["labels"], row["scores"], strict=True) for v in pair]]
            for row in rows
        ]
        text = csv_text(lines)
    _emit(text, args.out)


def export_head(args: argparse.Namespace) -> None:
    classifier = Classifier.from_files(args.backbone, args.hub, args.experts, args.device)
    names = class_names(args.classes)
    head = classifier.head(names, templates(args.templates), args.dataset)
    save_tensors(
        args.out,
        {"weights": head.weights, "bias": head.bias},
        {
            "class_names": names,
            "backbone": classifier.hub.identity,
            "usage": "logits = normalize(image_features) @ weights + bias",
        },
    )
    print(f"wrote {args.out}: head [{head.weights.shape[0]}, {head.weights.shape[1]}] for {len(names)} classes")


def show_hub(args: argparse.Namespace) -> None:
    root = args.hub.parent.parent / "experts" if args.experts is None else args.experts
    identity, settings = ExpertHub.read_index_metadata(args.hub)
    hub = ExpertHub.load_index(args.hub, root, identity)
    model = ModelIdentity.from_json(identity)
    parameters = sum(t.numel() for t in hub.experts.tensors().values()) if hub.experts is not None else 0
    print(f"hub {args.hub}: {len(hub)} classes, backbone {model.architecture} ({model.weights})")
    if hub.experts is not None:
        print(
            f"experts: {json.dumps(hub.experts.describe())}; {parameters:,} parameters "
            f"({parameters // max(len(hub), 1):,} per class, {parameters * 4 / 2**20:.1f} MiB as float32)"
        )
    print(f"settings: {json.dumps({k: v for k, v in settings.items() if k != 'templates'})}")
    for step in sorted(set(hub.steps)):
        rows = [i for i, s in enumerate(hub.steps) if s == step]
        names = [hub.class_names[i] for i in rows]
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        print(f"  step {step} {hub.tasks[rows[0]]} ({hub.datasets[rows[0]]}): {len(rows)} classes: {shown}")


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    with atomic_path(out) as temporary:
        temporary.write_text(text)
    print(f"wrote {out}", file=sys.stderr)


def _hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone", type=Path, required=True, help="the backbone checkpoint (data/backbone/clip.safetensors)"
    )
    parser.add_argument("--hub", type=Path, required=True, help="a hub index (data/<benchmark>/hub/<step>.parquet)")
    parser.add_argument(
        "--experts",
        type=Path,
        help="the experts directory the hub points into (default: ../experts beside the hub folder)",
    )
    parser.add_argument(
        "--classes", required=True, help='class names: names.txt (one per line), "a,b,c", or catalog:<source>'
    )
    parser.add_argument(
        "--templates", help="prompt templates: a file (one per line) or catalog:<source> (default: the hub's)"
    )
    parser.add_argument("--dataset", help="treat only this dataset's hub classes as trained (default: any dataset's)")
    parser.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("classify", help="top-k class names for images, with a trained hub")
    _hub_options(run)
    run.add_argument(
        "images",
        nargs="+",
        help="image files, folders of images, CSV lists with a `path` column, or the project's feature .parquet files",
    )
    run.add_argument("--top-k", type=int, default=5)
    run.add_argument("--out", type=Path, help="write predictions here (.csv or .json); default: CSV on stdout")
    run.add_argument(
        "--skip-bad-images", action="store_true", help="skip undecodable images (named on stderr) instead of failing"
    )
    run.add_argument("--batch-size", type=int, default=64)
    run.set_defaults(run=classify)
    head = commands.add_parser(
        "export-head", help="the composed prototypes as a zero-shot classifier head (safetensors)"
    )
    _hub_options(head)
    head.add_argument("--out", type=Path, required=True, help="the head to write (.safetensors)")
    head.set_defaults(run=export_head)
    hub = commands.add_parser("hub", help="inspect a hub").add_subparsers(dest="hub_command", required=True)
    show = hub.add_parser("show", help="classes per step, expert kind and size, backbone, settings")
    show.add_argument("hub", type=Path, help="a hub index (data/<benchmark>/hub/<step>.parquet)")
    show.add_argument("--experts", type=Path, help="the experts directory (default: ../experts beside the hub folder)")
    show.set_defaults(run=show_hub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "top_k", 1) < 1:
        sys.exit("error: --top-k must be at least 1")
    if getattr(args, "out", None) is not None and args.command == "export-head" and args.out.suffix != ".safetensors":
        sys.exit(f"error: --out {args.out} is not a .safetensors file")
    try:
        args.run(args)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
